//! The agreement of a project's raters: every pair of raters on every case, then summaries per
//! class. Case-level classification labels give Cohen's κ (exactly two raters), Fleiss' κ (the
//! same number of raters on every case) and Krippendorff's α (any); masks give Dice, IoU,
//! Hausdorff, HD95 and ASSD per class and pair, with empty cases counted apart; boxes give
//! matched IoU and F1 at IoU 0.5; landmarks give radial errors in mm.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::labels::{self, Chance, Level as Measure};
use super::masks::{self, MaskAgreement};
use super::{landmark_errors, match_boxes};
use crate::labelmap::{Grid, LabelMap};
use crate::model::{Content, Level, Project};

/// One rater's latest version of one case.
#[derive(Clone, Copy, Debug)]
pub struct Rating<'a> {
    pub case: &'a str,
    pub rater: &'a str,
    pub grid: &'a Grid,
    pub content: &'a Content,
    pub mask: Option<&'a LabelMap>,
}

/// Agreement of the case-level (or series-level) classification labels.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LabelAgreement {
    pub level: String,
    /// Units rated by at least two raters: cases, or slices for slice labels.
    pub cases: usize,
    pub raters: usize,
    pub cohen_kappa: Option<f64>,
    pub fleiss_kappa: Option<f64>,
    /// Fleiss' κ with Randolph's free-marginal chance agreement.
    pub randolph_kappa: Option<f64>,
    pub krippendorff_alpha: Option<f64>,
    /// Per class: present or not, Krippendorff's α (nominal).
    pub per_class: BTreeMap<String, Option<f64>>,
}

/// One pair of raters on one case, one class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairMask {
    pub case: String,
    pub raters: [String; 2],
    pub class: String,
    pub agreement: MaskAgreement,
}

/// Summary of a class's mask agreement over the project.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassSummary {
    pub pairs: usize,
    pub both_empty: usize,
    pub one_empty: usize,
    pub mean_dice: Option<f64>,
    pub median_dice: Option<f64>,
    pub median_hd95: Option<f64>,
    pub median_assd: Option<f64>,
}

/// Box agreement of a pair of raters on a case, one class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairBoxes {
    pub case: String,
    pub raters: [String; 2],
    pub class: String,
    pub f1: Option<f64>,
    pub mean_iou: Option<f64>,
    pub matched: usize,
    pub unmatched: usize,
}

/// Landmark errors of a pair of raters on a case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairLandmarks {
    pub case: String,
    pub raters: [String; 2],
    pub errors_mm: Vec<(String, f64)>,
}

/// Everything [`agreement`] measures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProjectAgreement {
    pub labels: Vec<LabelAgreement>,
    pub masks: Vec<PairMask>,
    pub mask_summary: BTreeMap<String, ClassSummary>,
    pub boxes: Vec<PairBoxes>,
    pub landmarks: Vec<PairLandmarks>,
}

/// The agreement of the ratings (each rater's latest version per case).
pub fn agreement(project: &Project, ratings: &[Rating<'_>]) -> ProjectAgreement {
    let mut by_case: BTreeMap<&str, Vec<&Rating<'_>>> = BTreeMap::new();
    for r in ratings {
        by_case.entry(r.case).or_default().push(r);
    }
    for v in by_case.values_mut() {
        v.sort_by(|a, b| a.rater.cmp(b.rater));
    }
    let mut out = ProjectAgreement::default();
    for level in [Level::Case, Level::Series, Level::Slice] {
        if let Some(l) = label_agreement(project, &by_case, level) {
            out.labels.push(l);
        }
    }
    let name = |v: u16| {
        project
            .label(v)
            .map_or_else(|| v.to_string(), |l| l.name.clone())
    };
    for (case, rs) in &by_case {
        for (x, a) in rs.iter().enumerate() {
            for b in &rs[x + 1..] {
                let raters = [a.rater.to_owned(), b.rater.to_owned()];
                if let (Some(ma), Some(mb)) = (a.mask, b.mask) {
                    for l in &project.labels {
                        out.masks.push(PairMask {
                            case: (*case).to_owned(),
                            raters: raters.clone(),
                            class: l.name.clone(),
                            agreement: masks::compare(
                                ma.mask(l.value).view(),
                                mb.mask(l.value).view(),
                                a.grid.spacing(),
                            ),
                        });
                    }
                }
                let classes: BTreeSet<u16> = a
                    .content
                    .boxes
                    .iter()
                    .chain(&b.content.boxes)
                    .map(|b| b.class)
                    .collect();
                for c in classes {
                    let pa: Vec<&crate::model::BoundingBox> =
                        a.content.boxes.iter().filter(|b| b.class == c).collect();
                    let pb: Vec<&crate::model::BoundingBox> =
                        b.content.boxes.iter().filter(|x| x.class == c).collect();
                    let m = match_boxes(&pa, &pb, 0.5);
                    out.boxes.push(PairBoxes {
                        case: (*case).to_owned(),
                        raters: raters.clone(),
                        class: name(c),
                        f1: m.f1(),
                        mean_iou: m.mean_iou(),
                        matched: m.matched.len(),
                        unmatched: m.only_a + m.only_b,
                    });
                }
                let errors = landmark_errors(&a.content.landmarks, &b.content.landmarks, a.grid);
                if !errors.is_empty() {
                    out.landmarks.push(PairLandmarks {
                        case: (*case).to_owned(),
                        raters,
                        errors_mm: errors,
                    });
                }
            }
        }
    }
    for l in &project.labels {
        let pairs: Vec<&PairMask> = out.masks.iter().filter(|p| p.class == l.name).collect();
        if pairs.is_empty() {
            continue;
        }
        let mut dice = Vec::new();
        let mut hd95 = Vec::new();
        let mut assd = Vec::new();
        let mut s = ClassSummary {
            pairs: pairs.len(),
            ..ClassSummary::default()
        };
        for p in pairs {
            match &p.agreement {
                MaskAgreement::BothEmpty => s.both_empty += 1,
                MaskAgreement::OneEmpty { .. } => {
                    s.one_empty += 1;
                    dice.push(0.0);
                }
                MaskAgreement::Both(o) => {
                    dice.push(o.dice);
                    hd95.push(o.hd95);
                    assd.push(o.assd);
                }
            }
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (!v.is_empty()).then(|| masks::percentile_sorted(&v, 50.0))
        };
        s.mean_dice = (!dice.is_empty()).then(|| dice.iter().sum::<f64>() / dice.len() as f64);
        s.median_dice = median(dice);
        s.median_hd95 = median(hd95);
        s.median_assd = median(assd);
        out.mask_summary.insert(l.name.clone(), s);
    }
    out
}

/// The single class a rater gave a case (or one of its slices) at `level` (a rater with none,
/// or several, gives no rating there).
fn class_at(content: &Content, level: Level, slice: Option<u32>) -> Option<u16> {
    let mut it = content
        .labels
        .iter()
        .filter(|l| l.level == level && l.classes.len() == 1 && l.slice == slice)
        .map(|l| l.classes[0]);
    let first = it.next()?;
    it.next().is_none().then_some(first)
}

fn label_agreement(
    project: &Project,
    by_case: &BTreeMap<&str, Vec<&Rating<'_>>>,
    level: Level,
) -> Option<LabelAgreement> {
    let raters: Vec<&str> = {
        let mut r: Vec<&str> = by_case.values().flatten().map(|r| r.rater).collect();
        r.sort_unstable();
        r.dedup();
        r
    };
    // The units: cases, or (case, slice) for slice labels; ratings[rater][unit].
    let units: Vec<(&str, Option<u32>)> = if level == Level::Slice {
        let mut u: BTreeSet<(&str, Option<u32>)> = BTreeSet::new();
        for (case, rs) in by_case {
            for r in rs {
                for l in r.content.labels.iter().filter(|l| l.level == Level::Slice) {
                    u.insert((case, l.slice));
                }
            }
        }
        u.into_iter().collect()
    } else {
        by_case.keys().map(|c| (*c, None)).collect()
    };
    let grid: Vec<Vec<Option<u16>>> = raters
        .iter()
        .map(|rater| {
            units
                .iter()
                .map(|(c, slice)| {
                    by_case[*c]
                        .iter()
                        .find(|r| r.rater == *rater)
                        .and_then(|r| class_at(r.content, level, *slice))
                })
                .collect()
        })
        .collect();
    let cases = &units;
    let rated: Vec<usize> = (0..cases.len())
        .filter(|&u| grid.iter().filter(|r| r[u].is_some()).count() >= 2)
        .collect();
    if rated.is_empty() {
        return None;
    }
    let values: Vec<u16> = project.labels.iter().map(|l| l.value).collect();
    let index = |v: u16| values.iter().position(|x| *x == v);
    let alpha_data: Vec<Vec<Option<f64>>> = grid
        .iter()
        .map(|r| r.iter().map(|v| v.map(f64::from)).collect())
        .collect();
    let cohen = (raters.len() == 2)
        .then(|| {
            let both: Vec<usize> = rated
                .iter()
                .copied()
                .filter(|&u| grid[0][u].is_some() && grid[1][u].is_some())
                .collect();
            let a: Option<Vec<u32>> = both
                .iter()
                .map(|&u| grid[0][u].and_then(index).map(|i| i as u32))
                .collect();
            let b: Option<Vec<u32>> = both
                .iter()
                .map(|&u| grid[1][u].and_then(index).map(|i| i as u32))
                .collect();
            labels::cohen_kappa(&a?, &b?, values.len(), labels::Weights::None)
        })
        .flatten();
    // Fleiss needs the same number of raters on every case.
    let counts: Vec<Vec<u32>> = rated
        .iter()
        .map(|&u| {
            let mut row = vec![0u32; values.len()];
            for r in &grid {
                if let Some(i) = r[u].and_then(index) {
                    row[i] += 1;
                }
            }
            row
        })
        .collect();
    let per_class = project
        .labels
        .iter()
        .map(|l| {
            let binary: Vec<Vec<Option<f64>>> = grid
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|v| v.map(|v| f64::from(u8::from(v == l.value))))
                        .collect()
                })
                .collect();
            (
                l.name.clone(),
                labels::krippendorff_alpha(&binary, Measure::Nominal),
            )
        })
        .collect();
    Some(LabelAgreement {
        level: match level {
            Level::Case => "case",
            Level::Series => "series",
            Level::Slice => "slice",
        }
        .into(),
        cases: rated.len(),
        raters: raters.len(),
        cohen_kappa: cohen,
        fleiss_kappa: labels::fleiss_kappa(&counts, Chance::Fleiss),
        randolph_kappa: labels::fleiss_kappa(&counts, Chance::Randolph),
        krippendorff_alpha: labels::krippendorff_alpha(&alpha_data, Measure::Nominal),
        per_class,
    })
}
