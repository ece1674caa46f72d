//! DICOM conformance of one instance against its IOD (PS3.3 tables in `node/data/standard`):
//! mandatory modules present, Type 1 attributes present and non-empty, Type 2 present (in
//! mandatory modules, and in conditional or optional modules that are present), VR and VM
//! valid against the data dictionary, and the Image Pixel module consistent with itself.
//! Findings name tags and codes, never values.

use dicom_core::header::Header;
use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{Tag, VR};
use dicom_object::InMemDicomObject;
use dicom_object::mem::InMemElement;

use super::{Finding, Severity};
use fc_deid::dictionary::Dictionary;
use fc_deid::iod::{AttrType, IodTables, Usage};

fn tag_text(t: Tag) -> String {
    format!("({:04X},{:04X})", t.group(), t.element())
}

fn is_empty(e: &InMemElement) -> bool {
    match e.value() {
        Value::Primitive(PrimitiveValue::Empty) => true,
        Value::Primitive(p) => {
            p.to_str().trim_matches([' ', '\0']).is_empty() && p.calculate_byte_len() <= 1
        }
        Value::Sequence(s) => s.items().is_empty(),
        Value::PixelSequence(s) => s.fragments().is_empty(),
    }
}

fn multiplicity(e: &InMemElement) -> Option<u32> {
    match (e.vr(), e.value()) {
        (_, Value::Primitive(PrimitiveValue::Empty)) => None,
        (
            VR::SQ
            | VR::OB
            | VR::OW
            | VR::OF
            | VR::OD
            | VR::OL
            | VR::OV
            | VR::UN
            | VR::UT
            | VR::LT
            | VR::ST
            | VR::UR,
            _,
        ) => None,
        (_, Value::Primitive(p)) => Some(p.multiplicity()),
        _ => None,
    }
}

fn number(obj: &InMemDicomObject, tag: Tag) -> Option<u64> {
    let e = obj.get(tag)?;
    e.value()
        .to_int::<u64>()
        .ok()
        .or_else(|| e.value().to_str().ok()?.trim().parse().ok())
}

/// Check one instance. `explicit_vr` says whether the file carried VRs (implicit VR files get
/// their VRs from the dictionary, so the VR check does not apply).
pub fn check(
    obj: &InMemDicomObject,
    explicit_vr: bool,
    iods: &IodTables,
    dict: &Dictionary,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let class = obj
        .get(Tag(0x0008, 0x0016))
        .and_then(|e| {
            e.value()
                .to_str()
                .ok()
                .map(|s| s.trim_matches([' ', '\0']).to_owned())
        })
        .unwrap_or_default();
    match iods.modules(&class) {
        None => out.push(Finding::new(
            "sop-class-not-covered",
            Severity::Info,
            None,
            "the IOD tables do not cover this SOP class; only VR, VM and pixel checks apply",
        )),
        Some(modules) => {
            for m in modules {
                let present = m.attributes.iter().any(|(t, _)| obj.get(*t).is_some());
                let required_attrs = m
                    .attributes
                    .iter()
                    .any(|(_, ty)| matches!(ty, AttrType::One | AttrType::Two));
                if m.usage == Usage::Mandatory && !present && required_attrs {
                    out.push(Finding::new(
                        "missing-module",
                        Severity::Error,
                        None,
                        &format!("mandatory module {} is absent", m.key),
                    ));
                    continue;
                }
                if m.usage != Usage::Mandatory && !present {
                    continue;
                }
                for &(tag, ty) in &m.attributes {
                    match (ty, obj.get(tag)) {
                        (AttrType::One, None) => out.push(Finding::new(
                            "missing-type1",
                            Severity::Error,
                            Some(tag),
                            &format!(
                                "Type 1 attribute {} of module {} is absent",
                                tag_text(tag),
                                m.key
                            ),
                        )),
                        (AttrType::One, Some(e)) if is_empty(e) => out.push(Finding::new(
                            "empty-type1",
                            Severity::Error,
                            Some(tag),
                            &format!(
                                "Type 1 attribute {} of module {} is empty",
                                tag_text(tag),
                                m.key
                            ),
                        )),
                        (AttrType::Two, None) => out.push(Finding::new(
                            "missing-type2",
                            Severity::Warning,
                            Some(tag),
                            &format!(
                                "Type 2 attribute {} of module {} is absent",
                                tag_text(tag),
                                m.key
                            ),
                        )),
                        _ => {}
                    }
                }
            }
        }
    }
    for e in obj.iter() {
        let tag = e.tag();
        if tag.group() % 2 == 1 || tag.element() == 0 {
            continue;
        }
        let Some(entry) = dict.entry(tag) else {
            continue;
        };
        if explicit_vr && e.vr() != VR::UN && !entry.vrs.is_empty() && !entry.vrs.contains(&e.vr())
        {
            out.push(Finding::new(
                "invalid-vr",
                Severity::Error,
                Some(tag),
                &format!(
                    "{} has VR {:?}, the dictionary says {:?}",
                    tag_text(tag),
                    e.vr(),
                    entry.vrs
                ),
            ));
        }
        if let (Some(vm), Some(n)) = (entry.vm, multiplicity(e))
            && !vm.allows(n)
        {
            out.push(Finding::new(
                "invalid-vm",
                Severity::Error,
                Some(tag),
                &format!(
                    "{} holds {n} values; its VM is {}{}",
                    tag_text(tag),
                    vm.min,
                    vm.max.map_or("-n".to_owned(), |m| if m == vm.min {
                        String::new()
                    } else {
                        format!("-{m}")
                    })
                ),
            ));
        }
    }
    pixel_module(obj, &mut out);
    out
}

fn pixel_module(obj: &InMemDicomObject, out: &mut Vec<Finding>) {
    let Some(pixels) = obj.get(Tag(0x7FE0, 0x0010)) else {
        return;
    };
    let samples = number(obj, Tag(0x0028, 0x0002)).unwrap_or(1);
    let photometric = obj
        .get(Tag(0x0028, 0x0004))
        .and_then(|e| {
            e.value()
                .to_str()
                .ok()
                .map(|s| s.trim().to_ascii_uppercase())
        })
        .unwrap_or_default();
    let expected_samples = match photometric.as_str() {
        "MONOCHROME1" | "MONOCHROME2" | "PALETTE COLOR" => Some(1),
        "RGB" | "YBR_FULL" | "YBR_FULL_422" | "YBR_ICT" | "YBR_RCT" | "YBR_PARTIAL_420" => Some(3),
        _ => None,
    };
    if let Some(e) = expected_samples
        && e != samples
    {
        out.push(Finding::new("samples-photometric-mismatch", Severity::Error, Some(Tag(0x0028, 0x0002)), &format!("Samples per Pixel is {samples} but Photometric Interpretation {photometric} needs {e}")));
    }
    let allocated = number(obj, Tag(0x0028, 0x0100)).unwrap_or(0);
    let stored = number(obj, Tag(0x0028, 0x0101)).unwrap_or(0);
    let high = number(obj, Tag(0x0028, 0x0102));
    if stored > allocated {
        out.push(Finding::new(
            "bits-stored-exceed-allocated",
            Severity::Error,
            Some(Tag(0x0028, 0x0101)),
            &format!("Bits Stored {stored} exceeds Bits Allocated {allocated}"),
        ));
    }
    if let Some(h) = high
        && stored > 0
        && h != stored - 1
    {
        out.push(Finding::new(
            "high-bit-mismatch",
            Severity::Error,
            Some(Tag(0x0028, 0x0102)),
            &format!("High Bit is {h}, expected Bits Stored − 1 = {}", stored - 1),
        ));
    }
    if let Value::Primitive(p) = pixels.value() {
        let rows = number(obj, Tag(0x0028, 0x0010)).unwrap_or(0);
        let cols = number(obj, Tag(0x0028, 0x0011)).unwrap_or(0);
        let frames = number(obj, Tag(0x0028, 0x0008)).unwrap_or(1).max(1);
        let expected = (rows * cols * frames * samples * allocated).div_ceil(8);
        let actual = p.calculate_byte_len() as u64;
        if expected > 0 && actual != expected && actual != expected + 1 {
            out.push(Finding::new("pixel-data-length", Severity::Error, Some(Tag(0x7FE0, 0x0010)), &format!("Pixel Data holds {actual} bytes; rows × columns × frames × samples × bits allocated need {expected}")));
        }
    }
}
