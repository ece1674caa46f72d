//! COCO: boxes, polygons, masks as RLE, keypoints; one COCO image per slice of a case.
//!
//! Conventions (checked against pycocotools): a slice of the case image is a COCO image
//! `width` = i and `height` = j voxels, named `<case>/slice-<k:04>.png`, with the extra fields
//! `case` and `slice`; COCO pixel (x, y) covers [x, x+1) × [y, y+1), so a voxel centre (i, j)
//! is at (i + 0.5, j + 0.5). Masks are RLE in COCO's order (column-major over [height, width]:
//! down each column of j for each i), counts starting with a run of background, compressed
//! as `maskApi.c`'s `rleToString`. Categories are the project's classes (id = label value);
//! landmarks are keypoints of one extra category, `landmarks`, with the project's landmark
//! names. Each annotation carries `attributes` with the rater and version it came from.

use std::collections::BTreeMap;

use ndarray::Array2;
use serde_json::{Value, json};

use crate::labelmap::{Grid, LabelMap};
use crate::model::{BoundingBox, Content, Landmark, Outline, Project};

/// The name of slice `k` of a case, as every exported format names its images.
pub fn slice_name(case: &str, k: usize) -> String {
    format!("{case}/slice-{k:04}.png")
}

/// The case and slice an image name (from [`slice_name`]) stands for.
pub fn parse_slice_name(name: &str) -> Result<(String, usize), String> {
    let (case, rest) = name
        .split_once("/slice-")
        .ok_or_else(|| format!("{name:?} names no case and slice"))?;
    let k = rest
        .trim_end_matches(".png")
        .parse()
        .map_err(|_| format!("{name:?} names no slice"))?;
    Ok((case.to_owned(), k))
}

/// RLE counts of a mask given as `mask[[i, j]]` (width i, height j), in COCO order.
pub fn rle_counts(mask: &Array2<bool>) -> Vec<u64> {
    let mut counts = Vec::new();
    let mut current = false;
    let mut run = 0u64;
    let (w, h) = mask.dim();
    for i in 0..w {
        for j in 0..h {
            let v = mask[[i, j]];
            if v != current {
                counts.push(run);
                run = 0;
                current = v;
            }
            run += 1;
        }
    }
    counts.push(run);
    counts
}

/// The mask (`[[i, j]]`, width × height) of RLE counts; `None` if they do not cover it exactly.
pub fn rle_mask(counts: &[u64], width: usize, height: usize) -> Option<Array2<bool>> {
    let total: u64 = counts.iter().sum();
    if total != (width * height) as u64 {
        return None;
    }
    let mut mask = Array2::from_elem((width, height), false);
    let mut pos = 0usize;
    let mut value = false;
    for &c in counts {
        for _ in 0..c {
            mask[[pos / height, pos % height]] = value;
            pos += 1;
        }
        value = !value;
    }
    Some(mask)
}

/// COCO's compressed RLE string of counts.
pub fn rle_to_string(counts: &[u64]) -> String {
    let mut s = String::new();
    for (i, &c) in counts.iter().enumerate() {
        let mut x = c as i64;
        if i > 2 {
            x -= counts[i - 2] as i64;
        }
        loop {
            let mut c = (x & 0x1f) as u8;
            x >>= 5;
            let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                c |= 0x20;
            }
            s.push(char::from(c + 48));
            if !more {
                break;
            }
        }
    }
    s
}

/// Counts of a compressed RLE string; `None` if it is malformed.
pub fn rle_from_string(s: &str) -> Option<Vec<u64>> {
    let bytes = s.as_bytes();
    let mut counts: Vec<i64> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let mut x: i64 = 0;
        let mut k = 0u32;
        loop {
            let c = i64::from(bytes.get(p)?.checked_sub(48)?);
            if k >= 13 {
                return None;
            }
            x |= (c & 0x1f) << (5 * k);
            p += 1;
            k += 1;
            let more = c & 0x20 != 0;
            if !more {
                if c & 0x10 != 0 {
                    x |= -1i64 << (5 * k);
                }
                break;
            }
        }
        if counts.len() > 2 {
            x += counts[counts.len() - 2];
        }
        if x < 0 {
            return None;
        }
        counts.push(x);
    }
    Some(counts.into_iter().map(|c| c as u64).collect())
}

/// One case's annotations to export: the image grid, the version's content and mask, and who
/// made it.
#[derive(Debug)]
pub struct CaseAnnotations<'a> {
    pub case: &'a str,
    pub grid: &'a Grid,
    pub content: &'a Content,
    pub mask: Option<&'a LabelMap>,
    pub rater: &'a str,
    pub version: i64,
}

fn image_id(index: usize, slice: usize) -> u64 {
    (index as u64) * 100_000 + slice as u64 + 1
}

/// The COCO document of the cases' annotations.
pub fn export(project: &Project, cases: &[CaseAnnotations<'_>]) -> Value {
    let mut images = Vec::new();
    let mut annotations = Vec::new();
    let mut next = 1u64;
    let landmark_names: Vec<String> = {
        let mut n: Vec<String> = cases
            .iter()
            .flat_map(|c| c.content.landmarks.iter().map(|l| l.name.clone()))
            .collect();
        n.sort();
        n.dedup();
        n
    };
    let landmark_category = u64::from(project.max_label()) + 1;
    let mut seen_case: BTreeMap<&str, usize> = BTreeMap::new();
    for c in cases {
        let n_cases = seen_case.len();
        let index = *seen_case.entry(c.case).or_insert(n_cases);
        let [ni, nj, nk] = c.grid.shape;
        if index == n_cases {
            for k in 0..nk {
                images.push(json!({
                    "id": image_id(index, k),
                    "width": ni,
                    "height": nj,
                    "file_name": slice_name(c.case, k),
                    "case": c.case,
                    "slice": k,
                }));
            }
        }
        let attributes = json!({"rater": c.rater, "version": c.version});
        let mut push = |mut a: Value| {
            a["id"] = json!(next);
            a["attributes"] = attributes.clone();
            next += 1;
            annotations.push(a);
        };
        for b in &c.content.boxes {
            let Some(k) = b.slice else { continue };
            let (x, y) = (b.min[0] + 0.5, b.min[1] + 0.5);
            let (w, h) = (b.max[0] - b.min[0], b.max[1] - b.min[1]);
            push(json!({
                "image_id": image_id(index, k as usize),
                "category_id": b.class,
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
                "segmentation": [],
            }));
        }
        for o in c.content.outlines.iter().filter(|o| o.closed) {
            let flat: Vec<f64> = o
                .points
                .iter()
                .flat_map(|p| [p[0] + 0.5, p[1] + 0.5])
                .collect();
            let (xs, ys): (Vec<f64>, Vec<f64>) =
                o.points.iter().map(|p| (p[0] + 0.5, p[1] + 0.5)).unzip();
            let min_x = xs.iter().copied().fold(f64::INFINITY, f64::min);
            let min_y = ys.iter().copied().fold(f64::INFINITY, f64::min);
            let max_x = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let max_y = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            push(json!({
                "image_id": image_id(index, o.slice as usize),
                "category_id": o.class,
                "segmentation": [flat],
                "bbox": [min_x, min_y, max_x - min_x, max_y - min_y],
                "area": shoelace(&o.points),
                "iscrowd": 0,
            }));
        }
        if let Some(m) = c.mask {
            for k in 0..nk {
                let slice = m.data.index_axis(ndarray::Axis(2), k);
                for value in project.labels.iter().map(|l| l.value) {
                    let mask = slice.mapv(|v| v == value);
                    let area = mask.iter().filter(|v| **v).count();
                    if area == 0 {
                        continue;
                    }
                    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
                    for ((i, j), v) in mask.indexed_iter() {
                        if *v {
                            x0 = x0.min(i);
                            y0 = y0.min(j);
                            x1 = x1.max(i);
                            y1 = y1.max(j);
                        }
                    }
                    push(json!({
                        "image_id": image_id(index, k),
                        "category_id": value,
                        "segmentation": {"size": [nj, ni], "counts": rle_to_string(&rle_counts(&mask))},
                        "area": area,
                        "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                        "iscrowd": 0,
                    }));
                }
            }
        }
        // Landmarks: keypoints on the slice nearest each one, one annotation per slice.
        let mut by_slice: BTreeMap<usize, Vec<&Landmark>> = BTreeMap::new();
        for l in &c.content.landmarks {
            let k = l.voxel[2].round().clamp(0.0, (nk.max(1) - 1) as f64) as usize;
            by_slice.entry(k).or_default().push(l);
        }
        for (k, marks) in by_slice {
            let mut kp = vec![0.0; 3 * landmark_names.len()];
            for l in &marks {
                if let Ok(at) = landmark_names.binary_search(&l.name) {
                    kp[3 * at] = l.voxel[0] + 0.5;
                    kp[3 * at + 1] = l.voxel[1] + 0.5;
                    kp[3 * at + 2] = 2.0;
                }
            }
            push(json!({
                "image_id": image_id(index, k),
                "category_id": landmark_category,
                "keypoints": kp,
                "num_keypoints": marks.len(),
                "iscrowd": 0,
                "area": 0,
                "bbox": [0, 0, 0, 0],
            }));
        }
    }
    let mut categories: Vec<Value> = project
        .labels
        .iter()
        .map(|l| json!({"id": l.value, "name": l.name, "supercategory": project.id}))
        .collect();
    if !landmark_names.is_empty() {
        categories.push(json!({
            "id": landmark_category,
            "name": "landmarks",
            "supercategory": project.id,
            "keypoints": landmark_names,
            "skeleton": [],
        }));
    }
    json!({
        "info": {"description": format!("fedcurate annotation project {}", project.id), "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    })
}

/// Twice the signed area, halved and made positive (pixels²).
fn shoelace(points: &[[f64; 2]]) -> f64 {
    let n = points.len();
    let mut s = 0.0;
    for a in 0..n {
        let (p, q) = (points[a], points[(a + 1) % n]);
        s += p[0] * q[1] - q[0] * p[1];
    }
    (s / 2.0).abs()
}

/// What a COCO file holds for one case.
#[derive(Debug, Default)]
pub struct Imported {
    pub content: Content,
    pub mask: Option<LabelMap>,
}

/// Read a COCO document into per-case contents and masks. `grids` gives each known case's
/// grid; images name their case by the `case` and `slice` fields or by the file name this
/// module writes. Refuses classes not in the project, and coordinates outside the image.
pub fn import(
    doc: &Value,
    project: &Project,
    grids: &BTreeMap<String, Grid>,
) -> Result<BTreeMap<String, Imported>, String> {
    let images = doc["images"].as_array().ok_or("no images array")?;
    let mut where_of: BTreeMap<u64, (String, usize)> = BTreeMap::new();
    for im in images {
        let id = im["id"].as_u64().ok_or("an image has no numeric id")?;
        let (case, slice) = match (im["case"].as_str(), im["slice"].as_u64()) {
            (Some(c), Some(k)) => (c.to_owned(), k as usize),
            _ => parse_slice_name(im["file_name"].as_str().unwrap_or_default())
                .map_err(|e| format!("image {id}: {e}"))?,
        };
        let grid = grids.get(&case).ok_or_else(|| {
            format!("image {id} belongs to case {case}, which is not in the project")
        })?;
        if slice >= grid.shape[2] {
            return Err(format!(
                "image {id}: slice {slice} is beyond case {case}'s {} slices",
                grid.shape[2]
            ));
        }
        where_of.insert(id, (case, slice));
    }
    let keypoint_names: BTreeMap<u64, Vec<String>> = doc["categories"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| {
                    let names: Vec<String> = c["keypoints"]
                        .as_array()?
                        .iter()
                        .filter_map(|n| n.as_str().map(str::to_owned))
                        .collect();
                    Some((c["id"].as_u64()?, names))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out: BTreeMap<String, Imported> = BTreeMap::new();
    let empty = Vec::new();
    for a in doc["annotations"].as_array().unwrap_or(&empty) {
        let image = a["image_id"]
            .as_u64()
            .ok_or("an annotation has no image_id")?;
        let (case, k) = where_of
            .get(&image)
            .ok_or_else(|| {
                format!("an annotation refers to image {image}, which the file does not list")
            })?
            .clone();
        let grid = &grids[&case];
        let category = a["category_id"]
            .as_u64()
            .ok_or("an annotation has no category_id")?;
        let entry = out.entry(case.clone()).or_default();
        if let Some(names) = keypoint_names.get(&category) {
            let kp: Vec<f64> = a["keypoints"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            for (n, t) in names.iter().zip(kp.chunks(3)) {
                if t.len() == 3 && t[2] > 0.0 {
                    entry.content.landmarks.push(Landmark {
                        name: n.clone(),
                        voxel: [t[0] - 0.5, t[1] - 0.5, k as f64],
                    });
                }
            }
            continue;
        }
        let class = u16::try_from(category)
            .ok()
            .filter(|c| project.label(*c).is_some())
            .ok_or_else(|| {
                format!(
                    "category {category} is not a class of project {}",
                    project.id
                )
            })?;
        match &a["segmentation"] {
            Value::Object(rle) => {
                let size = rle["size"].as_array().ok_or("an RLE has no size")?;
                let (h, w) = (
                    size.first().and_then(Value::as_u64).unwrap_or(0) as usize,
                    size.get(1).and_then(Value::as_u64).unwrap_or(0) as usize,
                );
                if (w, h) != (grid.shape[0], grid.shape[1]) {
                    return Err(format!(
                        "an RLE of {h}x{w} does not fit case {case}'s {}x{} slices",
                        grid.shape[1], grid.shape[0]
                    ));
                }
                let counts = match &rle["counts"] {
                    Value::String(s) => rle_from_string(s).ok_or("a malformed RLE string")?,
                    Value::Array(v) => v
                        .iter()
                        .map(|c| c.as_u64().ok_or("a malformed RLE count"))
                        .collect::<Result<_, _>>()?,
                    _ => return Err("an RLE has no counts".into()),
                };
                let m = rle_mask(&counts, w, h).ok_or("RLE counts do not cover the slice")?;
                let map = entry
                    .mask
                    .get_or_insert_with(|| LabelMap::empty(grid.clone()));
                for ((i, j), v) in m.indexed_iter() {
                    if *v {
                        map.data[[i, j, k]] = class;
                    }
                }
            }
            Value::Array(polys) if !polys.is_empty() => {
                for poly in polys {
                    let flat: Vec<f64> = poly
                        .as_array()
                        .ok_or("a polygon is not a list of numbers")?
                        .iter()
                        .filter_map(Value::as_f64)
                        .collect();
                    let points: Vec<[f64; 2]> = flat
                        .chunks(2)
                        .filter(|c| c.len() == 2)
                        .map(|c| [c[0] - 0.5, c[1] - 0.5])
                        .collect();
                    entry.content.outlines.push(Outline {
                        class,
                        slice: k as u32,
                        closed: true,
                        points,
                    });
                }
            }
            _ => {
                let b: Vec<f64> = a["bbox"]
                    .as_array()
                    .ok_or("an annotation has neither segmentation nor bbox")?
                    .iter()
                    .filter_map(Value::as_f64)
                    .collect();
                if b.len() != 4 {
                    return Err("a bbox needs four numbers".into());
                }
                entry.content.boxes.push(BoundingBox {
                    class,
                    slice: Some(k as u32),
                    min: [b[0] - 0.5, b[1] - 0.5, k as f64],
                    max: [b[0] - 0.5 + b[2], b[1] - 0.5 + b[3], k as f64],
                });
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
    fn rle_round_trips_and_stores_count_differences() {
        // A 3x4 (h x w) mask, column-major: [0,0,1, 0,1,1, 0,0,0, 1,1,1].
        let mut m = Array2::from_elem((4, 3), false);
        for (i, j) in [(0, 2), (1, 1), (1, 2), (3, 0), (3, 1), (3, 2)] {
            m[[i, j]] = true;
        }
        let counts = rle_counts(&m);
        assert_eq!(counts, vec![2, 1, 1, 2, 3, 3]);
        assert_eq!(rle_mask(&counts, 4, 3), Some(m));
        for c in [
            vec![0u64, 5],
            vec![7, 1, 100, 2, 1, 70000],
            vec![1, 2, 3, 4, 5, 4, 3, 2, 1, 0],
        ] {
            assert_eq!(rle_from_string(&rle_to_string(&c)), Some(c));
        }
        // From the fourth count on, the difference to the count two before is stored.
        assert_eq!(rle_to_string(&[2, 1, 1, 2, 3, 3]), "211121");
        assert_eq!(rle_from_string("\u{1}"), None);
    }
}
