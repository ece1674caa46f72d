//! CVAT for images 1.1 (XML): boxes, polygons, polylines, points (landmarks), masks and tags,
//! one `<image>` per slice.
//!
//! Conventions: images are named `<case>/slice-<k:04>.png` as in COCO; coordinates are CVAT's
//! pixel coordinates, a voxel centre (i, j) at (i + 0.5, j + 0.5); masks are CVAT's RLE, which
//! is not COCO's: row-major inside the tight box (`left`, `top`, `width`, `height`), runs
//! starting with background; `source` is `manual`, or `auto` for a model's proposal; landmarks
//! are `<points>` with the label `landmark` and their name in the attribute `name`;
//! classification labels are `<tag>` with the attribute `level` (case, series or slice).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ndarray::Array2;

use crate::coco::{CaseAnnotations, Imported};
use crate::labelmap::{Grid, LabelMap};
use crate::model::{BoundingBox, ClassLabel, Landmark, Level, Outline, Project};

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// CVAT's mask RLE of `mask[[i, j]]` inside its tight box: (rle, left, top, width, height).
pub fn mask_rle(mask: &Array2<bool>) -> Option<(Vec<u64>, usize, usize, usize, usize)> {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for ((i, j), v) in mask.indexed_iter() {
        if *v {
            x0 = x0.min(i);
            y0 = y0.min(j);
            x1 = x1.max(i);
            y1 = y1.max(j);
        }
    }
    if x0 == usize::MAX {
        return None;
    }
    let mut runs = Vec::new();
    let mut current = false;
    let mut run = 0u64;
    for j in y0..=y1 {
        for i in x0..=x1 {
            if mask[[i, j]] != current {
                runs.push(run);
                run = 0;
                current = !current;
            }
            run += 1;
        }
    }
    runs.push(run);
    Some((runs, x0, y0, x1 - x0 + 1, y1 - y0 + 1))
}

/// The CVAT 1.1 XML of the cases' annotations.
pub fn export(project: &Project, cases: &[CaseAnnotations<'_>], proposals: bool) -> String {
    let source = if proposals { "auto" } else { "manual" };
    let class = |c: u16| {
        escape(
            &project
                .label(c)
                .map_or_else(|| c.to_string(), |l| l.name.clone()),
        )
    };
    let mut x = String::from(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<annotations>\n  <version>1.1</version>\n  <meta>\n    <task>\n",
    );
    let _ = writeln!(
        x,
        "      <name>{}</name>\n      <labels>",
        escape(&project.id)
    );
    for l in &project.labels {
        let _ = writeln!(
            x,
            "        <label><name>{}</name><color>#{:02x}{:02x}{:02x}</color><type>any</type><attributes><attribute><name>level</name><input_type>select</input_type><values>case\nseries\nslice</values></attribute></attributes></label>",
            escape(&l.name),
            l.colour[0],
            l.colour[1],
            l.colour[2]
        );
    }
    x.push_str("        <label><name>landmark</name><type>points</type><attributes><attribute><name>name</name><input_type>text</input_type><values></values></attribute></attributes></label>\n      </labels>\n    </task>\n  </meta>\n");
    let mut id = 0;
    for c in cases {
        let [ni, nj, nk] = c.grid.shape;
        for k in 0..nk {
            let mut body = String::new();
            for b in c.content.boxes.iter().filter(|b| b.slice == Some(k as u32)) {
                let _ = writeln!(
                    body,
                    "    <box label=\"{}\" source=\"{source}\" occluded=\"0\" xtl=\"{}\" ytl=\"{}\" xbr=\"{}\" ybr=\"{}\" z_order=\"0\"></box>",
                    class(b.class),
                    b.min[0] + 0.5,
                    b.min[1] + 0.5,
                    b.max[0] + 0.5,
                    b.max[1] + 0.5
                );
            }
            for o in c.content.outlines.iter().filter(|o| o.slice == k as u32) {
                let points: Vec<String> = o
                    .points
                    .iter()
                    .map(|p| format!("{},{}", p[0] + 0.5, p[1] + 0.5))
                    .collect();
                let _ = writeln!(
                    body,
                    "    <{tag} label=\"{}\" source=\"{source}\" occluded=\"0\" points=\"{}\" z_order=\"0\"></{tag}>",
                    class(o.class),
                    points.join(";"),
                    tag = if o.closed { "polygon" } else { "polyline" }
                );
            }
            for l in c
                .content
                .landmarks
                .iter()
                .filter(|l| l.voxel[2].round().max(0.0) as usize == k)
            {
                let _ = writeln!(
                    body,
                    "    <points label=\"landmark\" source=\"{source}\" occluded=\"0\" points=\"{},{}\" z_order=\"0\"><attribute name=\"name\">{}</attribute></points>",
                    l.voxel[0] + 0.5,
                    l.voxel[1] + 0.5,
                    escape(&l.name)
                );
            }
            for t in &c.content.labels {
                let here = match t.level {
                    Level::Slice => t.slice == Some(k as u32),
                    Level::Case | Level::Series => k == 0,
                };
                if !here {
                    continue;
                }
                let level = match t.level {
                    Level::Case => "case",
                    Level::Series => "series",
                    Level::Slice => "slice",
                };
                for &cl in &t.classes {
                    let _ = writeln!(
                        body,
                        "    <tag label=\"{}\" source=\"{source}\"><attribute name=\"level\">{level}</attribute></tag>",
                        class(cl)
                    );
                }
            }
            if let Some(m) = c.mask {
                let slice = m.data.index_axis(ndarray::Axis(2), k);
                for l in &project.labels {
                    let mask = slice.mapv(|v| v == l.value);
                    if let Some((rle, left, top, w, h)) = mask_rle(&mask) {
                        let runs: Vec<String> = rle.iter().map(u64::to_string).collect();
                        let _ = writeln!(
                            body,
                            "    <mask label=\"{}\" source=\"{source}\" occluded=\"0\" rle=\"{}\" left=\"{left}\" top=\"{top}\" width=\"{w}\" height=\"{h}\" z_order=\"0\"></mask>",
                            class(l.value),
                            runs.join(", ")
                        );
                    }
                }
            }
            if body.is_empty() {
                continue;
            }
            let _ = writeln!(
                x,
                "  <image id=\"{id}\" name=\"{}\" width=\"{ni}\" height=\"{nj}\">\n{body}  </image>",
                escape(&crate::coco::slice_name(c.case, k))
            );
            id += 1;
        }
    }
    x.push_str("</annotations>\n");
    x
}

/// Read a CVAT 1.1 XML document into per-case contents and masks.
pub fn import(
    xml: &str,
    project: &Project,
    grids: &BTreeMap<String, Grid>,
) -> Result<BTreeMap<String, Imported>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("not XML: {e}"))?;
    let mut out: BTreeMap<String, Imported> = BTreeMap::new();
    for image in doc.descendants().filter(|n| n.has_tag_name("image")) {
        let name = image.attribute("name").unwrap_or_default();
        let (case, k) = crate::coco::parse_slice_name(name).map_err(|e| format!("image {e}"))?;
        let grid = grids
            .get(&case)
            .ok_or_else(|| format!("image {name}: case {case} is not in the project"))?;
        if k >= grid.shape[2] {
            return Err(format!(
                "image {name}: slice {k} is beyond the case's {} slices",
                grid.shape[2]
            ));
        }
        let entry = out.entry(case.to_owned()).or_default();
        for shape in image.children().filter(roxmltree::Node::is_element) {
            let f = |a: &str| -> Result<f64, String> {
                shape
                    .attribute(a)
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| {
                        format!(
                            "image {name}: <{}> has no number {a}",
                            shape.tag_name().name()
                        )
                    })
            };
            let label = shape.attribute("label").unwrap_or_default();
            let class = || {
                project.label_named(label).map(|l| l.value).ok_or_else(|| {
                    format!(
                        "image {name}: label {label:?} is not in project {}",
                        project.id
                    )
                })
            };
            let points = || -> Result<Vec<[f64; 2]>, String> {
                shape
                    .attribute("points")
                    .unwrap_or_default()
                    .split(';')
                    .map(|p| {
                        let (a, b) = p.split_once(',').ok_or("a point is not x,y")?;
                        Ok([
                            a.trim()
                                .parse::<f64>()
                                .map_err(|_| "a point is not a number")?
                                - 0.5,
                            b.trim()
                                .parse::<f64>()
                                .map_err(|_| "a point is not a number")?
                                - 0.5,
                        ])
                    })
                    .collect::<Result<Vec<_>, &str>>()
                    .map_err(|e| format!("image {name}: {e}"))
            };
            let attribute = |n: &str| {
                shape
                    .children()
                    .find(|c| c.has_tag_name("attribute") && c.attribute("name") == Some(n))
                    .and_then(|c| c.text())
                    .map(str::to_owned)
            };
            match shape.tag_name().name() {
                "box" => entry.content.boxes.push(BoundingBox {
                    class: class()?,
                    slice: Some(k as u32),
                    min: [f("xtl")? - 0.5, f("ytl")? - 0.5, k as f64],
                    max: [f("xbr")? - 0.5, f("ybr")? - 0.5, k as f64],
                }),
                tag @ ("polygon" | "polyline") => entry.content.outlines.push(Outline {
                    class: class()?,
                    slice: k as u32,
                    closed: tag == "polygon",
                    points: points()?,
                }),
                "points" => {
                    let n = attribute("name").unwrap_or_else(|| label.to_owned());
                    for p in points()? {
                        entry.content.landmarks.push(Landmark {
                            name: n.clone(),
                            voxel: [p[0], p[1], k as f64],
                        });
                    }
                }
                "tag" => {
                    let level = match attribute("level").as_deref() {
                        Some("case") => Level::Case,
                        Some("series") => Level::Series,
                        _ => Level::Slice,
                    };
                    let c = class()?;
                    if let Some(existing) = entry.content.labels.iter_mut().find(|l| {
                        l.level == level && (level != Level::Slice || l.slice == Some(k as u32))
                    }) {
                        existing.classes.push(c);
                    } else {
                        entry.content.labels.push(ClassLabel {
                            level,
                            slice: (level == Level::Slice).then_some(k as u32),
                            classes: vec![c],
                        });
                    }
                }
                "mask" => {
                    let c = class()?;
                    let (left, top, w, h) = (
                        f("left")? as usize,
                        f("top")? as usize,
                        f("width")? as usize,
                        f("height")? as usize,
                    );
                    if left + w > grid.shape[0] || top + h > grid.shape[1] {
                        return Err(format!("image {name}: a mask's box is outside the slice"));
                    }
                    let runs: Vec<u64> = shape
                        .attribute("rle")
                        .unwrap_or_default()
                        .split(',')
                        .map(|r| {
                            r.trim()
                                .parse::<u64>()
                                .map_err(|_| format!("image {name}: a malformed mask rle"))
                        })
                        .collect::<Result<_, _>>()?;
                    if runs.iter().sum::<u64>() != (w * h) as u64 {
                        return Err(format!("image {name}: a mask's rle does not cover its box"));
                    }
                    let map = entry
                        .mask
                        .get_or_insert_with(|| LabelMap::empty(grid.clone()));
                    let mut pos = 0usize;
                    let mut value = false;
                    for r in runs {
                        for _ in 0..r {
                            if value {
                                map.data[[left + pos % w, top + pos / w, k]] = c;
                            }
                            pos += 1;
                        }
                        value = !value;
                    }
                }
                _ => {}
            }
        }
    }
    for (case, imported) in &out {
        imported
            .content
            .check(project, grids[case].shape)
            .map_err(|e| format!("case {case}: {e}"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvat_rle_is_row_major_in_the_tight_box() {
        let mut m = Array2::from_elem((6, 5), false);
        for (i, j) in [(2, 1), (3, 1), (2, 2), (4, 3)] {
            m[[i, j]] = true;
        }
        // Box x 2..=4, y 1..=3: rows "110", "100", "001".
        let (rle, left, top, w, h) = mask_rle(&m).unwrap_or_default();
        assert_eq!((left, top, w, h), (2, 1, 3, 3));
        assert_eq!(rle, vec![0, 2, 1, 1, 4, 1]);
        assert_eq!(mask_rle(&Array2::from_elem((3, 3), false)), None);
        assert_eq!(escape("a<b&\"c\""), "a&lt;b&amp;&quot;c&quot;");
    }
}
