//! DICOM Segmentation (binary): a label map written as a Segmentation Storage object that
//! references the de-identified instances and frame of reference it was drawn on.
//!
//! One segment per class present; one frame per (segment, slice) with any voxel (empty frames
//! are left out, as highdicom does by default), bit-packed (1 bit per pixel, first pixel in the
//! least significant bit, frames packed one after another). A frame's rows run along the label
//! map's j axis and its columns along i; its position and orientation come from the image's
//! affine (LPS, as DICOM has it), so any stacking order of the source reads back in the same
//! place. Dimensions: referenced segment number, then image position (patient). Every frame
//! names its source instance (Derivation Image Sequence, purpose 121322), and the Common
//! Instance Reference module names the source series. Patient, study and frame of reference
//! come from the de-identified source instance, so the SEG is as de-identified as the source.

use dicom_core::value::{DataSetSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject, mem::InMemElement};

use crate::labelmap::LabelMap;
use crate::model::{Code, Project, Source};

/// Segmentation Storage.
pub const SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";

/// Label Map Segmentation Storage.
pub const LABEL_MAP_SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.7";

/// The source instance of one slice of the label map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSlice {
    pub sop_class: String,
    pub sop_instance: String,
}

/// What the SEG refers to and copies.
#[derive(Debug)]
pub struct SegSource<'a> {
    /// A de-identified instance of the source series: patient, study, frame of reference are
    /// copied from it.
    pub reference: &'a InMemDicomObject,
    pub series_uid: String,
    /// The source instance of each slice k of the label map (`None`: no instance there).
    pub slices: Vec<Option<SourceSlice>>,
}

/// The new object's identity.
#[derive(Clone, Debug)]
pub struct SegIdentity {
    pub series_uid: String,
    pub instance_uid: String,
    pub series_number: i32,
    /// DICOM date and time (YYYYMMDD, HHMMSS).
    pub date: String,
    pub time: String,
    /// Who made it (a rater's account name, or the model).
    pub creator: String,
    /// How it was made, and the model for proposals.
    pub source: Source,
    pub model: Option<(String, String)>,
}

/// A `2.25.` UID from 128 bits of a hex digest.
pub fn uid_from_hex(hex: &str) -> Option<String> {
    let v = u128::from_str_radix(hex.get(..32)?, 16).ok()?;
    Some(format!("2.25.{v}"))
}

fn text(tag: Tag, vr: VR, value: &str) -> InMemElement {
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

fn us(tag: Tag, v: u16) -> InMemElement {
    DataElement::new(tag, VR::US, PrimitiveValue::from(v))
}

fn ds(tag: Tag, values: &[f64]) -> InMemElement {
    let s: Vec<String> = values.iter().map(|v| format_ds(*v)).collect();
    DataElement::new(tag, VR::DS, PrimitiveValue::Strs(s.into()))
}

/// A decimal string of at most 16 characters.
fn format_ds(v: f64) -> String {
    let v = if v == 0.0 { 0.0 } else { v };
    for precision in (0..=10).rev() {
        let s = format!("{v:.precision$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        };
        if s.len() <= 16 {
            return s;
        }
    }
    format!("{v:.3e}")
}

fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> InMemElement {
    DataElement::new(
        tag,
        VR::SQ,
        Value::from(DataSetSequence::new(items, Length::UNDEFINED)),
    )
}

fn item(elements: Vec<InMemElement>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

fn code(c: &Code) -> InMemDicomObject {
    item(vec![
        text(Tag(0x0008, 0x0100), VR::SH, &c.value),
        text(Tag(0x0008, 0x0102), VR::SH, &c.scheme),
        text(Tag(0x0008, 0x0104), VR::LO, &c.meaning),
    ])
}

fn code3(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    code(&Code {
        scheme: scheme.into(),
        value: value.into(),
        meaning: meaning.into(),
    })
}

/// LPS coordinates of a voxel (the affine maps to RAS).
fn lps(map: &LabelMap, v: [f64; 3]) -> [f64; 3] {
    let r = map.grid.to_mm(v);
    [-r[0], -r[1], r[2]]
}

fn unit(v: [f64; 3]) -> [f64; 3] {
    let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
    if n == 0.0 {
        v
    } else {
        [v[0] / n, v[1] / n, v[2] / n]
    }
}

/// Attributes copied from the source instance (patient, study, frame of reference and the
/// de-identification record).
const COPIED: &[Tag] = &[
    Tag(0x0008, 0x0005),
    Tag(0x0008, 0x0020),
    Tag(0x0008, 0x0030),
    Tag(0x0008, 0x0050),
    Tag(0x0008, 0x0090),
    Tag(0x0010, 0x0010),
    Tag(0x0010, 0x0020),
    Tag(0x0010, 0x0030),
    Tag(0x0010, 0x0040),
    Tag(0x0012, 0x0062),
    Tag(0x0012, 0x0063),
    Tag(0x0012, 0x0064),
    Tag(0x0020, 0x000D),
    Tag(0x0020, 0x0010),
    Tag(0x0020, 0x0052),
    Tag(0x0020, 0x1040),
];

/// The binary SEG file (explicit VR little endian) of `map`, or why not.
pub fn binary_seg(
    project: &Project,
    map: &LabelMap,
    source: &SegSource<'_>,
    id: &SegIdentity,
) -> Result<Vec<u8>, String> {
    build(project, map, source, id, false)
}

/// The label-map SEG file (Label Map Segmentation Storage): one frame per slice with any
/// label, each pixel the number of its segment (the classes present, in value order, numbered
/// from 1), 8 bits (16 past 255 segments).
pub fn labelmap_seg(
    project: &Project,
    map: &LabelMap,
    source: &SegSource<'_>,
    id: &SegIdentity,
) -> Result<Vec<u8>, String> {
    build(project, map, source, id, true)
}

fn build(
    project: &Project,
    map: &LabelMap,
    source: &SegSource<'_>,
    id: &SegIdentity,
    labelmap: bool,
) -> Result<Vec<u8>, String> {
    let class_uid = if labelmap {
        LABEL_MAP_SEGMENTATION_STORAGE
    } else {
        SEGMENTATION_STORAGE
    };
    let [ni, nj, nk] = map.grid.shape;
    if source.slices.len() != nk {
        return Err(format!(
            "the label map has {nk} slices and the source series {}",
            source.slices.len()
        ));
    }
    if ni > usize::from(u16::MAX) || nj > usize::from(u16::MAX) {
        return Err("the image is too large for a DICOM frame".into());
    }
    if source.reference.get(Tag(0x0020, 0x0052)).is_none() {
        return Err("the source has no Frame of Reference UID".into());
    }
    let present = map.present();
    if present.is_empty() {
        return Err("the label map is empty: there is nothing to segment".into());
    }
    let mut o = InMemDicomObject::new_empty();
    for t in COPIED {
        if let Some(e) = source.reference.get(*t) {
            o.put(e.clone());
        }
    }
    for t in [
        Tag(0x0010, 0x0010),
        Tag(0x0010, 0x0020),
        Tag(0x0010, 0x0030),
        Tag(0x0010, 0x0040),
        Tag(0x0008, 0x0020),
        Tag(0x0008, 0x0030),
        Tag(0x0008, 0x0050),
        Tag(0x0008, 0x0090),
        Tag(0x0020, 0x0010),
        Tag(0x0020, 0x1040),
    ] {
        if o.get(t).is_none() {
            o.put(DataElement::new(t, dictionary_vr(t), PrimitiveValue::Empty));
        }
    }
    let algorithm = match id.source {
        Source::Proposal | Source::ProposalAccepted => "AUTOMATIC",
        Source::ProposalModified | Source::Consensus => "SEMIAUTOMATIC",
        _ => "MANUAL",
    };
    o.put(text(Tag(0x0008, 0x0016), VR::UI, class_uid));
    o.put(text(Tag(0x0008, 0x0018), VR::UI, &id.instance_uid));
    o.put(DataElement::new(
        Tag(0x0008, 0x0008),
        VR::CS,
        PrimitiveValue::Strs(vec!["DERIVED".to_owned(), "PRIMARY".to_owned()].into()),
    ));
    o.put(text(Tag(0x0008, 0x0023), VR::DA, &id.date));
    o.put(text(Tag(0x0008, 0x0033), VR::TM, &id.time));
    o.put(text(Tag(0x0008, 0x0060), VR::CS, "SEG"));
    o.put(text(Tag(0x0008, 0x0070), VR::LO, "fedcurate"));
    o.put(text(Tag(0x0008, 0x1090), VR::LO, "fedcurate-node"));
    o.put(text(Tag(0x0018, 0x1000), VR::LO, "0"));
    o.put(text(Tag(0x0018, 0x1020), VR::LO, env!("CARGO_PKG_VERSION")));
    o.put(text(Tag(0x0020, 0x000E), VR::UI, &id.series_uid));
    o.put(text(
        Tag(0x0020, 0x0011),
        VR::IS,
        &id.series_number.to_string(),
    ));
    o.put(text(Tag(0x0020, 0x0013), VR::IS, "1"));
    o.put(us(Tag(0x0028, 0x0002), 1));
    o.put(text(Tag(0x0028, 0x0004), VR::CS, "MONOCHROME2"));
    o.put(us(Tag(0x0028, 0x0010), nj as u16));
    o.put(us(Tag(0x0028, 0x0011), ni as u16));
    let bits_allocated: u16 = match (labelmap, present.len()) {
        (false, _) => 1,
        (true, n) if n < 256 => 8,
        (true, _) => 16,
    };
    o.put(us(Tag(0x0028, 0x0100), bits_allocated));
    o.put(us(Tag(0x0028, 0x0101), bits_allocated));
    o.put(us(Tag(0x0028, 0x0102), bits_allocated - 1));
    o.put(us(Tag(0x0028, 0x0103), 0));
    o.put(text(Tag(0x0028, 0x2110), VR::CS, "00"));
    o.put(text(
        Tag(0x0062, 0x0001),
        VR::CS,
        if labelmap { "LABELMAP" } else { "BINARY" },
    ));
    o.put(text(Tag(0x0070, 0x0080), VR::CS, "SEGMENTATION"));
    o.put(text(
        Tag(0x0070, 0x0081),
        VR::LO,
        &format!("fedcurate annotation project {}", project.id),
    ));
    o.put(text(Tag(0x0070, 0x0084), VR::PN, &id.creator));
    // Segments.
    let segments: Vec<InMemDicomObject> = present
        .iter()
        .enumerate()
        .map(|(n, &value)| {
            let class = project.label(value);
            let name = class.map_or_else(|| format!("label {value}"), |c| c.name.clone());
            let tissue = Code {
                scheme: "SCT".into(),
                value: "85756007".into(),
                meaning: "Tissue".into(),
            };
            let category = class
                .and_then(|c| c.category.clone())
                .unwrap_or(tissue.clone());
            let kind = class
                .and_then(|c| c.property_type.clone())
                .unwrap_or(tissue);
            let mut e = vec![
                us(Tag(0x0062, 0x0004), (n + 1) as u16),
                text(Tag(0x0062, 0x0005), VR::LO, &name),
                text(Tag(0x0062, 0x0008), VR::CS, algorithm),
                seq(Tag(0x0062, 0x0003), vec![code(&category)]),
                seq(Tag(0x0062, 0x000F), vec![code(&kind)]),
            ];
            if algorithm != "MANUAL" {
                let name = id
                    .model
                    .as_ref()
                    .map_or_else(|| "fedcurate".to_owned(), |m| format!("{} {}", m.0, m.1));
                e.push(text(Tag(0x0062, 0x0009), VR::LO, &name));
                // Algorithm family (CID 7162): a model's work, or a computation over raters'.
                e.push(seq(
                    Tag(0x0066, 0x002F),
                    vec![if id.model.is_some() && id.source != Source::Consensus {
                        code3("123110", "DCM", "Artificial Intelligence")
                    } else {
                        code3("123109", "DCM", "Manual Processing")
                    }],
                ));
            }
            item(e)
        })
        .collect();
    o.put(seq(Tag(0x0062, 0x0002), segments));
    // Geometry.
    let a = &map.grid.affine;
    let col_dir = |c: usize| {
        let v = [a[0][c], a[1][c], a[2][c]];
        unit([-v[0], -v[1], v[2]])
    };
    let (row, column) = (col_dir(0), col_dir(1));
    let spacing = map.grid.spacing();
    o.put(seq(
        Tag(0x5200, 0x9229),
        vec![item(vec![
            seq(
                Tag(0x0028, 0x9110),
                vec![item(vec![
                    ds(Tag(0x0018, 0x0050), &[spacing[2]]),
                    ds(Tag(0x0018, 0x0088), &[spacing[2]]),
                    ds(Tag(0x0028, 0x0030), &[spacing[1], spacing[0]]),
                ])],
            ),
            seq(
                Tag(0x0020, 0x9116),
                vec![item(vec![ds(
                    Tag(0x0020, 0x0037),
                    &[row[0], row[1], row[2], column[0], column[1], column[2]],
                )])],
            ),
        ])],
    ));
    let organisation = format!("{}.1", id.series_uid);
    o.put(seq(
        Tag(0x0020, 0x9221),
        vec![item(vec![text(Tag(0x0020, 0x9164), VR::UI, &organisation)])],
    ));
    let pointer = |label: &str, index: Tag, group: Tag| {
        item(vec![
            text(Tag(0x0020, 0x9164), VR::UI, &organisation),
            DataElement::new(
                Tag(0x0020, 0x9165),
                VR::AT,
                PrimitiveValue::Tags(vec![index].into()),
            ),
            DataElement::new(
                Tag(0x0020, 0x9167),
                VR::AT,
                PrimitiveValue::Tags(vec![group].into()),
            ),
            text(Tag(0x0020, 0x9421), VR::LO, label),
        ])
    };
    let position_dimension = pointer(
        "ImagePositionPatient",
        Tag(0x0020, 0x0032),
        Tag(0x0020, 0x9113),
    );
    o.put(seq(
        Tag(0x0020, 0x9222),
        if labelmap {
            vec![position_dimension]
        } else {
            vec![
                pointer(
                    "ReferencedSegmentNumber",
                    Tag(0x0062, 0x000B),
                    Tag(0x0062, 0x000A),
                ),
                position_dimension,
            ]
        },
    ));
    // Frames: (segment, slice) for binary, slices for a label map.
    let pixels = ni * nj;
    let mut frames = Vec::new();
    let mut bits: Vec<u8> = Vec::new();
    let mut nbits = 0usize;
    let number_of = |v: u16| present.iter().position(|p| *p == v).map(|n| n + 1);
    let units: Vec<(Option<usize>, usize)> = if labelmap {
        (0..nk).map(|k| (None, k)).collect()
    } else {
        (0..present.len())
            .flat_map(|n| (0..nk).map(move |k| (Some(n), k)))
            .collect()
    };
    for (segment, k) in units {
        let slice = map.data.index_axis(ndarray::Axis(2), k);
        let hit = |v: u16| match segment {
            Some(n) => v == present[n],
            None => v != 0,
        };
        if !slice.iter().any(|v| hit(*v)) {
            continue;
        }
        let Some(src) = &source.slices[k] else {
            return Err(format!(
                "slice {k} has labelled voxels but no source instance in the series"
            ));
        };
        if labelmap {
            for r in 0..nj {
                for c in 0..ni {
                    let n = number_of(slice[[c, r]]).unwrap_or(0) as u16;
                    if bits_allocated == 8 {
                        bits.push(n as u8);
                    } else {
                        bits.extend_from_slice(&n.to_le_bytes());
                    }
                }
            }
        } else {
            bits.resize((nbits + pixels).div_ceil(8), 0);
            for r in 0..nj {
                for c in 0..ni {
                    if hit(slice[[c, r]]) {
                        let b = nbits + r * ni + c;
                        bits[b / 8] |= 1 << (b % 8);
                    }
                }
            }
            nbits += pixels;
        }
        let position = lps(map, [0.0, 0.0, k as f64]);
        let index: Vec<u32> = match segment {
            Some(n) => vec![(n + 1) as u32, (k + 1) as u32],
            None => vec![(k + 1) as u32],
        };
        let mut groups = vec![
            seq(
                Tag(0x0008, 0x9124),
                vec![item(vec![
                    seq(
                        Tag(0x0008, 0x2112),
                        vec![item(vec![
                            text(Tag(0x0008, 0x1150), VR::UI, &src.sop_class),
                            text(Tag(0x0008, 0x1155), VR::UI, &src.sop_instance),
                            seq(
                                Tag(0x0040, 0xA170),
                                vec![code3(
                                    "121322",
                                    "DCM",
                                    "Source image for image processing operation",
                                )],
                            ),
                        ])],
                    ),
                    seq(
                        Tag(0x0008, 0x9215),
                        vec![code3("113076", "DCM", "Segmentation")],
                    ),
                ])],
            ),
            seq(
                Tag(0x0020, 0x9111),
                vec![item(vec![DataElement::new(
                    Tag(0x0020, 0x9157),
                    VR::UL,
                    PrimitiveValue::U32(index.into()),
                )])],
            ),
            seq(
                Tag(0x0020, 0x9113),
                vec![item(vec![ds(Tag(0x0020, 0x0032), &position)])],
            ),
        ];
        if let Some(n) = segment {
            groups.push(seq(
                Tag(0x0062, 0x000A),
                vec![item(vec![us(Tag(0x0062, 0x000B), (n + 1) as u16)])],
            ));
        }
        frames.push(item(groups));
    }
    o.put(text(Tag(0x0028, 0x0008), VR::IS, &frames.len().to_string()));
    o.put(seq(Tag(0x5200, 0x9230), frames));
    // The source series and its instances.
    let mut referenced: Vec<&SourceSlice> = source.slices.iter().flatten().collect();
    referenced.sort_by(|a, b| a.sop_instance.cmp(&b.sop_instance));
    referenced.dedup();
    o.put(seq(
        Tag(0x0008, 0x1115),
        vec![item(vec![
            seq(
                Tag(0x0008, 0x114A),
                referenced
                    .iter()
                    .map(|s| {
                        item(vec![
                            text(Tag(0x0008, 0x1150), VR::UI, &s.sop_class),
                            text(Tag(0x0008, 0x1155), VR::UI, &s.sop_instance),
                        ])
                    })
                    .collect(),
            ),
            text(Tag(0x0020, 0x000E), VR::UI, &source.series_uid),
        ])],
    ));
    if bits.len() % 2 == 1 {
        bits.push(0);
    }
    o.put(if bits_allocated == 16 {
        let words: Vec<u16> = bits
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c.get(1).copied().unwrap_or(0)]))
            .collect();
        DataElement::new(
            Tag(0x7FE0, 0x0010),
            VR::OW,
            PrimitiveValue::U16(words.into()),
        )
    } else {
        DataElement::new(Tag(0x7FE0, 0x0010), VR::OB, PrimitiveValue::U8(bits.into()))
    });
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(class_uid)
        .media_storage_sop_instance_uid(&id.instance_uid)
        .transfer_syntax(fc_read::ts::EXPLICIT_LE)
        .implementation_class_uid(fc_read::IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(fc_read::IMPLEMENTATION_VERSION_NAME)
        .build()
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    o.with_exact_meta(meta)
        .write_all(&mut out)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

fn dictionary_vr(t: Tag) -> VR {
    match t {
        Tag(0x0010, 0x0010) | Tag(0x0008, 0x0090) => VR::PN,
        Tag(0x0010, 0x0030) | Tag(0x0008, 0x0020) => VR::DA,
        Tag(0x0008, 0x0030) => VR::TM,
        Tag(0x0010, 0x0040) => VR::CS,
        Tag(0x0008, 0x0050) | Tag(0x0020, 0x0010) => VR::SH,
        _ => VR::LO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_fit_sixteen_characters() {
        for v in [
            0.0,
            -0.0,
            1.0,
            0.5,
            -123.456_789_012_345,
            1e-9,
            98_765.432_101_234_5,
        ] {
            let s = format_ds(v);
            assert!(s.len() <= 16, "{s}");
            assert!((s.parse::<f64>().unwrap_or(f64::NAN) - v).abs() < 1e-6 * (1.0 + v.abs()));
        }
        assert_eq!(format_ds(-0.0), "0");
        assert_eq!(uid_from_hex("ff").as_deref(), None);
        let u = uid_from_hex(&"f".repeat(64)).unwrap_or_default();
        assert!(u.starts_with("2.25.") && u.len() <= 64);
    }
}
