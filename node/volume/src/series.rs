//! DICOM series to volumes: group instances (and frames of enhanced multi-frame objects),
//! sort slices by their position along the slice normal, decode pixel data, apply Rescale
//! Slope/Intercept, and compute the affine from Image Orientation/Position (Patient),
//! converted from DICOM LPS to NIfTI RAS. Geometry problems are findings, not errors.

use std::collections::BTreeMap;

use dicom_core::Tag;
use dicom_core::value::Value;
use dicom_object::{DefaultDicomObject, InMemDicomObject};
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder};
use ndarray::{Array4, Axis, ShapeBuilder};

use super::{Affine, StoredType, Volume};

/// A geometry or decoding problem of a series.
#[derive(Clone, Debug, PartialEq)]
pub enum SeriesFinding {
    /// Gaps larger than the median spacing by more than half of it: slices are missing.
    MissingSlices { gaps: usize },
    /// Spacing between slices varies by more than 1 %.
    UnevenSpacing { min: f64, max: f64 },
    /// Two or more slices at the same position (the first is kept).
    DuplicatePositions { count: usize },
    /// The series mixes orientations (split into several volumes).
    MixedOrientation,
    /// The series mixes matrix sizes (split into several volumes).
    MixedSize,
    /// Slices are not stacked along the normal of their planes (gantry tilt).
    GantryTilt { degrees: f64 },
    /// The pixel data cannot be decoded (transfer syntax or codec).
    Undecodable {
        transfer_syntax: String,
        detail: String,
    },
    /// No usable geometry (orientation or position missing).
    NoGeometry,
}

impl SeriesFinding {
    /// Machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingSlices { .. } => "missing-slices",
            Self::UnevenSpacing { .. } => "uneven-spacing",
            Self::DuplicatePositions { .. } => "duplicate-positions",
            Self::MixedOrientation => "mixed-orientation",
            Self::MixedSize => "mixed-size",
            Self::GantryTilt { .. } => "gantry-tilt",
            Self::Undecodable { .. } => "undecodable",
            Self::NoGeometry => "no-geometry",
        }
    }
}

/// One assembled volume of a series.
#[derive(Debug)]
pub struct AssembledVolume {
    /// The series' (de-identified) Series Instance UID.
    pub series_uid: String,
    /// The study's (de-identified) Study Instance UID.
    pub study_uid: String,
    /// Patient pseudonym (Patient ID of the de-identified object).
    pub patient: String,
    pub modality: String,
    /// Patient's Sex of the de-identified object (kept only under Retain Patient
    /// Characteristics), `unknown` otherwise.
    pub sex: String,
    /// Index of this volume within its series (echoes, orientations, sizes).
    pub part: usize,
    /// The (first) volume.
    pub volume: Option<Volume>,
    /// The further volumes of a 4D series, in acquisition order: fMRI time points (by
    /// Temporal Position Identifier), diffusion-weighted volumes (by b-value and gradient).
    /// Empty for a 3D series.
    pub more: Vec<Volume>,
    /// For a diffusion series, per volume (`volume`, then `more`): the b-value (s/mm²) and the
    /// gradient direction in patient coordinates (DICOM LPS, unit length; zero for b = 0).
    pub diffusion: Vec<(f64, [f64; 3])>,
    /// Seconds between volumes (Repetition Time) of a 4D series.
    pub repetition_s: Option<f64>,
    pub findings: Vec<SeriesFinding>,
}

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| {
            e.value()
                .to_str()
                .ok()
                .map(|s| s.trim_matches([' ', '\0']).to_owned())
        })
        .filter(|s| !s.is_empty())
}

fn floats(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    let e = obj.get(tag)?;
    e.value().to_multi_float64().ok().filter(|v| !v.is_empty())
}

fn number(obj: &InMemDicomObject, tag: Tag) -> Option<f64> {
    floats(obj, tag).and_then(|v| v.first().copied())
}

fn first_item(obj: &InMemDicomObject, tag: Tag) -> Option<&InMemDicomObject> {
    match obj.get(tag)?.value() {
        Value::Sequence(s) => s.items().first(),
        _ => None,
    }
}

/// Look up a functional-group attribute: per-frame item first, then shared.
fn functional(
    per_frame: Option<&InMemDicomObject>,
    shared: Option<&InMemDicomObject>,
    group: Tag,
    tag: Tag,
) -> Option<Vec<f64>> {
    [per_frame, shared]
        .into_iter()
        .flatten()
        .find_map(|g| first_item(g, group).and_then(|i| floats(i, tag)))
}

/// Decoded frames of one object `(slice index, values)`, or `(object, why)` it failed.
type DecodedObject = Result<Vec<(usize, Vec<f32>)>, (usize, String)>;

/// Volumes of a series are split by orientation (rounded), rows, columns and echo (as
/// dcm2niix writes one file per echo); time points and diffusion directions stack into 4D.
type GroupKey = (Vec<i64>, u32, u32, i64);

/// What tells the volumes of a 4D group apart: temporal position, b-value and gradient
/// (rounded).
type VolumeKey = (i64, i64, [i64; 3]);

/// One slice: a single-frame instance or one frame of a multi-frame instance.
#[derive(Clone, Debug)]
struct Slice {
    object: usize,
    frame: u32,
    iop: [f64; 6],
    ipp: [f64; 3],
    spacing: [f64; 2],
    rows: u32,
    cols: u32,
    slope: f64,
    intercept: f64,
    echo: i64,
    temporal: i64,
    /// Diffusion b-value and gradient direction (LPS), if the frame says.
    bvalue: Option<f64>,
    gradient: Option<[f64; 3]>,
    instance: i64,
}

const PLANE_POSITION: Tag = Tag(0x0020, 0x9113);
const PLANE_ORIENTATION: Tag = Tag(0x0020, 0x9116);
const PIXEL_MEASURES: Tag = Tag(0x0028, 0x9110);
const PIXEL_VALUE_TRANSFORMATION: Tag = Tag(0x0028, 0x9145);
const IPP: Tag = Tag(0x0020, 0x0032);
const IOP: Tag = Tag(0x0020, 0x0037);
const PIXEL_SPACING: Tag = Tag(0x0028, 0x0030);
const SLOPE: Tag = Tag(0x0028, 0x1053);
const INTERCEPT: Tag = Tag(0x0028, 0x1052);
const MR_DIFFUSION: Tag = Tag(0x0018, 0x9117);
const B_VALUE: Tag = Tag(0x0018, 0x9087);
const GRADIENT_SEQUENCE: Tag = Tag(0x0018, 0x9076);
const GRADIENT: Tag = Tag(0x0018, 0x9089);

fn slices_of(index: usize, obj: &InMemDicomObject) -> Vec<Slice> {
    let rows = number(obj, Tag(0x0028, 0x0010)).unwrap_or(0.0) as u32;
    let cols = number(obj, Tag(0x0028, 0x0011)).unwrap_or(0.0) as u32;
    let echo = number(obj, Tag(0x0018, 0x0086)).unwrap_or(0.0) as i64;
    let temporal = number(obj, Tag(0x0020, 0x0100)).unwrap_or(0.0) as i64;
    let instance = number(obj, Tag(0x0020, 0x0013)).unwrap_or(0.0) as i64;
    // No geometry, no slices; and never more frames than the pixel data can hold (a declared
    // count of 2^31 frames over 64 bytes is not iterated).
    if rows == 0 || cols == 0 {
        return Vec::new();
    }
    let frames = (number(obj, Tag(0x0028, 0x0008)).unwrap_or(1.0).max(1.0) as u32)
        .min(frames_held(obj, rows, cols));
    let per_frame: Vec<InMemDicomObject> = match obj.get(Tag(0x5200, 0x9230)).map(|e| e.value()) {
        Some(Value::Sequence(s)) => s.items().to_vec(),
        _ => Vec::new(),
    };
    let shared = first_item(obj, Tag(0x5200, 0x9229));
    let as3 = |v: &[f64]| [v[0], v[1], v[2]];
    let as6 = |v: &[f64]| [v[0], v[1], v[2], v[3], v[4], v[5]];
    let mut out = Vec::new();
    for frame in 0..frames {
        let pf = per_frame.get(frame as usize);
        let iop = functional(pf, shared, PLANE_ORIENTATION, IOP).or_else(|| floats(obj, IOP));
        let ipp = functional(pf, shared, PLANE_POSITION, IPP).or_else(|| floats(obj, IPP));
        let spacing = functional(pf, shared, PIXEL_MEASURES, PIXEL_SPACING)
            .or_else(|| floats(obj, PIXEL_SPACING));
        let slope = functional(pf, shared, PIXEL_VALUE_TRANSFORMATION, SLOPE)
            .or_else(|| floats(obj, SLOPE));
        let intercept = functional(pf, shared, PIXEL_VALUE_TRANSFORMATION, INTERCEPT)
            .or_else(|| floats(obj, INTERCEPT));
        let (Some(iop), Some(ipp)) = (iop.filter(|v| v.len() >= 6), ipp.filter(|v| v.len() >= 3))
        else {
            continue;
        };
        let spacing = spacing
            .filter(|v| v.len() >= 2)
            .map_or([1.0, 1.0], |v| [v[0], v[1]]);
        // Diffusion: in the frame's MR Diffusion functional group, or at the top level.
        let diffusion = [pf, shared]
            .into_iter()
            .flatten()
            .find_map(|g| first_item(g, MR_DIFFUSION));
        let bvalue = diffusion
            .and_then(|d| floats(d, B_VALUE))
            .or_else(|| floats(obj, B_VALUE))
            .and_then(|v| v.first().copied())
            .filter(|b| b.is_finite() && *b >= 0.0);
        let gradient = diffusion
            .and_then(|d| first_item(d, GRADIENT_SEQUENCE))
            .and_then(|g| floats(g, GRADIENT))
            .or_else(|| floats(obj, GRADIENT))
            .filter(|g| g.len() >= 3 && g.iter().all(|x| x.is_finite()))
            .map(|g| [g[0], g[1], g[2]]);
        out.push(Slice {
            object: index,
            frame,
            iop: as6(&iop),
            ipp: as3(&ipp),
            spacing,
            rows,
            cols,
            slope: slope.and_then(|v| v.first().copied()).unwrap_or(1.0),
            intercept: intercept.and_then(|v| v.first().copied()).unwrap_or(0.0),
            echo,
            temporal,
            bvalue,
            gradient,
            instance,
        });
    }
    out
}

/// How many frames an object's pixel data can hold: native data by its bytes and the frame
/// size, encapsulated data by its fragments (each frame has at least one).
fn frames_held(obj: &InMemDicomObject, rows: u32, cols: u32) -> u32 {
    match obj.get(Tag(0x7FE0, 0x0010)).map(|e| e.value()) {
        Some(Value::Primitive(p)) => {
            let samples = number(obj, Tag(0x0028, 0x0002)).unwrap_or(1.0).max(1.0) as u64;
            let bits = number(obj, Tag(0x0028, 0x0100)).unwrap_or(8.0).max(1.0) as u64;
            let frame_bits = u64::from(rows) * u64::from(cols) * samples * bits;
            let held_bits = (p.calculate_byte_len() as u64).saturating_mul(8);
            u32::try_from(held_bits / frame_bits.max(1)).unwrap_or(u32::MAX)
        }
        Some(Value::PixelSequence(seq)) => {
            u32::try_from(seq.fragments().len().max(1)).unwrap_or(u32::MAX)
        }
        _ => 0,
    }
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Assemble the volumes of a set of (de-identified) DICOM objects.
pub fn assemble(objects: &[DefaultDicomObject]) -> Vec<AssembledVolume> {
    // series uid -> slices
    let mut by_series: BTreeMap<String, Vec<Slice>> = BTreeMap::new();
    let mut no_geometry: BTreeMap<String, usize> = BTreeMap::new();
    for (i, obj) in objects.iter().enumerate() {
        if obj.get(Tag(0x7FE0, 0x0010)).is_none() {
            continue;
        }
        let series = text(obj, Tag(0x0020, 0x000E)).unwrap_or_default();
        let s = slices_of(i, obj);
        if s.is_empty() {
            *no_geometry.entry(series).or_default() = i;
            continue;
        }
        by_series.entry(series).or_default().extend(s);
    }
    let mut out = Vec::new();
    for (series, obj_index) in no_geometry {
        if !by_series.contains_key(&series) {
            let obj = &objects[obj_index];
            out.push(AssembledVolume {
                series_uid: series,
                study_uid: text(obj, Tag(0x0020, 0x000D)).unwrap_or_default(),
                patient: text(obj, Tag(0x0010, 0x0020)).unwrap_or_default(),
                modality: text(obj, Tag(0x0008, 0x0060)).unwrap_or_default(),
                sex: text(obj, Tag(0x0010, 0x0040)).unwrap_or_else(|| "unknown".into()),
                part: 0,
                volume: None,
                more: Vec::new(),
                diffusion: Vec::new(),
                repetition_s: None,
                findings: vec![SeriesFinding::NoGeometry],
            });
        }
    }
    for (series, slices) in by_series {
        // Sub-groups by orientation, size and echo.
        let mut groups: BTreeMap<GroupKey, Vec<Slice>> = BTreeMap::new();
        for s in slices {
            let key = (
                s.iop.iter().map(|v| (v * 1e4).round() as i64).collect(),
                s.rows,
                s.cols,
                s.echo,
            );
            groups.entry(key).or_default().push(s);
        }
        let orientations: std::collections::BTreeSet<Vec<i64>> =
            groups.keys().map(|k| k.0.clone()).collect();
        let sizes: std::collections::BTreeSet<(u32, u32)> =
            groups.keys().map(|k| (k.1, k.2)).collect();
        let mut part = 0;
        for (_, group) in groups {
            let first = &objects[group[0].object];
            let mut common = Vec::new();
            if orientations.len() > 1 {
                common.push(SeriesFinding::MixedOrientation);
            }
            if sizes.len() > 1 {
                common.push(SeriesFinding::MixedSize);
            }
            let repetition_s = number(first, Tag(0x0018, 0x0080))
                .filter(|t| t.is_finite() && *t > 0.0)
                .map(|ms| ms / 1000.0);
            let entry = |volume, more, diffusion, findings, part| AssembledVolume {
                series_uid: series.clone(),
                study_uid: text(first, Tag(0x0020, 0x000D)).unwrap_or_default(),
                patient: text(first, Tag(0x0010, 0x0020)).unwrap_or_default(),
                modality: text(first, Tag(0x0008, 0x0060)).unwrap_or_default(),
                sex: text(first, Tag(0x0010, 0x0040)).unwrap_or_else(|| "unknown".into()),
                part,
                volume,
                more,
                diffusion,
                repetition_s,
                findings,
            };
            let stacks = split_volumes(group);
            if stacks.len() > 1 && same_positions(&stacks) {
                // A 4D series: one volume per time point or diffusion direction.
                let mut findings = common.clone();
                let diffusion: Vec<(f64, [f64; 3])> =
                    if stacks.iter().any(|s| s[0].bvalue.is_some()) {
                        stacks
                            .iter()
                            .map(|s| (s[0].bvalue.unwrap_or(0.0), unit(s[0].gradient)))
                            .collect()
                    } else {
                        Vec::new()
                    };
                let mut volumes = Vec::new();
                for stack in stacks {
                    match build(objects, stack, &mut findings) {
                        Some(v) => volumes.push(v),
                        None => {
                            volumes.clear();
                            break;
                        }
                    }
                }
                findings.dedup();
                let mut it = volumes.into_iter();
                let first_volume = it.next();
                out.push(entry(first_volume, it.collect(), diffusion, findings, part));
                part += 1;
            } else {
                // Volumes that do not stack (or one volume): one part each, as before.
                for stack in stacks {
                    let mut findings = common.clone();
                    let volume = build(objects, stack, &mut findings);
                    out.push(entry(volume, Vec::new(), Vec::new(), findings, part));
                    part += 1;
                }
            }
        }
    }
    out
}

/// A gradient direction of unit length (zero when absent or zero).
fn unit(g: Option<[f64; 3]>) -> [f64; 3] {
    let g = g.unwrap_or([0.0; 3]);
    let n = dot(g, g).sqrt();
    if n > 1e-9 {
        [g[0] / n, g[1] / n, g[2] / n]
    } else {
        [0.0; 3]
    }
}

/// Split a group's slices into the volumes of a 4D series, in acquisition order (temporal
/// position, then the lowest instance number); one stack when nothing tells them apart.
fn split_volumes(group: Vec<Slice>) -> Vec<Vec<Slice>> {
    let key = |s: &Slice| -> VolumeKey {
        let g = unit(s.gradient);
        (
            s.temporal,
            s.bvalue.map_or(-1, |b| (b * 1e3).round() as i64),
            g.map(|x| (x * 1e4).round() as i64),
        )
    };
    let mut stacks: BTreeMap<VolumeKey, Vec<Slice>> = BTreeMap::new();
    for s in group {
        stacks.entry(key(&s)).or_default().push(s);
    }
    let mut out: Vec<Vec<Slice>> = stacks.into_values().collect();
    out.sort_by_key(|s| {
        (
            s[0].temporal,
            s.iter().map(|x| x.instance).min().unwrap_or(0),
        )
    });
    out
}

/// Whether every stack covers the same slice positions (a 4D series); stacks that do not
/// (a localiser beside its series, a partial repeat) stay separate volumes.
fn same_positions(stacks: &[Vec<Slice>]) -> bool {
    let positions = |s: &[Slice]| -> Vec<[i64; 3]> {
        let mut p: Vec<[i64; 3]> = s
            .iter()
            .map(|x| x.ipp.map(|v| (v * 100.0).round() as i64))
            .collect();
        p.sort();
        p.dedup();
        p
    };
    let first = positions(&stacks[0]);
    stacks
        .iter()
        .all(|s| s.len() == first.len() && positions(s) == first)
}

fn build(
    objects: &[DefaultDicomObject],
    mut slices: Vec<Slice>,
    findings: &mut Vec<SeriesFinding>,
) -> Option<Volume> {
    let row_dir = [slices[0].iop[0], slices[0].iop[1], slices[0].iop[2]];
    let col_dir = [slices[0].iop[3], slices[0].iop[4], slices[0].iop[5]];
    let normal = cross(row_dir, col_dir);
    slices.sort_by(|a, b| dot(a.ipp, normal).total_cmp(&dot(b.ipp, normal)));
    // Duplicate positions: keep the first.
    let before = slices.len();
    slices.dedup_by(|b, a| (dot(a.ipp, normal) - dot(b.ipp, normal)).abs() < 1e-3);
    if slices.len() < before {
        findings.push(SeriesFinding::DuplicatePositions {
            count: before - slices.len(),
        });
    }
    let positions: Vec<f64> = slices.iter().map(|s| dot(s.ipp, normal)).collect();
    let gaps: Vec<f64> = positions.windows(2).map(|w| w[1] - w[0]).collect();
    let step = if gaps.is_empty() {
        None
    } else {
        let mut sorted = gaps.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let missing = gaps.iter().filter(|g| **g > median * 1.5).count();
        if missing > 0 {
            findings.push(SeriesFinding::MissingSlices { gaps: missing });
        }
        let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
        if median > 0.0 && (max - min) / median > 0.01 {
            findings.push(SeriesFinding::UnevenSpacing { min, max });
        }
        Some(median)
    };
    // Slice vector: measured from first to last position (accounts for tilt).
    let n = slices.len();
    let (first, last) = (slices[0].ipp, slices[n - 1].ipp);
    let slice_vec = if n > 1 {
        let d = [last[0] - first[0], last[1] - first[1], last[2] - first[2]];
        [
            d[0] / (n - 1) as f64,
            d[1] / (n - 1) as f64,
            d[2] / (n - 1) as f64,
        ]
    } else {
        let t = step.unwrap_or(1.0);
        [normal[0] * t, normal[1] * t, normal[2] * t]
    };
    let len = dot(slice_vec, slice_vec).sqrt();
    if len > 0.0 {
        let cos = (dot(slice_vec, normal) / len).clamp(-1.0, 1.0);
        let degrees = cos.acos().to_degrees();
        if degrees > 0.5 {
            findings.push(SeriesFinding::GantryTilt { degrees });
        }
    }
    let (rows, cols) = (slices[0].rows as usize, slices[0].cols as usize);
    let [row_spacing, col_spacing] = slices[0].spacing;
    // LPS affine: i (column index) along the row direction, j (row index) along the column
    // direction, k along the measured slice vector; RAS negates the first two axes.
    let lps = [
        [
            row_dir[0] * col_spacing,
            col_dir[0] * row_spacing,
            slice_vec[0],
            first[0],
        ],
        [
            row_dir[1] * col_spacing,
            col_dir[1] * row_spacing,
            slice_vec[1],
            first[1],
        ],
        [
            row_dir[2] * col_spacing,
            col_dir[2] * row_spacing,
            slice_vec[2],
            first[2],
        ],
    ];
    let affine: Affine = [
        [-lps[0][0], -lps[0][1], -lps[0][2], -lps[0][3]],
        [-lps[1][0], -lps[1][1], -lps[1][2], -lps[1][3]],
        lps[2],
        [0.0, 0.0, 0.0, 1.0],
    ];
    // Decode pixel data, object by object.
    let samples = objects[slices[0].object]
        .get(Tag(0x0028, 0x0002))
        .and_then(|e| e.value().to_int::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    // What decoding would allocate must be backed by bytes the objects hold: a few bytes of
    // compressed data declaring a huge matrix or frame count is refused, not decoded.
    if let Some(detail) = implausible_decoded_size(objects, &slices, rows, cols, samples) {
        findings.push(SeriesFinding::Undecodable {
            transfer_syntax: objects[slices[0].object]
                .meta()
                .transfer_syntax()
                .trim_end_matches('\0')
                .to_owned(),
            detail,
        });
        return None;
    }
    // Fortran order: i (column) fastest, as in NIfTI files.
    let mut data = Array4::<f32>::zeros((cols, rows, n, samples).f());
    // Native single-sample frames are converted straight into their plane of the volume (in
    // that order a plane is a frame's rows one after the other), slices in parallel; the
    // others are decoded below, each object once.
    let mut general: Vec<usize> = (0..n).collect();
    if samples == 1
        && let Some(voxels) = data.as_slice_memory_order_mut()
    {
        use rayon::prelude::*;
        general = voxels
            .par_chunks_mut(rows * cols)
            .enumerate()
            .filter_map(|(k, plane)| {
                let s = &slices[k];
                let done = native_frame_into(
                    &objects[s.object],
                    s.frame,
                    plane,
                    s.slope as f32,
                    s.intercept as f32,
                );
                (!done).then_some(k)
            })
            .collect();
    }
    let mut by_object: BTreeMap<usize, Vec<(usize, u32)>> = BTreeMap::new();
    for &k in &general {
        let s = &slices[k];
        by_object.entry(s.object).or_default().push((k, s.frame));
    }
    let raw = ConvertOptions::new().with_modality_lut(ModalityLutOption::None);
    let decoded: Vec<DecodedObject> = {
        use rayon::prelude::*;
        by_object
            .par_iter()
            .map(|(&object, frames)| {
                let obj = &objects[object];
                let decoded = obj
                    .decode_pixel_data()
                    .map_err(|e| (object, e.to_string()))?;
                let mut out = Vec::with_capacity(frames.len());
                for &(k, frame) in frames {
                    let values = decoded
                        .to_vec_frame_with_options::<f32>(frame, &raw)
                        .map_err(|e| (object, e.to_string()))?;
                    if values.len() < rows * cols * samples {
                        return Err((object, "frame shorter than its geometry".to_owned()));
                    }
                    out.push((k, values));
                }
                Ok(out)
            })
            .collect()
    };
    let integral = slices
        .iter()
        .all(|s| s.slope.fract() == 0.0 && s.intercept.fract() == 0.0);
    for result in decoded {
        let frames = match result {
            Ok(f) => f,
            Err((object, detail)) => {
                findings.push(SeriesFinding::Undecodable {
                    transfer_syntax: objects[object]
                        .meta()
                        .transfer_syntax()
                        .trim_end_matches('\0')
                        .to_owned(),
                    detail,
                });
                return None;
            }
        };
        for (k, values) in frames {
            let s = &slices[k];
            let (slope, intercept) = (s.slope as f32, s.intercept as f32);
            for ch in 0..samples {
                let mut channel = data.index_axis_mut(Axis(3), ch);
                let mut plane = channel.index_axis_mut(Axis(2), k);
                for r in 0..rows {
                    for c in 0..cols {
                        plane[[c, r]] = values[(r * cols + c) * samples + ch] * slope + intercept;
                    }
                }
            }
        }
    }
    Some(finish(data, samples, integral, affine))
}

/// Decoded pixel data may exceed the encoded bytes by at most this factor, plus
/// [`DECODE_ALLOWANCE`] (lossless codecs reach 2 to 4, lossy JPEG 10 to 30; a constant
/// image compresses further but is then small).
const DECODE_RATIO: u64 = 64;
/// Decoded bytes allowed whatever the encoded size.
const DECODE_ALLOWANCE: u64 = 64 * 1024 * 1024;

/// Why decoding these slices would allocate more than their objects can back, if it would.
fn implausible_decoded_size(
    objects: &[DefaultDicomObject],
    slices: &[Slice],
    rows: usize,
    cols: usize,
    samples: usize,
) -> Option<String> {
    let frame_bytes = (rows as u64)
        .checked_mul(cols as u64)
        .and_then(|p| p.checked_mul(samples as u64))
        .and_then(|p| p.checked_mul(4));
    let total = frame_bytes.and_then(|f| f.checked_mul(slices.len() as u64));
    let mut held: u64 = 0;
    let mut seen = std::collections::BTreeSet::new();
    for s in slices {
        if seen.insert(s.object) {
            held = held.saturating_add(pixel_bytes_held(&objects[s.object]));
        }
    }
    let allowed = held
        .saturating_mul(DECODE_RATIO)
        .saturating_add(DECODE_ALLOWANCE);
    match total {
        Some(t) if t <= allowed => None,
        Some(t) => Some(format!(
            "{} frames of {rows}x{cols}x{samples} would decode to {t} bytes from {held} bytes of pixel data",
            slices.len()
        )),
        None => Some(format!(
            "{} frames of {rows}x{cols}x{samples} overflow any allocation",
            slices.len()
        )),
    }
}

/// Bytes of pixel data an object holds (native value or all fragments).
fn pixel_bytes_held(obj: &DefaultDicomObject) -> u64 {
    use dicom_core::value::Value;
    match obj.get(Tag(0x7FE0, 0x0010)).map(|e| e.value()) {
        Some(Value::Primitive(p)) => p.calculate_byte_len() as u64,
        Some(Value::PixelSequence(seq)) => seq.fragments().iter().map(|f| f.len() as u64).sum(),
        _ => 0,
    }
}

/// Raw stored values of one frame of native (uncompressed) single-sample pixel data, without
/// going through the general decoder: the common case, read at memory speed.
/// Write one native frame's values, rescaled (`raw * slope + intercept`), into `dst` (rows ×
/// columns, row by row); `false` when the frame is not one read directly (several samples,
/// an unusual bit layout, compressed, or shorter than its geometry).
fn native_frame_into(
    obj: &DefaultDicomObject,
    frame: u32,
    dst: &mut [f32],
    slope: f32,
    intercept: f32,
) -> bool {
    let int = |t: Tag| obj.get(t).and_then(|e| e.value().to_int::<u32>().ok());
    let (Some(rows), Some(cols), Some(bits)) = (
        int(Tag(0x0028, 0x0010)),
        int(Tag(0x0028, 0x0011)),
        int(Tag(0x0028, 0x0100)),
    ) else {
        return false;
    };
    let stored = int(Tag(0x0028, 0x0101)).unwrap_or(bits);
    let signed = int(Tag(0x0028, 0x0103)).unwrap_or(0) == 1;
    if int(Tag(0x0028, 0x0002)).unwrap_or(1) != 1 || stored == 0 || stored > bits {
        return false;
    }
    let n = rows as usize * cols as usize;
    if dst.len() != n {
        return false;
    }
    let start = n * frame as usize;
    let Some(Value::Primitive(p)) = obj.get(Tag(0x7FE0, 0x0010)).map(|e| e.value()) else {
        return false;
    };
    let mask = if stored >= 32 {
        u32::MAX
    } else {
        (1u32 << stored) - 1
    };
    let convert = |raw: u32| -> f32 {
        let v = raw & mask;
        let value = if signed && stored < 32 && v & (1 << (stored - 1)) != 0 {
            (i64::from(v) - (1i64 << stored)) as f32
        } else {
            v as f32
        };
        value * slope + intercept
    };
    // The common layouts, without masks: all 16 bits stored, signed or not.
    if bits == 16 && stored == 16 {
        let words: Option<&[u16]> = match p {
            dicom_core::PrimitiveValue::U16(v) => v.get(start..start + n),
            _ => None,
        };
        let signed_words: Option<&[i16]> = match p {
            dicom_core::PrimitiveValue::I16(v) => v.get(start..start + n),
            _ => None,
        };
        match (words, signed_words, signed) {
            (Some(w), _, true) => {
                for (d, x) in dst.iter_mut().zip(w) {
                    *d = f32::from(*x as i16) * slope + intercept;
                }
                return true;
            }
            (Some(w), _, false) => {
                for (d, x) in dst.iter_mut().zip(w) {
                    *d = f32::from(*x) * slope + intercept;
                }
                return true;
            }
            (None, Some(w), true) => {
                for (d, x) in dst.iter_mut().zip(w) {
                    *d = f32::from(*x) * slope + intercept;
                }
                return true;
            }
            (None, Some(w), false) => {
                for (d, x) in dst.iter_mut().zip(w) {
                    *d = f32::from(*x as u16) * slope + intercept;
                }
                return true;
            }
            _ => {}
        }
    }
    fn fill<T: Copy>(dst: &mut [f32], src: Option<&[T]>, f: impl Fn(T) -> f32) -> bool {
        match src {
            Some(src) if src.len() == dst.len() => {
                for (d, x) in dst.iter_mut().zip(src) {
                    *d = f(*x);
                }
                true
            }
            _ => false,
        }
    }
    match (p, bits) {
        (dicom_core::PrimitiveValue::U16(v), 16) => {
            fill(dst, v.get(start..start + n), |x| convert(u32::from(x)))
        }
        (dicom_core::PrimitiveValue::I16(v), 16) => fill(dst, v.get(start..start + n), |x| {
            convert(u32::from(x as u16))
        }),
        (dicom_core::PrimitiveValue::U8(v), 8) => {
            fill(dst, v.get(start..start + n), |x| convert(u32::from(x)))
        }
        (dicom_core::PrimitiveValue::U8(v), 16) => match v.get(2 * start..2 * (start + n)) {
            Some(bytes) => {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = convert(u32::from(u16::from_le_bytes([b[0], b[1]])));
                }
                true
            }
            None => false,
        },
        _ => false,
    }
}

fn finish(data: Array4<f32>, samples: usize, integral: bool, affine: Affine) -> Volume {
    let stored = if samples == 3 {
        StoredType::Rgb24
    } else if integral {
        let range = |(a, b): (f32, f32), v: &f32| (a.min(*v), b.max(*v));
        let (min, max) = match data.as_slice_memory_order() {
            Some(values) => values.iter().fold((f32::MAX, f32::MIN), range),
            None => data.iter().fold((f32::MAX, f32::MIN), range),
        };
        if min >= -32768.0 && max <= 32767.0 {
            StoredType::I16
        } else {
            StoredType::F32
        }
    } else {
        StoredType::F32
    };
    Volume {
        data,
        affine,
        stored,
    }
}
