//! Agreement between raters: labels ([`labels`]), masks ([`masks`]), boxes and landmarks
//! (here), and the agreement of a project's raters case by case ([`project`]).

pub mod labels;
pub mod masks;
pub mod project;

use serde::{Deserialize, Serialize};

use crate::labelmap::Grid;
use crate::model::{BoundingBox, Landmark};

/// Intersection over union of two boxes, in voxel units (2D boxes on different slices: 0).
pub fn box_iou(a: &BoundingBox, b: &BoundingBox) -> f64 {
    if a.slice != b.slice {
        return 0.0;
    }
    // 2D boxes measure their area; 3D boxes their volume.
    let axes = if a.slice.is_some() { 2 } else { 3 };
    let mut inter = 1.0;
    let mut va = 1.0;
    let mut vb = 1.0;
    for ax in 0..axes {
        let lo = a.min[ax].max(b.min[ax]);
        let hi = a.max[ax].min(b.max[ax]);
        inter *= (hi - lo).max(0.0);
        va *= a.max[ax] - a.min[ax];
        vb *= b.max[ax] - b.min[ax];
    }
    let union = va + vb - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// How two raters' boxes of one class match.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoxMatching {
    /// IoU of each matched pair.
    pub matched: Vec<f64>,
    /// Boxes of each rater without a partner.
    pub only_a: usize,
    pub only_b: usize,
}

impl BoxMatching {
    /// F1 of the matching (both raters drew nothing: `None`).
    pub fn f1(&self) -> Option<f64> {
        let tp = self.matched.len() as f64;
        let d = 2.0 * tp + (self.only_a + self.only_b) as f64;
        (d > 0.0).then(|| 2.0 * tp / d)
    }

    pub fn mean_iou(&self) -> Option<f64> {
        (!self.matched.is_empty())
            .then(|| self.matched.iter().sum::<f64>() / self.matched.len() as f64)
    }
}

/// Match two raters' boxes of the same class greedily by IoU, highest first, pairs with IoU of
/// at least `threshold` (COCO evaluation's rule, without scores).
pub fn match_boxes(a: &[&BoundingBox], b: &[&BoundingBox], threshold: f64) -> BoxMatching {
    let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
    for (i, x) in a.iter().enumerate() {
        for (j, y) in b.iter().enumerate() {
            let iou = box_iou(x, y);
            if iou >= threshold && iou > 0.0 {
                pairs.push((iou, i, j));
            }
        }
    }
    pairs.sort_by(|p, q| q.0.total_cmp(&p.0).then(p.1.cmp(&q.1)).then(p.2.cmp(&q.2)));
    let mut used_a = vec![false; a.len()];
    let mut used_b = vec![false; b.len()];
    let mut matched = Vec::new();
    for (iou, i, j) in pairs {
        if !used_a[i] && !used_b[j] {
            used_a[i] = true;
            used_b[j] = true;
            matched.push(iou);
        }
    }
    BoxMatching {
        only_a: a.len() - matched.len(),
        only_b: b.len() - matched.len(),
        matched,
    }
}

/// Radial error in mm between two raters' landmarks of the same name (names one rater set and
/// the other did not are left out).
pub fn landmark_errors(a: &[Landmark], b: &[Landmark], grid: &Grid) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for x in a {
        if let Some(y) = b.iter().find(|y| y.name == x.name) {
            let (p, q) = (grid.to_mm(x.voxel), grid.to_mm(y.voxel));
            let d = ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2) + (p[2] - q[2]).powi(2)).sqrt();
            out.push((x.name.clone(), d));
        }
    }
    out.sort_by(|p, q| p.0.cmp(&q.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b2(min: [f64; 2], max: [f64; 2]) -> BoundingBox {
        BoundingBox {
            class: 1,
            slice: Some(3),
            min: [min[0], min[1], 3.0],
            max: [max[0], max[1], 3.0],
        }
    }

    #[test]
    fn boxes_match_by_overlap() {
        let a = [b2([0.0, 0.0], [10.0, 10.0]), b2([20.0, 20.0], [30.0, 30.0])];
        let b = [b2([5.0, 0.0], [15.0, 10.0]), b2([50.0, 50.0], [60.0, 60.0])];
        assert!((box_iou(&a[0], &b[0]) - 1.0 / 3.0).abs() < 1e-12);
        let m = match_boxes(
            &a.iter().collect::<Vec<_>>(),
            &b.iter().collect::<Vec<_>>(),
            0.3,
        );
        assert_eq!((m.matched.len(), m.only_a, m.only_b), (1, 1, 1));
        assert_eq!(m.f1(), Some(0.5));
        let strict = match_boxes(
            &a.iter().collect::<Vec<_>>(),
            &b.iter().collect::<Vec<_>>(),
            0.5,
        );
        assert_eq!(strict.f1(), Some(0.0));
    }

    #[test]
    fn landmark_errors_are_in_millimetres() {
        let grid = Grid {
            shape: [10, 10, 10],
            affine: [
                [0.5, 0.0, 0.0, 0.0],
                [0.0, 0.5, 0.0, 0.0],
                [0.0, 0.0, 3.0, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        let l = |n: &str, v: [f64; 3]| Landmark {
            name: n.into(),
            voxel: v,
        };
        let e = landmark_errors(
            &[l("apex", [1.0, 1.0, 1.0]), l("base", [0.0, 0.0, 0.0])],
            &[l("apex", [1.0, 1.0, 2.0]), l("other", [0.0, 0.0, 0.0])],
            &grid,
        );
        assert_eq!(e, vec![("apex".to_owned(), 3.0)]);
    }
}
