//! VGG Image Annotator 2 (project JSON, `_via_data_format_version` 2.0.10): boxes, polygons,
//! polylines and landmarks as regions of one image per slice. VIA has no masks; label maps
//! travel as NIfTI, COCO RLE or DICOM SEG.
//!
//! Conventions: images are named `<case>/slice-<k:04>.png` as in COCO, keyed by name and a
//! size of 0 (the node serves slices, not files); region coordinates are VIA's pixel
//! coordinates, a voxel centre (i, j) at (i + 0.5, j + 0.5); `region_attributes.class` is the
//! class name and `region_attributes.landmark` a landmark's name; `file_attributes` carry
//! `case`, `slice` and `rater`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::coco::{CaseAnnotations, Imported};
use crate::labelmap::Grid;
use crate::model::{BoundingBox, Landmark, Outline, Project};

/// The VIA 2 project of the cases' vector annotations.
pub fn export(project: &Project, cases: &[CaseAnnotations<'_>]) -> Value {
    let mut meta = serde_json::Map::new();
    let mut ids = Vec::new();
    let class_name = |c: u16| {
        project
            .label(c)
            .map_or_else(|| c.to_string(), |l| l.name.clone())
    };
    for c in cases {
        let mut by_slice: BTreeMap<usize, Vec<Value>> = BTreeMap::new();
        for b in &c.content.boxes {
            let Some(k) = b.slice else { continue };
            by_slice.entry(k as usize).or_default().push(json!({
                "shape_attributes": {
                    "name": "rect",
                    "x": b.min[0] + 0.5,
                    "y": b.min[1] + 0.5,
                    "width": b.max[0] - b.min[0],
                    "height": b.max[1] - b.min[1],
                },
                "region_attributes": {"class": class_name(b.class)},
            }));
        }
        for o in &c.content.outlines {
            by_slice.entry(o.slice as usize).or_default().push(json!({
                "shape_attributes": {
                    "name": if o.closed { "polygon" } else { "polyline" },
                    "all_points_x": o.points.iter().map(|p| p[0] + 0.5).collect::<Vec<_>>(),
                    "all_points_y": o.points.iter().map(|p| p[1] + 0.5).collect::<Vec<_>>(),
                },
                "region_attributes": {"class": class_name(o.class)},
            }));
        }
        for l in &c.content.landmarks {
            let k = l.voxel[2].round().max(0.0) as usize;
            by_slice.entry(k).or_default().push(json!({
                "shape_attributes": {"name": "point", "cx": l.voxel[0] + 0.5, "cy": l.voxel[1] + 0.5},
                "region_attributes": {"landmark": l.name},
            }));
        }
        for (k, regions) in by_slice {
            let file = crate::coco::slice_name(c.case, k);
            let key = format!("{file}0");
            meta.insert(
                key.clone(),
                json!({
                    "filename": file,
                    "size": 0,
                    "regions": regions,
                    "file_attributes": {"case": c.case, "slice": k, "rater": c.rater},
                }),
            );
            ids.push(key);
        }
    }
    let options: serde_json::Map<String, Value> = project
        .labels
        .iter()
        .map(|l| (l.name.clone(), Value::String(l.name.clone())))
        .collect();
    json!({
        "_via_settings": {"project": {"name": project.id}},
        "_via_img_metadata": meta,
        "_via_attributes": {
            "region": {
                "class": {"type": "dropdown", "description": "class", "options": options, "default_options": {}},
                "landmark": {"type": "text", "description": "landmark name", "default_value": ""},
            },
            "file": {},
        },
        "_via_data_format_version": "2.0.10",
        "_via_image_id_list": ids,
    })
}

/// Read a VIA 2 project (or its exported `_via_img_metadata` object) into per-case contents.
pub fn import(
    doc: &Value,
    project: &Project,
    grids: &BTreeMap<String, Grid>,
) -> Result<BTreeMap<String, Imported>, String> {
    let meta = doc
        .get("_via_img_metadata")
        .unwrap_or(doc)
        .as_object()
        .ok_or("no _via_img_metadata object")?;
    let mut out: BTreeMap<String, Imported> = BTreeMap::new();
    for (key, file) in meta {
        let filename = file["filename"].as_str().unwrap_or(key);
        let (case, k) = match (
            file["file_attributes"]["case"].as_str(),
            file["file_attributes"]["slice"].as_u64(),
        ) {
            (Some(c), Some(k)) => (c.to_owned(), k as usize),
            _ => crate::coco::parse_slice_name(filename)?,
        };
        let grid = grids
            .get(&case)
            .ok_or_else(|| format!("{filename}: case {case} is not in the project"))?;
        if k >= grid.shape[2] {
            return Err(format!(
                "{filename}: slice {k} is beyond the case's {} slices",
                grid.shape[2]
            ));
        }
        let entry = out.entry(case.clone()).or_default();
        let empty = Vec::new();
        for r in file["regions"].as_array().unwrap_or(&empty) {
            let s = &r["shape_attributes"];
            let num = |f: &str| {
                s[f].as_f64()
                    .ok_or_else(|| format!("{filename}: a region has no {f}"))
            };
            let class = || -> Result<u16, String> {
                let n = r["region_attributes"]["class"]
                    .as_str()
                    .ok_or_else(|| format!("{filename}: a region has no class"))?;
                project.label_named(n).map(|l| l.value).ok_or_else(|| {
                    format!("{filename}: class {n:?} is not in project {}", project.id)
                })
            };
            match s["name"].as_str() {
                Some("rect") => {
                    let (x, y, w, h) = (num("x")?, num("y")?, num("width")?, num("height")?);
                    entry.content.boxes.push(BoundingBox {
                        class: class()?,
                        slice: Some(k as u32),
                        min: [x - 0.5, y - 0.5, k as f64],
                        max: [x - 0.5 + w, y - 0.5 + h, k as f64],
                    });
                }
                Some(shape @ ("polygon" | "polyline")) => {
                    let xs = s["all_points_x"]
                        .as_array()
                        .ok_or("a polygon has no all_points_x")?;
                    let ys = s["all_points_y"]
                        .as_array()
                        .ok_or("a polygon has no all_points_y")?;
                    let points = xs
                        .iter()
                        .zip(ys)
                        .map(|(x, y)| Some([x.as_f64()? - 0.5, y.as_f64()? - 0.5]))
                        .collect::<Option<Vec<_>>>()
                        .ok_or("a polygon point is not a number")?;
                    entry.content.outlines.push(Outline {
                        class: class()?,
                        slice: k as u32,
                        closed: shape == "polygon",
                        points,
                    });
                }
                Some("point") => {
                    let n = r["region_attributes"]["landmark"]
                        .as_str()
                        .filter(|n| !n.is_empty())
                        .ok_or_else(|| format!("{filename}: a point has no landmark name"))?;
                    entry.content.landmarks.push(Landmark {
                        name: n.to_owned(),
                        voxel: [num("cx")? - 0.5, num("cy")? - 0.5, k as f64],
                    });
                }
                other => {
                    return Err(format!(
                        "{filename}: region shape {other:?} is not supported"
                    ));
                }
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
