//! Realistic DICOM built in code: the demo's sample archive and the tests' fixtures.
//!
//! Real archives vary, so the builder covers implicit and explicit VR little endian, explicit
//! big endian, deflated data sets, encapsulated (compressed) pixel data, multi-frame objects
//! with functional groups, nested sequences three and more levels deep, private creators and
//! private sequences, SR content trees, overlays, non-ASCII character sets and odd-length
//! values. Every identifying value is synthetic.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, PixelFragmentSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_object::mem::InMemElement;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

use crate::deid::dictionary::Dictionary;
use crate::deid::table::{RuleTable, TagPattern};

/// Transfer syntaxes the builder writes.
pub use crate::read::ts;

/// SOP classes used by the fixtures.
pub mod sop {
    pub const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    pub const ENHANCED_CT: &str = "1.2.840.10008.5.1.4.1.1.2.1";
    pub const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
    pub const US: &str = "1.2.840.10008.5.1.4.1.1.6.1";
    pub const SEG: &str = "1.2.840.10008.5.1.4.1.1.66.4";
    pub const BASIC_TEXT_SR: &str = "1.2.840.10008.5.1.4.1.1.88.11";
    pub const SECONDARY_CAPTURE: &str = "1.2.840.10008.5.1.4.1.1.7";
}

/// Root for the synthetic original UIDs (an example root, never used by a real device).
pub const ORIGINAL_UID_ROOT: &str = "1.2.826.0.1.3680043.10.543";

/// A synthetic patient.
#[derive(Clone, Debug)]
pub struct Patient {
    pub id: String,
    pub issuer: String,
    pub name: String,
    pub birth_date: String,
    pub sex: String,
    /// Specific Character Set of the patient's objects (`None`: default repertoire).
    pub charset: Option<String>,
}

/// Identifying values of one study.
#[derive(Clone, Debug)]
pub struct Study {
    pub uid: String,
    pub date: String,
    pub time: String,
    pub accession: String,
    pub description: String,
    pub referring_physician: String,
    pub institution: String,
}

/// One series.
#[derive(Clone, Debug)]
pub struct Series {
    pub uid: String,
    pub number: i32,
    pub description: String,
    pub frame_of_reference: String,
    pub station: String,
}

/// Append a text element.
pub fn put_text(obj: &mut InMemDicomObject, tag: Tag, vr: VR, value: &str) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
}

fn put_u16(obj: &mut InMemDicomObject, tag: Tag, value: u16) {
    obj.put(DataElement::new(tag, VR::US, PrimitiveValue::from(value)));
}

/// A sequence element.
pub fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> InMemElement {
    DataElement::new(
        tag,
        VR::SQ,
        Value::from(DataSetSequence::new(items, Length::UNDEFINED)),
    )
}

fn item(elements: Vec<InMemElement>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

fn text(tag: Tag, vr: VR, value: &str) -> InMemElement {
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

fn code_item(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    item(vec![
        text(Tag(0x0008, 0x0100), VR::SH, value),
        text(Tag(0x0008, 0x0102), VR::SH, scheme),
        text(Tag(0x0008, 0x0104), VR::LO, meaning),
    ])
}

/// Encode an object as a DICOM file (preamble, meta header, data set) in `transfer_syntax`.
pub fn encode(obj: InMemDicomObject, transfer_syntax: &str) -> io::Result<Vec<u8>> {
    let class = obj
        .get(Tag(0x0008, 0x0016))
        .and_then(|e| e.value().to_str().ok().map(|s| s.into_owned()))
        .unwrap_or_default();
    let instance = obj
        .get(Tag(0x0008, 0x0018))
        .and_then(|e| e.value().to_str().ok().map(|s| s.into_owned()))
        .unwrap_or_else(|| "1.2.3".to_owned());
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(class)
        .media_storage_sop_instance_uid(instance)
        .transfer_syntax(transfer_syntax)
        .implementation_class_uid("1.2.826.0.1.3680043.10.543.99")
        .implementation_version_name("MODALITY_X")
        .source_application_entity_title("CT_ROOM_3")
        .build()
        .map_err(io::Error::other)?;
    let file = obj.with_exact_meta(meta);
    let mut out = Vec::new();
    file.write_all(&mut out).map_err(io::Error::other)?;
    Ok(out)
}

/// The attributes shared by every image of a patient, study and series.
pub fn base_object(
    p: &Patient,
    st: &Study,
    se: &Series,
    sop_class: &str,
    sop_instance: &str,
    modality: &str,
) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    if let Some(cs) = &p.charset {
        put_text(&mut o, Tag(0x0008, 0x0005), VR::CS, cs);
    }
    put_text(
        &mut o,
        Tag(0x0008, 0x0008),
        VR::CS,
        "ORIGINAL\\PRIMARY\\AXIAL",
    );
    put_text(&mut o, Tag(0x0008, 0x0016), VR::UI, sop_class);
    put_text(&mut o, Tag(0x0008, 0x0018), VR::UI, sop_instance);
    put_text(&mut o, Tag(0x0008, 0x0020), VR::DA, &st.date);
    put_text(&mut o, Tag(0x0008, 0x0021), VR::DA, &st.date);
    put_text(&mut o, Tag(0x0008, 0x0023), VR::DA, &st.date);
    put_text(&mut o, Tag(0x0008, 0x0030), VR::TM, &st.time);
    put_text(&mut o, Tag(0x0008, 0x0050), VR::SH, &st.accession);
    put_text(&mut o, Tag(0x0008, 0x0060), VR::CS, modality);
    put_text(&mut o, Tag(0x0008, 0x0070), VR::LO, "ACME Medical");
    put_text(&mut o, Tag(0x0008, 0x0080), VR::LO, &st.institution);
    put_text(
        &mut o,
        Tag(0x0008, 0x0081),
        VR::ST,
        "1 Hospital Road, Springfield",
    );
    put_text(&mut o, Tag(0x0008, 0x0090), VR::PN, &st.referring_physician);
    put_text(&mut o, Tag(0x0008, 0x1010), VR::SH, &se.station);
    put_text(&mut o, Tag(0x0008, 0x1030), VR::LO, &st.description);
    put_text(&mut o, Tag(0x0008, 0x103E), VR::LO, &se.description);
    put_text(&mut o, Tag(0x0008, 0x1070), VR::PN, "Operator^Olga");
    put_text(&mut o, Tag(0x0010, 0x0010), VR::PN, &p.name);
    put_text(&mut o, Tag(0x0010, 0x0020), VR::LO, &p.id);
    if !p.issuer.is_empty() {
        put_text(&mut o, Tag(0x0010, 0x0021), VR::LO, &p.issuer);
    }
    put_text(&mut o, Tag(0x0010, 0x0030), VR::DA, &p.birth_date);
    put_text(&mut o, Tag(0x0010, 0x0040), VR::CS, &p.sex);
    put_text(&mut o, Tag(0x0010, 0x1030), VR::DS, "72.5");
    put_text(&mut o, Tag(0x0018, 0x1000), VR::LO, "SN-884213");
    put_text(&mut o, Tag(0x0020, 0x000D), VR::UI, &st.uid);
    put_text(&mut o, Tag(0x0020, 0x000E), VR::UI, &se.uid);
    put_text(&mut o, Tag(0x0020, 0x0010), VR::SH, "4711");
    o.put(DataElement::new(
        Tag(0x0020, 0x0011),
        VR::IS,
        PrimitiveValue::from(se.number.to_string()),
    ));
    put_text(&mut o, Tag(0x0020, 0x0052), VR::UI, &se.frame_of_reference);
    // Request Attributes Sequence > Scheduled Protocol Code Sequence > Coding Scheme
    // Identification-like nesting: three levels with identifiers at each.
    o.put(seq(
        Tag(0x0040, 0x0275),
        vec![item(vec![
            text(Tag(0x0040, 0x1001), VR::SH, "RP-5521"),
            text(Tag(0x0040, 0x0009), VR::SH, "SPS-5521"),
            text(Tag(0x0032, 0x1060), VR::LO, "CT chest - 55F Dr. Smith"),
            seq(
                Tag(0x0040, 0x0008),
                vec![item(vec![
                    text(Tag(0x0008, 0x0100), VR::SH, "CTCHEST"),
                    text(Tag(0x0008, 0x0102), VR::SH, "99LOCAL"),
                    text(Tag(0x0008, 0x0104), VR::LO, "CT chest"),
                    seq(
                        Tag(0x0040, 0xA170),
                        vec![item(vec![
                            text(Tag(0x0008, 0x0100), VR::SH, "121"),
                            text(Tag(0x0008, 0x0104), VR::LO, "Purpose"),
                            text(Tag(0x0040, 0xA123), VR::PN, &st.referring_physician),
                        ])],
                    ),
                ])],
            ),
        ])],
    ));
    o
}

fn image_pixel(o: &mut InMemDicomObject, rows: u16, cols: u16, frames: u32, seed: u16) {
    put_u16(o, Tag(0x0028, 0x0002), 1);
    put_text(o, Tag(0x0028, 0x0004), VR::CS, "MONOCHROME2");
    if frames > 1 {
        put_text(o, Tag(0x0028, 0x0008), VR::IS, &frames.to_string());
    }
    put_u16(o, Tag(0x0028, 0x0010), rows);
    put_u16(o, Tag(0x0028, 0x0011), cols);
    put_u16(o, Tag(0x0028, 0x0100), 16);
    put_u16(o, Tag(0x0028, 0x0101), 12);
    put_u16(o, Tag(0x0028, 0x0102), 11);
    put_u16(o, Tag(0x0028, 0x0103), 0);
    let n = usize::from(rows) * usize::from(cols) * frames as usize;
    let pixels: Vec<u16> = (0..n)
        .map(|i| ((i as u32 * 7 + u32::from(seed) * 131) % 4096) as u16)
        .collect();
    o.put(DataElement::new(
        Tag(0x7FE0, 0x0010),
        VR::OW,
        PrimitiveValue::U16(pixels.into()),
    ));
}

/// One CT slice at `index` along z.
pub fn ct_slice(p: &Patient, st: &Study, se: &Series, index: u16) -> InMemDicomObject {
    let uid = format!("{}.{index}", se.uid);
    let mut o = base_object(p, st, se, sop::CT, &uid, "CT");
    put_text(&mut o, Tag(0x0018, 0x0050), VR::DS, "2.5");
    put_text(&mut o, Tag(0x0018, 0x0060), VR::DS, "120");
    put_text(&mut o, Tag(0x0020, 0x0013), VR::IS, &index.to_string());
    put_text(
        &mut o,
        Tag(0x0020, 0x0032),
        VR::DS,
        &format!("-100\\-100\\{}", f32::from(index) * 2.5),
    );
    put_text(&mut o, Tag(0x0020, 0x0037), VR::DS, "1\\0\\0\\0\\1\\0");
    put_text(&mut o, Tag(0x0028, 0x0030), VR::DS, "0.7\\0.7");
    put_text(&mut o, Tag(0x0028, 0x1052), VR::DS, "-1024");
    put_text(&mut o, Tag(0x0028, 0x1053), VR::DS, "1");
    put_text(&mut o, Tag(0x0008, 0x0022), VR::DA, &st.date);
    put_text(&mut o, Tag(0x0008, 0x0032), VR::TM, &st.time);
    image_pixel(&mut o, 8, 8, 1, index);
    o
}

/// A CT slice with a `rows` × `cols` 16-bit image (for benchmarks).
pub fn ct_slice_sized(
    p: &Patient,
    st: &Study,
    se: &Series,
    index: u16,
    rows: u16,
    cols: u16,
) -> InMemDicomObject {
    let mut o = ct_slice(p, st, se, index);
    image_pixel(&mut o, rows, cols, 1, index);
    o
}

/// Put an overlay plane in group 6000 with a burned-in-style label.
pub fn add_overlay(o: &mut InMemDicomObject, label: &str) {
    put_u16(o, Tag(0x6000, 0x0010), 8);
    put_u16(o, Tag(0x6000, 0x0011), 8);
    put_text(o, Tag(0x6000, 0x0022), VR::LO, label);
    put_text(o, Tag(0x6000, 0x0040), VR::CS, "G");
    o.put(DataElement::new(
        Tag(0x6000, 0x0050),
        VR::SS,
        PrimitiveValue::I16(vec![1, 1].into()),
    ));
    put_u16(o, Tag(0x6000, 0x0100), 1);
    put_u16(o, Tag(0x6000, 0x0102), 0);
    put_text(o, Tag(0x6000, 0x4000), VR::LT, label);
    o.put(DataElement::new(
        Tag(0x6000, 0x3000),
        VR::OW,
        PrimitiveValue::U16(vec![0xA5A5; 4].into()),
    ));
}

/// Private data: a safe SIEMENS MR HEADER B-value, an unsafe creator with an identifying LO,
/// and a private sequence holding a person name two levels down.
pub fn add_private(o: &mut InMemDicomObject, secret_text: &str) {
    put_text(o, Tag(0x0019, 0x0010), VR::LO, "SIEMENS MR HEADER");
    put_text(o, Tag(0x0019, 0x100C), VR::IS, "1000");
    put_text(o, Tag(0x0029, 0x0010), VR::LO, "ACME PRIVATE 1.0");
    put_text(o, Tag(0x0029, 0x1001), VR::LO, secret_text);
    o.put(seq(
        Tag(0x0029, 0x1002),
        vec![item(vec![
            text(Tag(0x0010, 0x0010), VR::PN, secret_text),
            seq(
                Tag(0x0008, 0x1140),
                vec![item(vec![text(
                    Tag(0x0008, 0x1155),
                    VR::UI,
                    "1.2.826.0.1.3680043.10.543.777",
                )])],
            ),
        ])],
    ));
}

/// An MR slice with private data.
pub fn mr_slice(p: &Patient, st: &Study, se: &Series, index: u16) -> InMemDicomObject {
    let uid = format!("{}.{index}", se.uid);
    let mut o = base_object(p, st, se, sop::MR, &uid, "MR");
    put_text(&mut o, Tag(0x0018, 0x0020), VR::CS, "SE");
    put_text(&mut o, Tag(0x0018, 0x0021), VR::CS, "NONE");
    put_text(&mut o, Tag(0x0018, 0x0022), VR::CS, "NONE");
    put_text(&mut o, Tag(0x0018, 0x0023), VR::CS, "2D");
    put_text(&mut o, Tag(0x0018, 0x0080), VR::DS, "500");
    put_text(&mut o, Tag(0x0018, 0x0081), VR::DS, "15");
    put_text(&mut o, Tag(0x0018, 0x0087), VR::DS, "3");
    put_text(&mut o, Tag(0x0018, 0x0091), VR::IS, "1");
    put_text(&mut o, Tag(0x0020, 0x0013), VR::IS, &index.to_string());
    put_text(
        &mut o,
        Tag(0x0020, 0x0032),
        VR::DS,
        &format!("-100\\-100\\{}", f32::from(index) * 5.0),
    );
    put_text(&mut o, Tag(0x0020, 0x0037), VR::DS, "1\\0\\0\\0\\1\\0");
    put_text(&mut o, Tag(0x0028, 0x0030), VR::DS, "1\\1");
    add_private(&mut o, &format!("{} private note", p.name));
    image_pixel(&mut o, 8, 8, 1, index + 100);
    o
}

/// An enhanced CT multi-frame object with per-frame functional groups (dates in every frame).
pub fn enhanced_ct(p: &Patient, st: &Study, se: &Series, frames: u32) -> InMemDicomObject {
    let uid = format!("{}.1", se.uid);
    let mut o = base_object(p, st, se, sop::ENHANCED_CT, &uid, "CT");
    put_text(
        &mut o,
        Tag(0x0008, 0x002A),
        VR::DT,
        &format!("{}{}", st.date, st.time),
    );
    put_text(&mut o, Tag(0x0020, 0x0013), VR::IS, "1");
    let shared = item(vec![
        seq(
            Tag(0x0020, 0x9116),
            vec![item(vec![text(
                Tag(0x0020, 0x0037),
                VR::DS,
                "1\\0\\0\\0\\1\\0",
            )])],
        ),
        seq(
            Tag(0x0028, 0x9110),
            vec![item(vec![
                text(Tag(0x0018, 0x0050), VR::DS, "1.25"),
                text(Tag(0x0028, 0x0030), VR::DS, "0.7\\0.7"),
            ])],
        ),
    ]);
    o.put(seq(Tag(0x5200, 0x9229), vec![shared]));
    let per_frame = (0..frames)
        .map(|f| {
            item(vec![
                seq(
                    Tag(0x0020, 0x9111),
                    vec![item(vec![
                        text(
                            Tag(0x0018, 0x9074),
                            VR::DT,
                            &format!("{}{}", st.date, st.time),
                        ),
                        text(
                            Tag(0x0018, 0x9151),
                            VR::DT,
                            &format!("{}{}", st.date, st.time),
                        ),
                        DataElement::new(
                            Tag(0x0020, 0x9157),
                            VR::UL,
                            PrimitiveValue::U32(vec![f + 1].into()),
                        ),
                    ])],
                ),
                seq(
                    Tag(0x0020, 0x9113),
                    vec![item(vec![text(
                        Tag(0x0020, 0x0032),
                        VR::DS,
                        &format!("-100\\-100\\{}", f as f32 * 1.25),
                    )])],
                ),
            ])
        })
        .collect();
    o.put(seq(Tag(0x5200, 0x9230), per_frame));
    image_pixel(&mut o, 4, 4, frames, 7);
    o
}

/// An ultrasound image with JPEG-baseline-style encapsulated pixel data (fragments pass
/// through unchanged, so their content need not decode).
pub fn encapsulated_us(p: &Patient, st: &Study, se: &Series, index: u16) -> InMemDicomObject {
    let uid = format!("{}.{index}", se.uid);
    let mut o = base_object(p, st, se, sop::US, &uid, "US");
    put_text(&mut o, Tag(0x0028, 0x0301), VR::CS, "NO");
    put_u16(&mut o, Tag(0x0028, 0x0002), 3);
    put_text(&mut o, Tag(0x0028, 0x0004), VR::CS, "YBR_FULL_422");
    put_u16(&mut o, Tag(0x0028, 0x0006), 0);
    put_u16(&mut o, Tag(0x0028, 0x0010), 16);
    put_u16(&mut o, Tag(0x0028, 0x0011), 16);
    put_u16(&mut o, Tag(0x0028, 0x0100), 8);
    put_u16(&mut o, Tag(0x0028, 0x0101), 8);
    put_u16(&mut o, Tag(0x0028, 0x0102), 7);
    put_u16(&mut o, Tag(0x0028, 0x0103), 0);
    let fragment: Vec<u8> = [0xFF, 0xD8, 0xFF, 0xE0]
        .into_iter()
        .chain((0..60u8).map(|i| i.wrapping_mul(31).wrapping_add(index as u8)))
        .chain([0xFF, 0xD9])
        .collect();
    o.put(DataElement::new(
        Tag(0x7FE0, 0x0010),
        VR::OB,
        Value::from(PixelFragmentSequence::new(vec![0u32], vec![fragment])),
    ));
    o
}

/// An enhanced CT with `frames` frames of 512×512 16-bit pixels (about half a megabyte per
/// frame): a large multi-frame file.
pub fn large_multiframe(frames: u32) -> InMemDicomObject {
    let p = Patient {
        id: "LARGE-1".into(),
        issuer: "HOSP-L".into(),
        name: "Large^Patient".into(),
        birth_date: "19610101".into(),
        sex: "M".into(),
        charset: None,
    };
    let st = Study {
        uid: format!("{ORIGINAL_UID_ROOT}.3.1"),
        date: "20240303".into(),
        time: "111111".into(),
        accession: "LACC1".into(),
        description: "CT CHEST WITH CONTRAST".into(),
        referring_physician: "Ref^Large".into(),
        institution: "Large Hospital".into(),
    };
    let se = Series {
        uid: format!("{}.1", st.uid),
        number: 1,
        description: "Large".into(),
        frame_of_reference: format!("{}.1.0", st.uid),
        station: "CTL".into(),
    };
    let mut o = enhanced_ct(&p, &st, &se, frames);
    image_pixel(&mut o, 512, 512, frames, 5);
    o
}

/// An ultrasound multi-frame image with native 16-bit pixel data and no Burned In Annotation
/// attribute: it may carry burned-in text.
pub fn us_multiframe_native(p: &Patient, st: &Study, se: &Series, frames: u32) -> InMemDicomObject {
    let uid = format!("{}.1", se.uid);
    let mut o = base_object(p, st, se, "1.2.840.10008.5.1.4.1.1.3.1", &uid, "US");
    put_text(&mut o, Tag(0x0008, 0x1090), VR::LO, "Sono 5");
    image_pixel(&mut o, 8, 8, frames, 9);
    o
}

/// A segmentation referencing images of another series (references must still resolve
/// after de-identification).
pub fn segmentation(
    p: &Patient,
    st: &Study,
    se: &Series,
    referenced_series: &str,
    referenced_instances: &[String],
) -> InMemDicomObject {
    let uid = format!("{}.1", se.uid);
    let mut o = base_object(p, st, se, sop::SEG, &uid, "SEG");
    put_text(&mut o, Tag(0x0062, 0x0001), VR::CS, "BINARY");
    let refs = referenced_instances
        .iter()
        .map(|u| {
            item(vec![
                text(Tag(0x0008, 0x1150), VR::UI, sop::CT),
                text(Tag(0x0008, 0x1155), VR::UI, u),
            ])
        })
        .collect();
    o.put(seq(
        Tag(0x0008, 0x1115),
        vec![item(vec![
            seq(Tag(0x0008, 0x114A), refs),
            text(Tag(0x0020, 0x000E), VR::UI, referenced_series),
        ])],
    ));
    image_pixel(&mut o, 8, 8, 1, 3);
    o
}

/// A basic text SR whose content tree holds text, a person name, a date, a UID reference and
/// a coded finding, nested three levels deep.
pub fn text_report(
    p: &Patient,
    st: &Study,
    se: &Series,
    referenced_image: &str,
) -> InMemDicomObject {
    let uid = format!("{}.1", se.uid);
    let mut o = base_object(p, st, se, sop::BASIC_TEXT_SR, &uid, "SR");
    put_text(&mut o, Tag(0x0040, 0xA040), VR::CS, "CONTAINER");
    put_text(&mut o, Tag(0x0040, 0xA050), VR::CS, "SEPARATE");
    put_text(&mut o, Tag(0x0040, 0xA491), VR::CS, "COMPLETE");
    put_text(&mut o, Tag(0x0040, 0xA493), VR::CS, "VERIFIED");
    o.put(seq(
        Tag(0x0040, 0xA043),
        vec![code_item("18748-4", "LN", "Diagnostic imaging report")],
    ));
    let concept = |v: &str, m: &str| seq(Tag(0x0040, 0xA043), vec![code_item(v, "DCM", m)]);
    let content = vec![
        item(vec![
            text(Tag(0x0040, 0xA010), VR::CS, "CONTAINS"),
            text(Tag(0x0040, 0xA040), VR::CS, "TEXT"),
            concept("121071", "Finding"),
            text(
                Tag(0x0040, 0xA160),
                VR::UT,
                &format!("Patient {} seen by Dr. Who on {}", p.name, st.date),
            ),
        ]),
        item(vec![
            text(Tag(0x0040, 0xA010), VR::CS, "HAS OBS CONTEXT"),
            text(Tag(0x0040, 0xA040), VR::CS, "PNAME"),
            concept("121008", "Person Observer Name"),
            text(Tag(0x0040, 0xA123), VR::PN, &st.referring_physician),
        ]),
        item(vec![
            text(Tag(0x0040, 0xA010), VR::CS, "CONTAINS"),
            text(Tag(0x0040, 0xA040), VR::CS, "CONTAINER"),
            concept("111028", "Image Library"),
            text(Tag(0x0040, 0xA050), VR::CS, "SEPARATE"),
            seq(
                Tag(0x0040, 0xA730),
                vec![
                    item(vec![
                        text(Tag(0x0040, 0xA010), VR::CS, "CONTAINS"),
                        text(Tag(0x0040, 0xA040), VR::CS, "IMAGE"),
                        seq(
                            Tag(0x0008, 0x1199),
                            vec![item(vec![
                                text(Tag(0x0008, 0x1150), VR::UI, sop::CT),
                                text(Tag(0x0008, 0x1155), VR::UI, referenced_image),
                            ])],
                        ),
                    ]),
                    item(vec![
                        text(Tag(0x0040, 0xA010), VR::CS, "HAS ACQ CONTEXT"),
                        text(Tag(0x0040, 0xA040), VR::CS, "DATE"),
                        concept("111060", "Study Date"),
                        text(Tag(0x0040, 0xA121), VR::DA, &st.date),
                    ]),
                    item(vec![
                        text(Tag(0x0040, 0xA010), VR::CS, "CONTAINS"),
                        text(Tag(0x0040, 0xA040), VR::CS, "CODE"),
                        concept("121071", "Finding"),
                        seq(
                            Tag(0x0040, 0xA168),
                            vec![code_item("RID3874", "RADLEX", "Nodule")],
                        ),
                    ]),
                ],
            ),
        ]),
    ];
    o.put(seq(Tag(0x0040, 0xA730), content));
    o
}

/// A minimal valid explicit-VR-little-endian file written byte by byte, with odd-length
/// values (not conformant, but found in real archives).
pub fn odd_length_file(p: &Patient, st: &Study, se: &Series) -> Vec<u8> {
    fn el(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], value: &[u8]) {
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        out.extend_from_slice(value);
    }
    let sop_uid = format!("{}.9", se.uid);
    let mut meta = Vec::new();
    let mut push_meta = |e: u16, vr: &[u8; 2], v: &[u8]| el(&mut meta, 0x0002, e, vr, v);
    let pad = |s: &str| {
        let mut b = s.as_bytes().to_vec();
        if b.len() % 2 == 1 {
            b.push(0);
        }
        b
    };
    push_meta(0x0002, b"UI", &pad(sop::CT));
    push_meta(0x0003, b"UI", &pad(&sop_uid));
    push_meta(0x0010, b"UI", &pad(ts::EXPLICIT_LE));
    push_meta(0x0012, b"UI", &pad("1.2.826.0.1.3680043.10.543.99"));
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    // (0002,0000) group length, UL
    out.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    // Odd lengths on purpose: no padding byte.
    el(&mut out, 0x0008, 0x0016, b"UI", sop::CT.as_bytes());
    el(&mut out, 0x0008, 0x0018, b"UI", sop_uid.as_bytes());
    el(&mut out, 0x0008, 0x0020, b"DA", st.date.as_bytes());
    el(&mut out, 0x0008, 0x0060, b"CS", b"CT");
    el(
        &mut out,
        0x0008,
        0x0090,
        b"PN",
        st.referring_physician.as_bytes(),
    );
    el(&mut out, 0x0010, 0x0010, b"PN", p.name.as_bytes());
    el(&mut out, 0x0010, 0x0020, b"LO", p.id.as_bytes());
    el(&mut out, 0x0010, 0x0021, b"LO", p.issuer.as_bytes());
    el(&mut out, 0x0020, 0x000D, b"UI", st.uid.as_bytes());
    el(&mut out, 0x0020, 0x000E, b"UI", se.uid.as_bytes());
    out
}

/// Marker planted in a table row: `prefix` + row index, uppercase so CS rows can hold it.
pub fn marker(prefix: &str, row: usize) -> String {
    format!("{prefix}{row:03}")
}

/// The VR a canary is planted with for a table row, if the row can hold text or a UID.
pub fn canary_vr(tag: Tag) -> Option<VR> {
    let vr = Dictionary::standard().vr(tag)?;
    match vr {
        VR::AE
        | VR::CS
        | VR::LO
        | VR::LT
        | VR::PN
        | VR::SH
        | VR::ST
        | VR::UC
        | VR::UT
        | VR::UR
        | VR::UI
        | VR::OB
        | VR::UN
        | VR::SQ
        | VR::DA
        | VR::DT
        | VR::TM => Some(vr),
        _ => None,
    }
}

/// A value holding the marker for a row, valid for its VR: text rows hold the marker itself;
/// UI rows a UID whose last component encodes it; date/time rows a distinctive date.
pub fn canary_value(vr: VR, mark: &str, row: usize) -> PrimitiveValue {
    match vr {
        VR::UI => PrimitiveValue::from(canary_uid(row)),
        VR::DA => PrimitiveValue::from(canary_date(row)),
        VR::DT => PrimitiveValue::from(format!("{}101112", canary_date(row))),
        VR::TM => PrimitiveValue::from("101112.123456"),
        VR::OB | VR::UN => PrimitiveValue::U8(mark.as_bytes().to_vec().into()),
        _ => PrimitiveValue::from(mark),
    }
}

/// The planted UID of a row: unique digits that appear nowhere else.
pub fn canary_uid(row: usize) -> String {
    format!("{ORIGINAL_UID_ROOT}.97531{row:04}86420")
}

/// The planted date of a row.
pub fn canary_date(row: usize) -> String {
    // 1931..1960, unique per row modulo a 30-year window.
    format!(
        "{:04}{:02}{:02}",
        1931 + (row % 30),
        1 + (row / 30) % 12,
        1 + (row / 360) % 28
    )
}

/// One value planted by [`canary_object`].
#[derive(Clone, Debug)]
pub struct Planted {
    /// Where it was planted (top level).
    pub tag: Tag,
    /// Row of Table E.1-1, if planted for a row.
    pub row: Option<usize>,
    /// VR it was planted with.
    pub vr: VR,
    /// The exact text planted: for sequences, the Code Meaning inside the first item.
    pub needle: String,
}

/// An object with a marker in every row of Table E.1-1 that can hold text or a UID (and in
/// private tags, a private sequence, nested sequences and the file meta header), on top of a
/// CT image so that the IOD rules apply. Returns the object and what was planted.
pub fn canary_object(prefix: &str) -> (InMemDicomObject, Vec<Planted>) {
    let p = Patient {
        id: format!("{prefix}PID"),
        issuer: format!("{prefix}ISSUER"),
        name: format!("{prefix}NAME^GIVEN"),
        birth_date: "19470203".into(),
        sex: "F".into(),
        charset: Some("ISO_IR 100".into()),
    };
    let st = Study {
        uid: format!("{ORIGINAL_UID_ROOT}.111.2222"),
        date: "20190312".into(),
        time: "143005".into(),
        accession: format!("{prefix}ACC"),
        description: format!("{prefix}STUDYDESC"),
        referring_physician: format!("{prefix}REF^DOC"),
        institution: format!("{prefix}INST"),
    };
    let se = Series {
        uid: format!("{ORIGINAL_UID_ROOT}.111.2222.3"),
        number: 1,
        description: format!("{prefix}SERIESDESC"),
        frame_of_reference: format!("{ORIGINAL_UID_ROOT}.111.4444"),
        station: format!("{prefix}STN"),
    };
    let mut o = ct_slice(&p, &st, &se, 1);
    let mut planted = Vec::new();
    for (row, rule) in RuleTable::standard().rules().iter().enumerate() {
        let tag = match rule.pattern {
            TagPattern::Exact(t) => t,
            TagPattern::OverlayElement(e) => Tag(0x6002, e),
            TagPattern::CurveGroup => Tag(0x5000, 0x0022),
            TagPattern::Private => continue,
        };
        // Command and file meta groups cannot be in a data set; SOP Class and Instance UID
        // keep the object a CT (the instance UID carries its own original value).
        if matches!(tag.group(), 0x0000 | 0x0002)
            || [Tag(0x0008, 0x0016), Tag(0x0008, 0x0018)].contains(&tag)
        {
            continue;
        }
        let vr = if tag == Tag(0x5000, 0x0022) {
            VR::LO
        } else {
            let Some(vr) = canary_vr(tag) else { continue };
            vr
        };
        let mark = marker(prefix, row);
        let (element, needle) = if vr == VR::SQ {
            let e = seq(
                tag,
                vec![item(vec![
                    text(Tag(0x0008, 0x0104), VR::LO, &mark),
                    text(Tag(0x0010, 0x0010), VR::PN, &format!("{mark}PN")),
                    seq(
                        Tag(0x0040, 0xA730),
                        vec![item(vec![
                            text(Tag(0x0040, 0xA040), VR::CS, "TEXT"),
                            text(Tag(0x0040, 0xA160), VR::UT, &format!("{mark}TXT")),
                        ])],
                    ),
                ])],
            );
            (e, mark.clone())
        } else {
            let v = canary_value(vr, &mark, row);
            let needle = match vr {
                VR::UI => canary_uid(row),
                VR::DA => canary_date(row),
                VR::DT => format!("{}101112", canary_date(row)),
                VR::TM => "101112.123456".to_owned(),
                _ => mark.clone(),
            };
            (DataElement::new(tag, vr, v), needle)
        };
        o.put(element);
        planted.push(Planted {
            tag,
            row: Some(row),
            vr,
            needle,
        });
    }
    // Overlay attributes beyond the pattern rows.
    put_u16(&mut o, Tag(0x6002, 0x0010), 2);
    put_u16(&mut o, Tag(0x6002, 0x0011), 8);
    let ovl = format!("{prefix}OVLDESC");
    put_text(&mut o, Tag(0x6002, 0x0022), VR::LO, &ovl);
    planted.push(Planted {
        tag: Tag(0x6002, 0x0022),
        row: None,
        vr: VR::LO,
        needle: ovl,
    });
    // Private tags and a private sequence with nested identifying values.
    let private = format!("{prefix}PRIVATE");
    add_private(&mut o, &private);
    planted.push(Planted {
        tag: Tag(0x0029, 0x1001),
        row: None,
        vr: VR::LO,
        needle: private,
    });
    // An unlisted PN the safety net must catch by VR.
    let pn = format!("{prefix}VNETPN");
    put_text(&mut o, Tag(0x0040, 0xA075), VR::PN, &pn);
    planted.push(Planted {
        tag: Tag(0x0040, 0xA075),
        row: None,
        vr: VR::PN,
        needle: pn,
    });
    (o, planted)
}

/// The canary object as a file whose meta header carries markers too.
pub fn canary_file(
    prefix: &str,
    transfer_syntax: &str,
    instance: u32,
) -> io::Result<(Vec<u8>, Vec<Planted>)> {
    let (mut o, planted) = canary_object(prefix);
    let class = sop::CT;
    let instance = format!("{ORIGINAL_UID_ROOT}.111.2222.3.1{instance}");
    put_text(&mut o, Tag(0x0008, 0x0018), VR::UI, &instance);
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(class)
        .media_storage_sop_instance_uid(instance)
        .transfer_syntax(transfer_syntax)
        .implementation_class_uid("1.2.826.0.1.3680043.10.543.99")
        .implementation_version_name(format!("{prefix}IVN").as_str())
        .source_application_entity_title(format!("{prefix}SAE").as_str())
        .sending_application_entity_title(format!("{prefix}SND").as_str())
        .build()
        .map_err(io::Error::other)?;
    let mut out = Vec::new();
    o.with_exact_meta(meta)
        .write_all(&mut out)
        .map_err(io::Error::other)?;
    // A non-zero preamble (as in TIFF dual-personality files) that must not survive.
    let mark = format!("{prefix}PREAMBLE");
    out[..mark.len()].copy_from_slice(mark.as_bytes());
    Ok((out, planted))
}

/// A generated archive on disk.
#[derive(Debug)]
pub struct SampleArchive {
    pub root: PathBuf,
    pub files: Vec<PathBuf>,
    /// Identifying strings planted in the archive (to check the output for leaks).
    pub identifying: Vec<String>,
}

fn write(root: &Path, files: &mut Vec<PathBuf>, name: &str, bytes: &[u8]) -> io::Result<()> {
    let path = root.join(name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, bytes)?;
    files.push(path);
    Ok(())
}

/// Write the demo's sample archive: three patients, several studies and series, every
/// encoding the builder knows, plus two files that must be quarantined.
pub fn write_sample_archive(root: &Path) -> io::Result<SampleArchive> {
    std::fs::create_dir_all(root)?;
    let patients = [
        Patient {
            id: "MRN-100234".into(),
            issuer: "HOSP-A".into(),
            name: "Doe^Jane".into(),
            birth_date: "19560312".into(),
            sex: "F".into(),
            charset: None,
        },
        Patient {
            id: "MRN-100577".into(),
            issuer: "HOSP-A".into(),
            name: "Müller^Jörg".into(),
            birth_date: "19811129".into(),
            sex: "M".into(),
            charset: Some("ISO_IR 100".into()),
        },
        Patient {
            id: "MRN-200001".into(),
            issuer: "HOSP-A".into(),
            name: "Ōta^Hanako".into(),
            birth_date: "19300101".into(),
            sex: "F".into(),
            charset: Some("ISO_IR 192".into()),
        },
    ];
    let mut files = Vec::new();
    let mut identifying = Vec::new();
    for (pi, p) in patients.iter().enumerate() {
        identifying.extend([p.id.clone(), p.name.clone(), p.birth_date.clone()]);
        // Non-ASCII names are stored in their character set's bytes: also look for their
        // ASCII runs, which are the same bytes in every set used here.
        identifying.extend(
            p.name
                .split(|c: char| !c.is_ascii())
                .filter(|run| run.len() >= 5)
                .map(str::to_owned),
        );
        let st = Study {
            uid: format!("{ORIGINAL_UID_ROOT}.{}.1", pi + 1),
            date: format!("2019031{}", pi + 2),
            time: "101530".into(),
            accession: format!("ACC{:06}", 4711 + pi),
            description: "CT CHEST WITH CONTRAST".into(),
            referring_physician: format!("Referrer^Rita{pi}"),
            institution: "St. Example Hospital".into(),
        };
        identifying.extend([
            st.uid.clone(),
            st.accession.clone(),
            st.referring_physician.clone(),
        ]);
        let series = |n: i32, desc: &str| Series {
            uid: format!("{}.{n}", st.uid),
            number: n,
            description: desc.into(),
            frame_of_reference: format!("{}.{n}.0", st.uid),
            station: "CTSTATION07".into(),
        };
        let dir = format!("{}_{}", p.name.replace('^', "_"), p.birth_date);
        match pi {
            0 => {
                let ct = series(1, "Thorax 2.5mm");
                let mut instances = Vec::new();
                for i in 1..=6 {
                    let mut o = ct_slice(p, &st, &ct, i);
                    if i == 1 {
                        add_overlay(&mut o, "Doe^Jane 1956");
                    }
                    instances.push(format!("{}.{i}", ct.uid));
                    write(
                        root,
                        &mut files,
                        &format!("{dir}/ct/{i:03}.dcm"),
                        &encode(o, ts::EXPLICIT_LE)?,
                    )?;
                }
                let seg = segmentation(p, &st, &series(2, "Lung mask"), &ct.uid, &instances);
                write(
                    root,
                    &mut files,
                    &format!("{dir}/seg.dcm"),
                    &encode(seg, ts::EXPLICIT_LE)?,
                )?;
                let sr = text_report(p, &st, &series(3, "Report"), &instances[0]);
                write(
                    root,
                    &mut files,
                    &format!("{dir}/report.dcm"),
                    &encode(sr, ts::EXPLICIT_LE)?,
                )?;
            }
            1 => {
                let mr = series(1, "T1 SE axial");
                for i in 1..=5 {
                    let o = mr_slice(p, &st, &mr, i);
                    write(
                        root,
                        &mut files,
                        &format!("{dir}/mr/IM{i}"),
                        &encode(o, ts::IMPLICIT_LE)?,
                    )?;
                }
                let ct = series(2, "Abdomen big endian");
                for i in 1..=3 {
                    let o = ct_slice(p, &st, &ct, i);
                    write(
                        root,
                        &mut files,
                        &format!("{dir}/ct_be/{i}.dcm"),
                        &encode(o, ts::EXPLICIT_BE)?,
                    )?;
                }
                write(
                    root,
                    &mut files,
                    &format!("{dir}/odd.dcm"),
                    &odd_length_file(p, &st, &series(9, "odd")),
                )?;
            }
            _ => {
                let ct = series(1, "Deflated");
                for i in 1..=2 {
                    let o = ct_slice(p, &st, &ct, i);
                    write(
                        root,
                        &mut files,
                        &format!("{dir}/defl/{i}.dcm"),
                        &encode(o, ts::DEFLATED_LE)?,
                    )?;
                }
                let us = series(2, "US");
                for i in 1..=2 {
                    let o = encapsulated_us(p, &st, &us, i);
                    write(
                        root,
                        &mut files,
                        &format!("{dir}/us/{i}.dcm"),
                        &encode(o, ts::JPEG_BASELINE)?,
                    )?;
                }
                let mf = enhanced_ct(p, &st, &series(3, "Enhanced CT"), 4);
                write(
                    root,
                    &mut files,
                    &format!("{dir}/enhanced.dcm"),
                    &encode(mf, ts::EXPLICIT_LE)?,
                )?;
            }
        }
    }
    // Two files the node must refuse without stopping: not DICOM at all, and DICOM without a
    // SOP Instance UID.
    write(
        root,
        &mut files,
        "notes/readme.txt",
        b"scanned on ward 3 for Doe^Jane",
    )?;
    let mut broken = ct_slice(
        &patients[0],
        &Study {
            uid: format!("{ORIGINAL_UID_ROOT}.9.1"),
            date: "20200101".into(),
            time: "000000".into(),
            accession: "ACC999".into(),
            description: "broken".into(),
            referring_physician: "Referrer^Rita0".into(),
            institution: "St. Example Hospital".into(),
        },
        &Series {
            uid: format!("{ORIGINAL_UID_ROOT}.9.1.1"),
            number: 1,
            description: "broken".into(),
            frame_of_reference: format!("{ORIGINAL_UID_ROOT}.9.1.1.0"),
            station: "X".into(),
        },
        1,
    );
    broken.remove_element(Tag(0x0008, 0x0018));
    write(
        root,
        &mut files,
        "misc/no_sop_instance.dcm",
        &encode(broken, ts::EXPLICIT_LE)?,
    )?;
    Ok(SampleArchive {
        root: root.to_owned(),
        files,
        identifying,
    })
}

/// Write a larger archive of CT series: `patients` patients with one series of `slices`
/// slices each, in explicit VR little endian. Returns the files written.
pub fn write_bulk_archive(root: &Path, patients: usize, slices: u16) -> io::Result<Vec<PathBuf>> {
    write_bulk_archive_sized(root, patients, slices, 8)
}

/// [`write_bulk_archive`] with `matrix` × `matrix` slices.
pub fn write_bulk_archive_sized(
    root: &Path,
    patients: usize,
    slices: u16,
    matrix: u16,
) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for pi in 0..patients {
        let p = Patient {
            id: format!("BULK-{pi:05}"),
            issuer: "HOSP-B".into(),
            name: format!("Bulk^Patient{pi}"),
            birth_date: format!("19{:02}0101", 30 + pi % 60),
            sex: if pi % 2 == 0 { "F".into() } else { "M".into() },
            charset: None,
        };
        let st = Study {
            uid: format!("{ORIGINAL_UID_ROOT}.8.{pi}"),
            date: "20210601".into(),
            time: "090000".into(),
            accession: format!("BACC{pi:05}"),
            description: "CT CHEST WITH CONTRAST".into(),
            referring_physician: "Referrer^Bob".into(),
            institution: "Bulk Hospital".into(),
        };
        let se = Series {
            uid: format!("{}.1", st.uid),
            number: 1,
            description: "Thorax".into(),
            frame_of_reference: format!("{}.1.0", st.uid),
            station: "CT01".into(),
        };
        for i in 1..=slices {
            let name = format!("p{pi:04}/s{i:04}.dcm");
            write(
                root,
                &mut files,
                &name,
                &encode(
                    ct_slice_sized(&p, &st, &se, i, matrix, matrix),
                    ts::EXPLICIT_LE,
                )?,
            )?;
        }
    }
    Ok(files)
}

/// How one hospital's scanners differ: the multi-site sample gives each site its own vendor,
/// geometry, intensity scale and encoding.
#[derive(Clone, Debug)]
pub struct SiteProfile {
    /// Upper-case tag planted in every identifying value (so leaks can be searched for).
    pub prefix: String,
    /// Distinguishes the sites' original UIDs.
    pub number: u32,
    pub manufacturer: String,
    pub field_strength: String,
    pub patients: usize,
    /// Multiplies every tissue intensity (scanner gain), and is added to it (offset).
    pub scale: f64,
    pub offset: f64,
    pub pixel_spacing: f64,
    pub slice_thickness: f64,
    pub transfer_syntax: &'static str,
    pub seed: u64,
}

/// A site's generated archive.
#[derive(Debug)]
pub struct SiteArchive {
    pub files: Vec<PathBuf>,
    /// Every identifying value planted (names, IDs, dates, accession numbers, UIDs, ...).
    pub identifying: Vec<String>,
}

/// A small deterministic generator (xorshift64*), so archives are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = self.next().max(1e-12);
        let v = self.next();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Matrix and slices of a multi-site sample MR volume.
pub const SITE_MATRIX: u16 = 32;
pub const SITE_SLICES: u16 = 12;

/// Write one site's archive: `patients` T1-weighted brain MR series (an ellipsoid head with
/// CSF, grey and white matter, Rician-like noise) scaled by the site's scanner, with canaries
/// in every identifying attribute the generator sets.
pub fn write_site_archive(root: &Path, site: &SiteProfile) -> io::Result<SiteArchive> {
    let mut rng = Rng(site.seed.max(1));
    let mut files = Vec::new();
    let mut identifying = Vec::new();
    let pre = &site.prefix;
    for pi in 0..site.patients {
        let p = Patient {
            id: format!("{pre}MRN{pi:04}"),
            issuer: format!("{pre}ISSUER"),
            name: format!("{pre}Surname{pi}^Given"),
            birth_date: format!("19{:02}0{}1{}", 40 + (pi * 7) % 30, 1 + pi % 9, pi % 10),
            sex: if pi % 2 == 0 { "F".into() } else { "M".into() },
            charset: None,
        };
        let st = Study {
            uid: format!("{ORIGINAL_UID_ROOT}.{}.{}", 70 + site.number, pi + 1),
            date: format!("2024{:02}{:02}", 1 + pi % 12, 10 + pi % 18),
            time: "081500".into(),
            accession: format!("{pre}ACC{pi:05}"),
            description: format!("{pre} BRAIN MRI"),
            referring_physician: format!("{pre}Referrer^Dr{pi}"),
            institution: format!("{pre} University Hospital"),
        };
        let se = Series {
            uid: format!("{}.1", st.uid),
            number: 1,
            description: format!("{pre} T1 MPRAGE"),
            frame_of_reference: format!("{}.1.0", st.uid),
            station: format!("{pre}MR01"),
        };
        identifying.extend([
            p.id.clone(),
            p.issuer.clone(),
            p.name.clone(),
            st.accession.clone(),
            st.description.clone(),
            st.referring_physician.clone(),
            st.institution.clone(),
            se.description.clone(),
            se.station.clone(),
            st.uid.clone(),
        ]);
        // Per-patient anatomy and intensity variation.
        let gain = 1.0 + 0.05 * rng.normal();
        let (rx, ry, rz) = (0.80 + 0.05 * rng.next(), 0.90 + 0.05 * rng.next(), 0.85);
        let n = usize::from(SITE_MATRIX);
        for k in 0..SITE_SLICES {
            let uid = format!("{}.{}", se.uid, k + 1);
            let mut o = base_object(&p, &st, &se, sop::MR, &uid, "MR");
            put_text(&mut o, Tag(0x0008, 0x0070), VR::LO, &site.manufacturer);
            put_text(
                &mut o,
                Tag(0x0008, 0x1090),
                VR::LO,
                &format!("{pre} Model X"),
            );
            put_text(
                &mut o,
                Tag(0x0010, 0x1010),
                VR::AS,
                &format!("0{}Y", 40 + pi % 30),
            );
            put_text(&mut o, Tag(0x0018, 0x0015), VR::CS, "BRAIN");
            put_text(&mut o, Tag(0x0018, 0x0020), VR::CS, "GR");
            put_text(&mut o, Tag(0x0018, 0x0021), VR::CS, "SP");
            put_text(&mut o, Tag(0x0018, 0x0022), VR::CS, "NONE");
            put_text(&mut o, Tag(0x0018, 0x0023), VR::CS, "3D");
            put_text(
                &mut o,
                Tag(0x0018, 0x0050),
                VR::DS,
                &format!("{}", site.slice_thickness),
            );
            put_text(&mut o, Tag(0x0018, 0x0080), VR::DS, "2300");
            put_text(&mut o, Tag(0x0018, 0x0081), VR::DS, "3");
            put_text(&mut o, Tag(0x0018, 0x0087), VR::DS, &site.field_strength);
            put_text(&mut o, Tag(0x0018, 0x0091), VR::IS, "1");
            put_text(&mut o, Tag(0x0020, 0x0013), VR::IS, &(k + 1).to_string());
            let half = f64::from(SITE_MATRIX) * site.pixel_spacing / 2.0;
            put_text(
                &mut o,
                Tag(0x0020, 0x0032),
                VR::DS,
                &format!("-{half}\\-{half}\\{}", f64::from(k) * site.slice_thickness),
            );
            put_text(&mut o, Tag(0x0020, 0x0037), VR::DS, "1\\0\\0\\0\\1\\0");
            put_text(
                &mut o,
                Tag(0x0028, 0x0030),
                VR::DS,
                &format!("{0}\\{0}", site.pixel_spacing),
            );
            put_u16(&mut o, Tag(0x0028, 0x0002), 1);
            put_text(&mut o, Tag(0x0028, 0x0004), VR::CS, "MONOCHROME2");
            put_u16(&mut o, Tag(0x0028, 0x0010), SITE_MATRIX);
            put_u16(&mut o, Tag(0x0028, 0x0011), SITE_MATRIX);
            put_u16(&mut o, Tag(0x0028, 0x0100), 16);
            put_u16(&mut o, Tag(0x0028, 0x0101), 16);
            put_u16(&mut o, Tag(0x0028, 0x0102), 15);
            put_u16(&mut o, Tag(0x0028, 0x0103), 0);
            let z = (f64::from(k) + 0.5) / f64::from(SITE_SLICES) * 2.0 - 1.0;
            let mut pixels = Vec::with_capacity(n * n);
            for j in 0..n {
                for i in 0..n {
                    let x = (i as f64 + 0.5) / n as f64 * 2.0 - 1.0;
                    let y = (j as f64 + 0.5) / n as f64 * 2.0 - 1.0;
                    let r = ((x / rx).powi(2) + (y / ry).powi(2) + (z / rz).powi(2)).sqrt();
                    let tissue = if r > 1.0 {
                        0.0
                    } else if r > 0.85 {
                        0.35
                    } else if r > 0.55 {
                        0.65
                    } else {
                        1.0
                    };
                    let signal = if tissue > 0.0 {
                        (tissue * 1000.0 * gain * site.scale + site.offset)
                            * (1.0 + 0.03 * rng.normal())
                    } else {
                        // Rician-like background: magnitude of complex noise.
                        let (a, b) = (rng.normal(), rng.normal());
                        12.0 * site.scale * (a * a + b * b).sqrt()
                    };
                    pixels.push(signal.round().clamp(0.0, 65535.0) as u16);
                }
            }
            o.put(DataElement::new(
                Tag(0x7FE0, 0x0010),
                VR::OW,
                PrimitiveValue::U16(pixels.into()),
            ));
            let name = format!("{pre}_{pi:03}/IM{k:04}.dcm");
            write(root, &mut files, &name, &encode(o, site.transfer_syntax)?)?;
        }
    }
    Ok(SiteArchive { files, identifying })
}

/// The three sites of the multi-site sample: different vendors, spacings, intensity scales,
/// field strengths and transfer syntaxes.
pub fn consortium_sites(patients: usize) -> [SiteProfile; 3] {
    [
        SiteProfile {
            prefix: "ALPHA".into(),
            number: 1,
            manufacturer: "SIEMENS".into(),
            field_strength: "3".into(),
            patients,
            scale: 1.0,
            offset: 0.0,
            pixel_spacing: 1.0,
            slice_thickness: 1.0,
            transfer_syntax: ts::EXPLICIT_LE,
            seed: 11,
        },
        SiteProfile {
            prefix: "BRAVO".into(),
            number: 2,
            manufacturer: "GE MEDICAL SYSTEMS".into(),
            field_strength: "1.5".into(),
            patients,
            scale: 2.4,
            offset: 150.0,
            pixel_spacing: 0.9375,
            slice_thickness: 1.2,
            transfer_syntax: ts::IMPLICIT_LE,
            seed: 23,
        },
        SiteProfile {
            prefix: "CHARLIE".into(),
            number: 3,
            manufacturer: "Philips".into(),
            field_strength: "3".into(),
            patients,
            scale: 0.45,
            offset: 40.0,
            pixel_spacing: 1.1,
            slice_thickness: 1.5,
            transfer_syntax: ts::EXPLICIT_LE,
            seed: 37,
        },
    ]
}

/// Raw explicit VR little endian element bytes (short or long length form by VR).
pub fn raw_element(g: u16, e: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&g.to_le_bytes());
    out.extend_from_slice(&e.to_le_bytes());
    out.extend_from_slice(vr);
    if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT") {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(value);
    out
}

fn raw_undefined(g: u16, e: u16, vr: &[u8; 2]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&g.to_le_bytes());
    out.extend_from_slice(&e.to_le_bytes());
    out.extend_from_slice(vr);
    out.extend_from_slice(&[0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
    out
}

fn raw_marker(e: u16, len: u32) -> Vec<u8> {
    let mut out = vec![0xFE, 0xFF];
    out.extend_from_slice(&e.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out
}

fn implicit_element(g: u16, e: u16, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&g.to_le_bytes());
    out.extend_from_slice(&e.to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// The messy files real archives hold, each named; `identifying` is planted in each where it
/// fits so tests can check it never reaches an output.
pub fn messy_files(identifying: &str) -> io::Result<Vec<(&'static str, Vec<u8>)>> {
    let p = Patient {
        id: format!("{identifying}-ID"),
        issuer: "HOSP-M".into(),
        name: format!("{identifying}^Messy"),
        birth_date: "19500505".into(),
        sex: "M".into(),
        charset: None,
    };
    let st = Study {
        uid: format!("{ORIGINAL_UID_ROOT}.6.1"),
        date: "20220202".into(),
        time: "101010".into(),
        accession: "MACC1".into(),
        description: "messy".into(),
        referring_physician: "Ref^Messy".into(),
        institution: "Messy Hospital".into(),
    };
    let se = |n: i32| Series {
        uid: format!("{}.{n}", st.uid),
        number: n,
        description: "messy".into(),
        frame_of_reference: format!("{}.{n}.0", st.uid),
        station: "M1".into(),
    };
    let slice = |n: i32| ct_slice(&p, &st, &se(n), 1);
    let full = encode(slice(1), ts::EXPLICIT_LE)?;
    let mut files: Vec<(&'static str, Vec<u8>)> = Vec::new();
    // Without preamble: "DICM" first.
    files.push(("no-preamble", full[128..].to_vec()));
    // Without any meta group: a bare data set in each encoding.
    for (name, syntax) in [
        ("bare-implicit-le", ts::IMPLICIT_LE),
        ("bare-explicit-le", ts::EXPLICIT_LE),
        ("bare-explicit-be", ts::EXPLICIT_BE),
    ] {
        let obj = slice(match syntax {
            ts::IMPLICIT_LE => 2,
            ts::EXPLICIT_LE => 3,
            _ => 4,
        });
        let bytes = encode(obj, syntax)?;
        let file = dicom_object::OpenFileOptions::new()
            .from_reader(bytes.as_slice())
            .map_err(io::Error::other)?;
        let mut dataset = Vec::new();
        file.write_dataset(&mut dataset).map_err(io::Error::other)?;
        files.push((name, dataset));
    }
    // Meta group without group length, and without transfer syntax.
    let meta_elements = |with_ts: bool, sop_uid: &str| {
        let pad = |s: &str| {
            let mut b = s.as_bytes().to_vec();
            if b.len() % 2 == 1 {
                b.push(0);
            }
            b
        };
        let mut m = raw_element(0x0002, 0x0001, b"OB", &[0, 1]);
        m.extend(raw_element(0x0002, 0x0002, b"UI", &pad(sop::CT)));
        m.extend(raw_element(0x0002, 0x0003, b"UI", &pad(sop_uid)));
        if with_ts {
            m.extend(raw_element(0x0002, 0x0010, b"UI", &pad(ts::EXPLICIT_LE)));
        }
        m
    };
    for (name, with_ts, n) in [
        ("meta-without-group-length", true, 5),
        ("meta-without-transfer-syntax", false, 6),
    ] {
        let obj = slice(n);
        let uid = format!("{}.1", se(n).uid);
        let bytes = encode(obj, ts::EXPLICIT_LE)?;
        let file = dicom_object::OpenFileOptions::new()
            .from_reader(bytes.as_slice())
            .map_err(io::Error::other)?;
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        out.extend(meta_elements(with_ts, &uid));
        file.write_dataset(&mut out).map_err(io::Error::other)?;
        files.push((name, out));
    }
    files.push(("deflated", encode(slice(7), ts::DEFLATED_LE)?));
    files.push(("big-endian", encode(slice(8), ts::EXPLICIT_BE)?));
    // Truncated in the middle of the header, and inside the pixel data.
    let t = encode(slice(9), ts::EXPLICIT_LE)?;
    files.push(("truncated-header", t[..t.len() / 3].to_vec()));
    let t = encode(slice(10), ts::EXPLICIT_LE)?;
    files.push(("truncated-pixel-data", t[..t.len() - 40].to_vec()));
    // Pixel data whose declared length is shorter than the image needs.
    let mut short = slice(11);
    short.put(DataElement::new(
        Tag(0x7FE0, 0x0010),
        VR::OW,
        PrimitiveValue::U16(vec![1u16; 10].into()),
    ));
    files.push(("short-pixel-data", encode(short, ts::EXPLICIT_LE)?));
    files.push(("odd-length", odd_length_file(&p, &st, &se(12))));
    // An undefined-length item closed by a sequence delimiter instead of an item delimiter.
    let mut body = vec![0u8; 128];
    body.extend_from_slice(b"DICM");
    let uid = format!("{}.1", se(13).uid);
    let meta = meta_elements(true, &uid);
    body.extend(raw_element(
        0x0002,
        0x0000,
        b"UL",
        &(meta.len() as u32).to_le_bytes(),
    ));
    body.extend(meta);
    body.extend(raw_element(
        0x0008,
        0x0016,
        b"UI",
        b"1.2.840.10008.5.1.4.1.1.2\0",
    ));
    body.extend(raw_element(
        0x0008,
        0x0018,
        b"UI",
        format!("{uid}\0").as_bytes(),
    ));
    body.extend(raw_undefined(0x0008, 0x1140, b"SQ"));
    body.extend(raw_marker(0xE000, 0xFFFF_FFFF));
    body.extend(raw_element(
        0x0008,
        0x1150,
        b"UI",
        b"1.2.840.10008.5.1.4.1.1.2\0",
    ));
    body.extend(raw_marker(0xE0DD, 0)); // should be E00D first
    body.extend(raw_element(
        0x0010,
        0x0010,
        b"PN",
        format!("{identifying}^Delim ").as_bytes(),
    ));
    files.push(("wrong-item-delimiter", body));
    // A DICOMDIR naming the patient and an input path.
    let mut dir = InMemDicomObject::new_empty();
    put_text(&mut dir, Tag(0x0004, 0x1130), VR::CS, "ARCHIVE");
    dir.put(seq(
        Tag(0x0004, 0x1220),
        vec![item(vec![
            text(Tag(0x0004, 0x1430), VR::CS, "PATIENT"),
            text(Tag(0x0010, 0x0010), VR::PN, &p.name),
            text(Tag(0x0004, 0x1500), VR::CS, &format!("{identifying}\\IM1")),
        ])],
    ));
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid("1.2.840.10008.1.3.10")
        .media_storage_sop_instance_uid(format!("{}.99", st.uid))
        .transfer_syntax(ts::EXPLICIT_LE)
        .build()
        .map_err(io::Error::other)?;
    let mut out = Vec::new();
    dir.with_exact_meta(meta)
        .write_all(&mut out)
        .map_err(io::Error::other)?;
    files.push(("dicomdir", out));
    // A private sequence encoded as UN (CP-246: its content is implicit VR little endian), with
    // a person name inside; and a standard sequence the dictionary knows, encoded as UN.
    let mut un = encode(slice(14), ts::EXPLICIT_LE)?;
    let pixel_at = un.len() - (8 * 8 * 2 + 12);
    let mut inner = raw_marker(0xE000, 0xFFFF_FFFF);
    inner.extend(implicit_element(
        0x0010,
        0x0010,
        format!("{identifying}^Unseq ").as_bytes(),
    ));
    inner.extend(raw_marker(0xE00D, 0));
    inner.extend(raw_marker(0xE0DD, 0));
    let mut private = raw_element(0x0029, 0x0010, b"LO", b"ACME UN SEQ ");
    private.extend(raw_undefined(0x0029, 0x1001, b"UN"));
    private.extend(inner.clone());
    // (0040,A730) would sort later; use (0008,1115) Referenced Series Sequence, before pixels.
    let mut public = raw_undefined(0x0040, 0x0275, b"UN");
    public.extend(inner);
    let tail = un.split_off(pixel_at);
    // Elements must stay in tag order: insert before (0040,..)/(7FE0,0010) by rebuilding.
    let file = dicom_object::OpenFileOptions::new()
        .from_reader(encode(slice(14), ts::EXPLICIT_LE)?.as_slice())
        .map_err(io::Error::other)?;
    let mut head = Vec::new();
    file.meta().write(&mut head).map_err(io::Error::other)?;
    let mut obj: InMemDicomObject = file.into_inner();
    obj.remove_element(Tag(0x0040, 0x0275));
    obj.remove_element(Tag(0x7FE0, 0x0010));
    let mut ds = Vec::new();
    let explicit = dicom_encoding::TransferSyntaxIndex::get(
        &dicom_transfer_syntax_registry::TransferSyntaxRegistry,
        ts::EXPLICIT_LE,
    )
    .ok_or_else(|| io::Error::other("explicit VR little endian is registered"))?;
    obj.write_dataset_with_ts(&mut ds, explicit)
        .map_err(io::Error::other)?;
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    out.extend(head);
    // Data set elements are in tag order; 0029 and 0040 go after the rest of groups < 0x0029
    // only if nothing in between: split the data set at the first element of group >= 0x0029.
    let split = first_element_at_or_after(&ds, 0x0029).unwrap_or(ds.len());
    out.extend_from_slice(&ds[..split]);
    out.extend(private);
    let split2 = first_element_at_or_after(&ds, 0x0041).unwrap_or(ds.len());
    out.extend_from_slice(&ds[split..split2]);
    out.extend(public);
    out.extend_from_slice(&ds[split2..]);
    out.extend(tail);
    files.push(("un-sequences", out));
    Ok(files)
}

/// A file in `\ISO 2022 IR 87` (Japanese with code extensions): a kept Manufacturer and an
/// identifying Patient's Name both hold ISO 2022 escape sequences. Returns the file and the
/// raw bytes of the Manufacturer value.
pub fn iso2022_file() -> (Vec<u8>, Vec<u8>) {
    charset_file(b"\\ISO 2022 IR 87 ", b"\x1b$B\x3b\x33\x45\x44\x1b(B")
}

/// A file in a character set given by its raw Specific Character Set value, with `kept` (raw
/// bytes in that set) inside the kept Manufacturer and an identifying Patient's Name in it too.
pub fn charset_file(charset: &[u8], kept: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let pad = |mut b: Vec<u8>, with: u8| {
        if b.len() % 2 == 1 {
            b.push(with);
        }
        b
    };
    let uid = format!("{ORIGINAL_UID_ROOT}.4.1.1.1");
    let mut meta = raw_element(0x0002, 0x0001, b"OB", &[0, 1]);
    meta.extend(raw_element(
        0x0002,
        0x0002,
        b"UI",
        &pad(sop::CT.as_bytes().to_vec(), 0),
    ));
    meta.extend(raw_element(
        0x0002,
        0x0003,
        b"UI",
        &pad(uid.as_bytes().to_vec(), 0),
    ));
    meta.extend(raw_element(
        0x0002,
        0x0010,
        b"UI",
        &pad(ts::EXPLICIT_LE.as_bytes().to_vec(), 0),
    ));
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    out.extend(raw_element(
        0x0002,
        0x0000,
        b"UL",
        &(meta.len() as u32).to_le_bytes(),
    ));
    out.extend(meta);
    let manufacturer: Vec<u8> = [b"ACME ".as_slice(), kept].concat();
    let manufacturer = pad(manufacturer, b' ');
    let name: Vec<u8> = [
        b"Yamada^Tarou=".as_slice(),
        b"\x1b$B",
        &[0x3B, 0x33, 0x45, 0x44],
        b"\x1b(B",
        b"^",
        b"\x1b$B",
        &[0x42, 0x40, 0x4F, 0x3A],
        b"\x1b(B",
    ]
    .concat();
    out.extend(raw_element(0x0008, 0x0005, b"CS", charset));
    out.extend(raw_element(
        0x0008,
        0x0016,
        b"UI",
        &pad(sop::CT.as_bytes().to_vec(), 0),
    ));
    out.extend(raw_element(
        0x0008,
        0x0018,
        b"UI",
        &pad(uid.as_bytes().to_vec(), 0),
    ));
    out.extend(raw_element(0x0008, 0x0060, b"CS", b"CT"));
    out.extend(raw_element(0x0008, 0x0070, b"LO", &manufacturer));
    out.extend(raw_element(0x0010, 0x0010, b"PN", &pad(name, b' ')));
    out.extend(raw_element(0x0010, 0x0020, b"LO", b"JP-0001 "));
    out.extend(raw_element(
        0x0020,
        0x000D,
        b"UI",
        &pad(format!("{ORIGINAL_UID_ROOT}.4.1").into_bytes(), 0),
    ));
    out.extend(raw_element(
        0x0020,
        0x000E,
        b"UI",
        &pad(format!("{ORIGINAL_UID_ROOT}.4.1.1").into_bytes(), 0),
    ));
    (out, manufacturer)
}

/// NIfTI-1 (with an extension), NIfTI-2, and Analyze 7.5 (`.hdr`/`.img`) inputs with `marker`
/// planted in every text field, the extension, a JSON sidecar and the folder name. Returns
/// the image paths written and the volume they all hold.
pub fn nifti_fixtures(
    dir: &Path,
    marker: &str,
) -> io::Result<(Vec<PathBuf>, crate::volume::Volume)> {
    use crate::volume::{StoredType, Volume, nifti};
    let mut data = ndarray::Array4::<f32>::zeros((6, 5, 4, 1));
    for ((i, j, k, _), v) in data.indexed_iter_mut() {
        *v = (i * 100 + j * 10 + k) as f32 - 50.0;
    }
    let volume = Volume {
        data,
        affine: [
            [-1.5, 0.0, 0.0, 90.0],
            [0.0, 1.5, 0.0, -120.0],
            [0.0, 0.0, 3.0, -60.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
        stored: StoredType::I16,
    };
    let folder = dir.join(format!("{marker}_SUBJECT"));
    std::fs::create_dir_all(&folder)?;
    let text = |h: &mut [u8], at: usize, len: usize, s: &str| {
        let b = s.as_bytes();
        let n = b.len().min(len);
        h[at..at + n].copy_from_slice(&b[..n]);
    };
    let short = &marker[..marker.len().min(8)];
    // NIfTI-1 with every text field and one extension.
    let plain = nifti::encode(&volume);
    let mut h = plain[..348].to_vec();
    text(&mut h, 4, 10, short); // data_type
    text(&mut h, 14, 18, marker); // db_name
    text(&mut h, 148, 80, &format!("{marker} descrip")); // descrip
    text(&mut h, 228, 24, marker); // aux_file
    text(&mut h, 328, 16, marker); // intent_name
    let mut ext = Vec::new();
    let payload = format!("{marker} extension payload PatientName=Doe^Jane");
    let esize = (8 + payload.len()).div_ceil(16) * 16;
    ext.extend_from_slice(&(esize as i32).to_le_bytes());
    ext.extend_from_slice(&6i32.to_le_bytes()); // ecode: comment
    ext.extend_from_slice(payload.as_bytes());
    ext.resize(esize, 0);
    h[108..112].copy_from_slice(&((352 + esize) as f32).to_le_bytes());
    let mut n1 = h;
    n1.extend_from_slice(&[1, 0, 0, 0]);
    n1.extend_from_slice(&ext);
    n1.extend_from_slice(&plain[352..]);
    let p1 = folder.join(format!("{marker}_t1.nii.gz"));
    std::fs::write(&p1, crate::volume::nifti::gzip(&n1, 6)?)?;
    std::fs::write(
        folder.join(format!("{marker}_t1.json")),
        serde_json::to_vec(&serde_json::json!({
            "PatientName": marker, "InstitutionName": marker, "SeriesInstanceUID": format!("1.2.{}", marker.len()),
            "AcquisitionDateTime": "2019-03-12T10:00:00", "ImageComments": format!("{marker} comment"),
            "RepetitionTime": 2.3, "Modality": "MR",
        }))
        .map_err(io::Error::other)?,
    )?;
    // NIfTI-2 (540-byte header), little endian, int16, descrip planted.
    let mut h2 = vec![0u8; 544];
    h2[0..4].copy_from_slice(&540i32.to_le_bytes());
    h2[4..12].copy_from_slice(b"n+2\0\r\n\x1a\n");
    h2[12..14].copy_from_slice(&4i16.to_le_bytes());
    h2[14..16].copy_from_slice(&16i16.to_le_bytes());
    for (i, d) in [3i64, 6, 5, 4, 1, 1, 1, 1].iter().enumerate() {
        h2[16 + 8 * i..24 + 8 * i].copy_from_slice(&d.to_le_bytes());
    }
    for (i, p) in [1.0f64, 1.5, 1.5, 3.0].iter().enumerate() {
        h2[104 + 8 * i..112 + 8 * i].copy_from_slice(&p.to_le_bytes());
    }
    h2[168..176].copy_from_slice(&544i64.to_le_bytes());
    h2[176..184].copy_from_slice(&1.0f64.to_le_bytes());
    text(&mut h2, 240, 80, &format!("{marker} nifti2"));
    text(&mut h2, 320, 24, marker);
    text(&mut h2, 508, 16, marker);
    h2.extend_from_slice(&plain[352..]);
    let p2 = folder.join("scan_n2.nii");
    std::fs::write(&p2, &h2)?;
    // Analyze 7.5 pair, big endian.
    let mut a = vec![0u8; 348];
    a[0..4].copy_from_slice(&348i32.to_be_bytes());
    for (i, d) in [3i16, 6, 5, 4, 1].iter().enumerate() {
        a[40 + 2 * i..42 + 2 * i].copy_from_slice(&d.to_be_bytes());
    }
    a[70..72].copy_from_slice(&4i16.to_be_bytes());
    a[72..74].copy_from_slice(&16i16.to_be_bytes());
    for (i, p) in [0.0f32, 1.5, 1.5, 3.0].iter().enumerate() {
        a[76 + 4 * i..80 + 4 * i].copy_from_slice(&p.to_be_bytes());
    }
    text(&mut a, 148, 80, &format!("{marker} analyze"));
    for at in [253usize, 263, 273, 283, 293, 303] {
        text(&mut a, at, 10, short);
    }
    let mut img = Vec::new();
    for v in plain[352..].chunks(2) {
        img.extend_from_slice(&[v[1], v[0]]);
    }
    let pa = folder.join("scan_a.hdr");
    std::fs::write(&pa, &a)?;
    std::fs::write(folder.join("scan_a.img"), &img)?;
    Ok((vec![p1, p2, pa], volume))
}

/// Offset of the first top-level element of group >= `group` in an explicit VR LE data set.
fn first_element_at_or_after(ds: &[u8], group: u16) -> Option<usize> {
    let mut at = 0;
    while at + 8 <= ds.len() {
        let g = u16::from_le_bytes([ds[at], ds[at + 1]]);
        if g >= group {
            return Some(at);
        }
        let vr = &ds[at + 4..at + 6];
        let (header, len) = if matches!(
            vr,
            b"OB"
                | b"OW"
                | b"SQ"
                | b"UN"
                | b"UT"
                | b"UC"
                | b"UR"
                | b"OD"
                | b"OF"
                | b"OL"
                | b"OV"
                | b"SV"
                | b"UV"
        ) {
            (
                12,
                u32::from_le_bytes([ds[at + 8], ds[at + 9], ds[at + 10], ds[at + 11]]),
            )
        } else {
            (8, u32::from(u16::from_le_bytes([ds[at + 6], ds[at + 7]])))
        };
        if len == u32::MAX {
            return None; // undefined length: not needed by the fixtures above
        }
        at += header + len as usize;
    }
    None
}

/// Tag of an element, for callers without the `Header` trait in scope.
pub fn tag_of(e: &InMemElement) -> Tag {
    e.tag()
}

/// A hostile or damaged input: its name, its bytes, and the quarantine reason it must get
/// (`None`: it must be read and de-identified).
#[derive(Debug)]
pub struct HostileInput {
    pub name: &'static str,
    pub bytes: Vec<u8>,
    pub reason: Option<&'static str>,
}

/// A small valid file (explicit VR LE unless `syntax` says otherwise, no pixel data) whose
/// data set ends with elements of groups below 0x0019, so hostile elements can be appended.
fn hostile_base(syntax: &str) -> io::Result<Vec<u8>> {
    let mut o = InMemDicomObject::new_empty();
    put_text(&mut o, Tag(0x0008, 0x0016), VR::UI, sop::SECONDARY_CAPTURE);
    put_text(
        &mut o,
        Tag(0x0008, 0x0018),
        VR::UI,
        &format!("{ORIGINAL_UID_ROOT}.66.1"),
    );
    put_text(&mut o, Tag(0x0008, 0x0060), VR::CS, "OT");
    put_text(&mut o, Tag(0x0010, 0x0010), VR::PN, "HOSTILE^Input");
    put_text(&mut o, Tag(0x0010, 0x0020), VR::LO, "HOSTILE-ID");
    encode(o, syntax)
}

/// Inputs a stranger can craft in a few bytes to make a reader reserve gigabytes, or that
/// nest or compress without bound; each must be refused (or read) at a cost bounded by its
/// size plus a fixed budget.
pub fn hostile_files() -> io::Result<Vec<HostileInput>> {
    let mut out = Vec::new();
    // A UN element declaring about 4 GB, 16 bytes of it present.
    let mut b = hostile_base(ts::EXPLICIT_LE)?;
    b.extend_from_slice(&[0x19, 0x00, 0x10, 0x10, b'U', b'N', 0, 0]);
    b.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    b.extend_from_slice(&[0u8; 16]);
    out.push(HostileInput {
        name: "un-declares-4gb.dcm",
        bytes: b,
        reason: Some("truncated"),
    });
    // The same in implicit VR.
    let mut b = hostile_base(ts::IMPLICIT_LE)?;
    b.extend_from_slice(&implicit_element(0x0020, 0x0010, &[])[..4]);
    b.extend_from_slice(&0x7FFF_FFF0u32.to_le_bytes());
    b.extend_from_slice(b"ABCD");
    out.push(HostileInput {
        name: "implicit-declares-2gb.dcm",
        bytes: b,
        reason: Some("truncated"),
    });
    // A UN-encoded (CP-246) sequence whose item holds an element declaring 1 GB.
    let mut b = hostile_base(ts::EXPLICIT_LE)?;
    b.extend_from_slice(&raw_undefined(0x0019, 0x1020, b"UN"));
    b.extend_from_slice(&raw_marker(0xE000, u32::MAX));
    b.extend_from_slice(&[0x10, 0x00, 0x10, 0x00]);
    b.extend_from_slice(&0x4000_0000u32.to_le_bytes());
    b.extend_from_slice(b"DOE^JOHN");
    out.push(HostileInput {
        name: "un-sequence-item-declares-1gb.dcm",
        bytes: b,
        reason: Some("truncated"),
    });
    // Encapsulated (JPEG baseline) pixel data whose fragment declares about 2 GB.
    let mut b = hostile_base(ts::JPEG_BASELINE)?;
    b.extend_from_slice(&raw_undefined(0x7FE0, 0x0010, b"OB"));
    b.extend_from_slice(&raw_marker(0xE000, 0));
    b.extend_from_slice(&raw_marker(0xE000, 0x7FFF_FFF0));
    b.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xE0]);
    out.push(HostileInput {
        name: "jpeg-fragment-declares-2gb.dcm",
        bytes: b,
        reason: Some("truncated"),
    });
    // A file meta element declaring about 4 GB.
    let mut b = vec![0u8; 128];
    b.extend_from_slice(b"DICM");
    b.extend_from_slice(&raw_element(0x0002, 0x0000, b"UL", &12u32.to_le_bytes()));
    b.extend_from_slice(&[0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0]);
    b.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    b.extend_from_slice(&[0, 1]);
    out.push(HostileInput {
        name: "meta-declares-4gb.dcm",
        bytes: b,
        reason: Some("truncated"),
    });
    // Sequences nested 200 deep (the parser recurses once per level).
    let mut b = hostile_base(ts::EXPLICIT_LE)?;
    for _ in 0..200 {
        b.extend_from_slice(&raw_undefined(0x0040, 0x0275, b"SQ"));
        b.extend_from_slice(&raw_marker(0xE000, u32::MAX));
    }
    out.push(HostileInput {
        name: "nested-200-deep.dcm",
        bytes: b,
        reason: Some("nesting-too-deep"),
    });
    // A deflated data set that inflates to 256 MiB (a deflate bomb of a few hundred KB).
    {
        use std::io::Write;
        let base = hostile_base(ts::DEFLATED_LE)?;
        let meta_end =
            crate::read::lengths::check_meta(&base, 132).map_err(|p| io::Error::other(p.detail))?;
        let mut plain = Vec::new();
        flate2::read::DeflateDecoder::new(&base[meta_end..])
            .read_to_end(&mut plain)
            .map_err(io::Error::other)?;
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&plain)?;
        let bomb = 256u32 << 20;
        enc.write_all(&[0x19, 0x00, 0x10, 0x10, b'U', b'N', 0, 0])?;
        enc.write_all(&bomb.to_le_bytes())?;
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..256 {
            enc.write_all(&zeros)?;
        }
        let mut b = base[..meta_end].to_vec();
        b.extend_from_slice(&enc.finish()?);
        out.push(HostileInput {
            name: "deflate-bomb.dcm",
            bytes: b,
            reason: Some("deflated-too-large"),
        });
    }
    // Native pixel data whose rows × columns × frames × bits overflow 64 bits.
    let mut o = InMemDicomObject::new_empty();
    put_text(&mut o, Tag(0x0008, 0x0016), VR::UI, sop::SECONDARY_CAPTURE);
    put_text(
        &mut o,
        Tag(0x0008, 0x0018),
        VR::UI,
        &format!("{ORIGINAL_UID_ROOT}.66.2"),
    );
    put_text(&mut o, Tag(0x0008, 0x0060), VR::CS, "OT");
    put_u16(&mut o, Tag(0x0028, 0x0002), 3);
    put_text(&mut o, Tag(0x0028, 0x0004), VR::CS, "RGB");
    put_text(&mut o, Tag(0x0028, 0x0008), VR::IS, "2147483647");
    put_u16(&mut o, Tag(0x0028, 0x0010), 65535);
    put_u16(&mut o, Tag(0x0028, 0x0011), 65535);
    put_u16(&mut o, Tag(0x0028, 0x0100), 65535);
    o.put(DataElement::new(
        Tag(0x7FE0, 0x0010),
        VR::OB,
        PrimitiveValue::from(vec![0u8; 64]),
    ));
    out.push(HostileInput {
        name: "pixel-geometry-overflows.dcm",
        bytes: encode(o, ts::EXPLICIT_LE)?,
        reason: Some("truncated-pixel-data"),
    });
    Ok(out)
}

/// NIfTI inputs that declare or inflate to far more than they hold: (name, bytes, reason).
pub fn hostile_nifti() -> io::Result<Vec<HostileInput>> {
    use std::io::Write;
    let volume = crate::volume::Volume {
        data: ndarray::Array4::<f32>::from_elem((4, 4, 4, 1), 7.0),
        affine: [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
        stored: crate::volume::StoredType::U8,
    };
    let plain = crate::volume::nifti::encode(&volume);
    // 64 voxels, then 256 MiB of zeros, gzipped to about 256 KB.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..256 {
        gz.write_all(&zeros)?;
    }
    let mut out = vec![HostileInput {
        name: "inflates-to-256mib.nii.gz",
        bytes: gz.finish()?,
        reason: None,
    }];
    // NIfTI-2 whose dimensions multiply past 2^64.
    let mut h = vec![0u8; 544];
    h[0..4].copy_from_slice(&540i32.to_le_bytes());
    h[4..8].copy_from_slice(b"n+2\0");
    h[12..14].copy_from_slice(&2i16.to_le_bytes()); // uint8
    h[14..16].copy_from_slice(&8i16.to_le_bytes());
    h[16..24].copy_from_slice(&3i64.to_le_bytes());
    for d in 0..3 {
        h[24 + 8 * d..32 + 8 * d].copy_from_slice(&(1i64 << 40).to_le_bytes());
    }
    h[168..176].copy_from_slice(&544i64.to_le_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]);
    out.push(HostileInput {
        name: "dimensions-overflow.nii",
        bytes: h,
        reason: Some("unsupported-dimensions"),
    });
    Ok(out)
}

/// A CT slice as a converter without a dictionary writes it: its UIDs, the patient's name and
/// an Anatomic Region Sequence (content in implicit VR little endian) encoded as `UN` with
/// defined lengths. Returns the file and the original values that must not survive.
pub fn un_encoded_file() -> io::Result<(Vec<u8>, Vec<String>)> {
    let p = Patient {
        id: "UNENC-ID-4711".into(),
        issuer: "HOSP-U".into(),
        name: "UNENCODED^Patient".into(),
        birth_date: "19610203".into(),
        sex: "F".into(),
        charset: None,
    };
    let st = Study {
        uid: format!("{ORIGINAL_UID_ROOT}.77.1"),
        date: "20210304".into(),
        time: "090000".into(),
        accession: "UNACC77".into(),
        description: "head".into(),
        referring_physician: "Ref^Unenc".into(),
        institution: "Unencoded Hospital".into(),
    };
    let se = Series {
        uid: format!("{ORIGINAL_UID_ROOT}.77.1.1"),
        number: 1,
        description: "axial".into(),
        frame_of_reference: format!("{ORIGINAL_UID_ROOT}.77.1.1.0"),
        station: "CT77".into(),
    };
    let mut o = ct_slice(&p, &st, &se, 1);
    let un = |o: &mut InMemDicomObject, tag: Tag, value: &[u8]| {
        o.put(DataElement::new(
            tag,
            VR::UN,
            PrimitiveValue::U8(value.to_vec().into()),
        ));
    };
    let padded = |s: &str| {
        let mut b = s.as_bytes().to_vec();
        if b.len() % 2 == 1 {
            b.push(0);
        }
        b
    };
    let referenced = format!("{ORIGINAL_UID_ROOT}.77.9");
    un(&mut o, Tag(0x0008, 0x0016), &padded(sop::CT));
    un(
        &mut o,
        Tag(0x0008, 0x0018),
        &padded(&format!("{}.1", se.uid)),
    );
    un(&mut o, Tag(0x0020, 0x000D), &padded(&st.uid));
    un(&mut o, Tag(0x0020, 0x000E), &padded(&se.uid));
    un(&mut o, Tag(0x0010, 0x0010), &padded(&p.name));
    // Anatomic Region Sequence (kept by the profile, so walked): a code, and a UID that the
    // safety net must remap.
    let mut item = implicit_element(0x0008, 0x0100, &padded("T-A0100"));
    item.extend(implicit_element(0x0008, 0x0102, &padded("SRT")));
    item.extend(implicit_element(0x0008, 0x0104, &padded("Brain")));
    item.extend(implicit_element(0x0008, 0x1155, &padded(&referenced)));
    let mut seq = raw_marker(0xE000, item.len() as u32);
    seq.extend(item);
    un(&mut o, Tag(0x0008, 0x2218), &seq);
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop::CT)
        .media_storage_sop_instance_uid(format!("{}.1", se.uid))
        .transfer_syntax(ts::EXPLICIT_LE)
        .implementation_class_uid("1.2.826.0.1.3680043.10.543.99")
        .build()
        .map_err(io::Error::other)?;
    let mut bytes = Vec::new();
    o.with_exact_meta(meta)
        .write_all(&mut bytes)
        .map_err(io::Error::other)?;
    Ok((
        bytes,
        vec![p.id, p.name, st.uid, se.uid, referenced, "UNENCODED".into()],
    ))
}

fn write_seed(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let d = dir.join(target);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join(name), bytes)
}

fn seed_files_under(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(seed_files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Write seed corpora for every fuzz target (`crate::fuzzing::TARGETS`) under
/// `dir/<target>/`, made by this module's fixture builders; returns how many.
pub fn write_fuzz_seeds(dir: &Path) -> Result<usize, Box<dyn std::error::Error>> {
    let scratch_dir = dir.join(".scratch");
    let scratch = ScratchDir(&scratch_dir);
    // DICOM: the sample archive (every encoding), the messy and hostile files, UN-encoded.
    let archive = write_sample_archive(&scratch.path().join("archive"))?;
    let mut dicom: Vec<(String, Vec<u8>)> = Vec::new();
    for f in &archive.files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        dicom.push((format!("sample-{}-{name}", dicom.len()), std::fs::read(f)?));
    }
    for (name, bytes) in messy_files("SEED")? {
        dicom.push((format!("messy-{name}"), bytes));
    }
    for h in hostile_files()? {
        // The deflate bomb is large; the rest are small.
        if h.bytes.len() < 64 * 1024 {
            dicom.push((format!("hostile-{}", h.name), h.bytes));
        }
    }
    dicom.push(("un-encoded".into(), un_encoded_file()?.0));
    for (name, bytes) in &dicom {
        write_seed(dir, "dicom_ingest", name, bytes)?;
        write_seed(dir, "pixel_decode", name, bytes)?;
    }
    // DIMSE command sets and the PDUs that carry them.
    let commands = [
        crate::dimse::response(0x8030, 7, crate::dimse::VERIFICATION, None, 0),
        crate::dimse::response(0x8001, 9, sop::CT, Some("2.25.1"), 0),
        crate::dimse::scu::store_request(sop::CT, "2.25.77", 3),
    ];
    for (i, c) in commands.iter().enumerate() {
        write_seed(dir, "dimse_command", &format!("command-{i}"), c)?;
        let mut pdu = Vec::new();
        dicom_ul::pdu::write_pdu(
            &mut pdu,
            &dicom_ul::pdu::Pdu::PData {
                data: vec![dicom_ul::pdu::PDataValue {
                    presentation_context_id: 1,
                    value_type: dicom_ul::pdu::PDataValueType::Command,
                    is_last: true,
                    data: c.clone(),
                }],
            },
        )?;
        write_seed(dir, "pdu_stream", &format!("pdata-{i}"), &pdu)?;
    }
    let mut release = Vec::new();
    dicom_ul::pdu::write_pdu(&mut release, &dicom_ul::pdu::Pdu::ReleaseRQ)?;
    write_seed(dir, "pdu_stream", "release", &release)?;
    // NIfTI and Analyze, plain and gzip, and their sidecars.
    nifti_fixtures(&scratch.path().join("nifti"), "SEED")?;
    for p in seed_files_under(&scratch.path().join("nifti")) {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(&p)?;
        if name.ends_with(".json") {
            write_seed(dir, "sidecar", &name, &bytes)?;
        } else {
            write_seed(dir, "nifti_input", &name, &bytes)?;
        }
    }
    for h in hostile_nifti()? {
        if h.bytes.len() < 64 * 1024 {
            write_seed(dir, "nifti_input", h.name, &h.bytes)?;
        }
    }
    // Text inputs: the example schema and node.toml.
    write_seed(
        dir,
        "schema_text",
        "schema.toml",
        include_bytes!("../../deploy/schema.toml"),
    )?;
    write_seed(
        dir,
        "node_config",
        "node.toml",
        include_bytes!("../../deploy/node.toml"),
    )?;
    // Wire frames: a hello and a schema.
    let schema_text = include_str!("../../deploy/schema.toml");
    let frames = [
        protocol::Message::Hello(protocol::message::Hello {
            id: protocol::message::MessageId(1),
            min_version: 1,
            max_version: 1,
            site: protocol::message::SiteId::new("site-a")?,
            schema: None,
        }),
        protocol::Message::Schema {
            id: protocol::message::MessageId(2),
            reply_to: protocol::message::MessageId(1),
            document: protocol::message::SchemaDocument::new(schema_text)?,
        },
    ];
    for (i, m) in frames.iter().enumerate() {
        write_seed(
            dir,
            "wire_frame",
            &format!("frame-{i}"),
            &protocol::encode_frame(m)?,
        )?;
    }
    drop(scratch);
    Ok(seed_files_under(dir).len())
}

/// A folder removed when dropped.
struct ScratchDir<'a>(&'a Path);

impl ScratchDir<'_> {
    fn path(&self) -> &Path {
        self.0
    }
}

impl Drop for ScratchDir<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0);
    }
}
