//! Burned-in text: which objects may carry it, and masking rules that black out rectangles
//! of uncompressed pixel data in every frame. Pure functions over in-memory objects.

use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{DataElement, Tag, VR};
use dicom_object::InMemDicomObject;
use serde::Deserialize;

use fc_read::text;

/// A rectangle in pixel coordinates: columns `x..x+width`, rows `y..y+height`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// A masking rule: objects of this device and matrix size carry burned-in text in these
/// rectangles.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskingRule {
    /// Manufacturer (0008,0070), compared case-insensitively; any when absent.
    #[serde(default)]
    pub manufacturer: Option<String>,
    /// Manufacturer's Model Name (0008,1090), compared case-insensitively; any when absent.
    #[serde(default)]
    pub model: Option<String>,
    /// Rows (0028,0010) the rule applies to.
    pub rows: u16,
    /// Columns (0028,0011) the rule applies to.
    pub columns: u16,
    /// Areas to black out.
    pub rectangles: Vec<Rect>,
}

fn number(obj: &InMemDicomObject, tag: Tag) -> Option<u32> {
    let e = obj.get(tag)?;
    e.value()
        .to_int::<u32>()
        .ok()
        .or_else(|| e.value().to_str().ok()?.trim().parse().ok())
}

const ULTRASOUND_CLASSES: [&str; 3] = [
    "1.2.840.10008.5.1.4.1.1.6.1",
    "1.2.840.10008.5.1.4.1.1.6.2",
    "1.2.840.10008.5.1.4.1.1.3.1",
];

/// Modalities whose images carry burned-in text unless the producer says otherwise:
/// angiography and fluoroscopy (XA, RF), projection radiography (CR, DX, MG, IO, PX),
/// endoscopy (ES) and visible-light photographs (XC, GM).
const ANNOTATED_MODALITIES: [&str; 10] =
    ["XA", "RF", "CR", "DX", "MG", "IO", "PX", "ES", "XC", "GM"];

/// Why an object may carry burned-in text, if it may. Only an exact `NO` in Burned In
/// Annotation is trusted, and not for ultrasound, secondary capture and OT, whose producers
/// burn text in whatever they declare; whole-slide LABEL and OVERVIEW images carry the slide
/// label (a name, an accession number) whatever they declare.
pub fn burned_in_risk(obj: &InMemDicomObject) -> Option<&'static str> {
    let annotation = text(obj, Tag(0x0028, 0x0301)).trim().to_owned();
    if annotation.eq_ignore_ascii_case("YES") {
        return Some("Burned In Annotation is YES");
    }
    let class = text(obj, Tag(0x0008, 0x0016));
    let modality = text(obj, Tag(0x0008, 0x0060)).trim().to_ascii_uppercase();
    let conversion = text(obj, Tag(0x0008, 0x0064)).to_ascii_uppercase();
    let image_type = text(obj, Tag(0x0008, 0x0008)).to_ascii_uppercase();
    let types: Vec<&str> = image_type.split('\\').map(str::trim).collect();
    // Whatever they declare.
    if modality == "US" || ULTRASOUND_CLASSES.contains(&class.as_str()) {
        return Some("ultrasound (Burned In Annotation is not trusted)");
    }
    if class.starts_with("1.2.840.10008.5.1.4.1.1.7")
        || matches!(conversion.as_str(), "WSD" | "SYN")
    {
        return Some("secondary capture (Burned In Annotation is not trusted)");
    }
    if modality == "OT" {
        return Some("modality OT (Burned In Annotation is not trusted)");
    }
    if types.iter().any(|t| *t == "LABEL" || *t == "OVERVIEW") {
        return Some("whole-slide label or overview image");
    }
    // Exactly NO, as the standard spells it, is trusted for the rest.
    if annotation == "NO" {
        return None;
    }
    if !annotation.is_empty() {
        return Some("Burned In Annotation is neither YES nor NO");
    }
    if types.iter().any(|t| *t == "SCREEN" || *t == "SECONDARY") {
        Some("screen capture or secondary image without Burned In Annotation")
    } else if ANNOTATED_MODALITIES.contains(&modality.as_str()) {
        Some("projection, fluoroscopy, endoscopy or photograph without Burned In Annotation")
    } else {
        None
    }
}

/// Clear what native pixel data holds above High Bit: overlay planes stored in the unused
/// high bits of each word (an old practice, still found in archives) can hold text. Unsigned
/// samples get those bits zeroed; signed samples get the sign extension of High Bit (what
/// readers that ignore Bits Stored expect). Returns whether any word changed. Encapsulated
/// pixel data is left alone (its codecs store only Bits Stored).
pub fn clear_bits_above_high_bit(obj: &mut InMemDicomObject) -> bool {
    let bits = number(obj, Tag(0x0028, 0x0100)).unwrap_or(0);
    let Some(high) = number(obj, Tag(0x0028, 0x0102)) else {
        return false;
    };
    let signed = number(obj, Tag(0x0028, 0x0103)) == Some(1);
    if bits != 16 || high >= 15 {
        return false;
    }
    let mask: u16 = (1u16 << (high + 1)) - 1;
    let fix = |w: u16| -> u16 {
        if signed && (w >> high) & 1 == 1 {
            w | !mask
        } else {
            w & mask
        }
    };
    let Some(element) = obj.get(Tag(0x7FE0, 0x0010)) else {
        return false;
    };
    let vr = element.vr();
    let fixed = match element.value() {
        Value::Primitive(PrimitiveValue::U16(v)) => {
            if v.iter().all(|w| fix(*w) == *w) {
                return false;
            }
            PrimitiveValue::U16(v.iter().map(|w| fix(*w)).collect())
        }
        Value::Primitive(PrimitiveValue::I16(v)) => {
            if v.iter().all(|w| fix(*w as u16) == *w as u16) {
                return false;
            }
            PrimitiveValue::I16(v.iter().map(|w| fix(*w as u16) as i16).collect())
        }
        // 16-bit samples read as OB bytes (little endian).
        Value::Primitive(PrimitiveValue::U8(v)) if v.len() % 2 == 0 => {
            let mut out = v.clone();
            let mut changed = false;
            for pair in out.chunks_exact_mut(2) {
                let w = u16::from_le_bytes([pair[0], pair[1]]);
                let f = fix(w);
                if f != w {
                    changed = true;
                    pair.copy_from_slice(&f.to_le_bytes());
                }
            }
            if !changed {
                return false;
            }
            PrimitiveValue::U8(out)
        }
        _ => return false,
    };
    obj.put(DataElement::new(Tag(0x7FE0, 0x0010), vr, fixed));
    true
}

/// The rule that covers an object, if any.
pub fn matching_rule<'r>(
    obj: &InMemDicomObject,
    rules: &'r [MaskingRule],
) -> Option<&'r MaskingRule> {
    let manufacturer = text(obj, Tag(0x0008, 0x0070));
    let model = text(obj, Tag(0x0008, 0x1090));
    let rows = number(obj, Tag(0x0028, 0x0010));
    let cols = number(obj, Tag(0x0028, 0x0011));
    rules.iter().find(|r| {
        r.manufacturer
            .as_ref()
            .is_none_or(|m| m.eq_ignore_ascii_case(&manufacturer))
            && r.model
                .as_ref()
                .is_none_or(|m| m.eq_ignore_ascii_case(&model))
            && rows == Some(u32::from(r.rows))
            && cols == Some(u32::from(r.columns))
    })
}

/// Why masking could not be done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaskError {
    /// The pixel data is encapsulated (compressed); it is not decoded here.
    Compressed,
    /// The pixel data's layout is not one this masker handles.
    Unsupported(String),
}

/// Black out the rule's rectangles in every frame of native pixel data.
pub fn apply_mask(obj: &mut InMemDicomObject, rule: &MaskingRule) -> Result<(), MaskError> {
    let rows = number(obj, Tag(0x0028, 0x0010)).unwrap_or(0) as usize;
    let cols = number(obj, Tag(0x0028, 0x0011)).unwrap_or(0) as usize;
    let samples = number(obj, Tag(0x0028, 0x0002)).unwrap_or(1) as usize;
    let bits = number(obj, Tag(0x0028, 0x0100)).unwrap_or(0);
    let stored = number(obj, Tag(0x0028, 0x0101)).unwrap_or(bits);
    let planar = number(obj, Tag(0x0028, 0x0006)).unwrap_or(0) == 1;
    let frames = number(obj, Tag(0x0028, 0x0008)).unwrap_or(1).max(1) as usize;
    let photometric = text(obj, Tag(0x0028, 0x0004)).to_ascii_uppercase();
    // Black: 0, except MONOCHROME1 (where the largest value is black).
    let black: u32 = if photometric == "MONOCHROME1" {
        (1u32 << stored.min(31)) - 1
    } else {
        0
    };
    let Some(element) = obj.get(Tag(0x7FE0, 0x0010)) else {
        return Err(MaskError::Unsupported("no pixel data".into()));
    };
    let vr = element.vr();
    let mut value = match element.value() {
        Value::PixelSequence(_) => return Err(MaskError::Compressed),
        Value::Primitive(p) => p.clone(),
        Value::Sequence(_) => {
            return Err(MaskError::Unsupported("pixel data is a sequence".into()));
        }
    };
    let frame_pixels = rows * cols;
    let index = |frame: usize, sample: usize, r: usize, c: usize| {
        if planar {
            frame * frame_pixels * samples + sample * frame_pixels + r * cols + c
        } else {
            frame * frame_pixels * samples + (r * cols + c) * samples + sample
        }
    };
    let mut set = |i: usize| -> Result<(), MaskError> {
        match (&mut value, bits) {
            (PrimitiveValue::U8(v), 8) => *v.get_mut(i).ok_or_else(short)? = black as u8,
            (PrimitiveValue::U16(v), 16) => *v.get_mut(i).ok_or_else(short)? = black as u16,
            (PrimitiveValue::I16(v), 16) => *v.get_mut(i).ok_or_else(short)? = black as i16,
            // 8-bit samples read as OW words: mask byte by byte.
            (PrimitiveValue::U16(v), 8) => {
                let w = v.get_mut(i / 2).ok_or_else(short)?;
                let bytes = w.to_le_bytes();
                let mut b = bytes;
                b[i % 2] = black as u8;
                *w = u16::from_le_bytes(b);
            }
            // 16-bit samples read as OB bytes (little endian).
            (PrimitiveValue::U8(v), 16) => {
                let [lo, hi] = (black as u16).to_le_bytes();
                *v.get_mut(2 * i).ok_or_else(short)? = lo;
                *v.get_mut(2 * i + 1).ok_or_else(short)? = hi;
            }
            (other, _) => {
                return Err(MaskError::Unsupported(format!(
                    "{bits} bits allocated stored as {:?}",
                    std::mem::discriminant(other)
                )));
            }
        }
        Ok(())
    };
    for frame in 0..frames {
        for rect in &rule.rectangles {
            let (x0, y0) = (rect.x as usize, rect.y as usize);
            let x1 = (x0 + rect.width as usize).min(cols);
            let y1 = (y0 + rect.height as usize).min(rows);
            for r in y0..y1 {
                for c in x0..x1 {
                    for s in 0..samples {
                        set(index(frame, s, r, c))?;
                    }
                }
            }
        }
    }
    obj.put(DataElement::new(Tag(0x7FE0, 0x0010), vr, value));
    obj.put(DataElement::new(
        Tag(0x0028, 0x0301),
        VR::CS,
        PrimitiveValue::from("NO"),
    ));
    Ok(())
}

fn short() -> MaskError {
    MaskError::Unsupported("pixel data shorter than its geometry".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(bits: u16, frames: u32, photometric: &str) -> InMemDicomObject {
        let mut o = InMemDicomObject::new_empty();
        o.put(DataElement::new(
            Tag(0x0008, 0x0060),
            VR::CS,
            PrimitiveValue::from("US"),
        ));
        o.put(DataElement::new(
            Tag(0x0008, 0x0070),
            VR::LO,
            PrimitiveValue::from("Acme"),
        ));
        o.put(DataElement::new(
            Tag(0x0028, 0x0002),
            VR::US,
            PrimitiveValue::from(1u16),
        ));
        o.put(DataElement::new(
            Tag(0x0028, 0x0004),
            VR::CS,
            PrimitiveValue::from(photometric),
        ));
        o.put(DataElement::new(
            Tag(0x0028, 0x0008),
            VR::IS,
            PrimitiveValue::from(frames.to_string()),
        ));
        o.put(DataElement::new(
            Tag(0x0028, 0x0010),
            VR::US,
            PrimitiveValue::from(4u16),
        ));
        o.put(DataElement::new(
            Tag(0x0028, 0x0011),
            VR::US,
            PrimitiveValue::from(6u16),
        ));
        o.put(DataElement::new(
            Tag(0x0028, 0x0100),
            VR::US,
            PrimitiveValue::from(bits),
        ));
        o.put(DataElement::new(
            Tag(0x0028, 0x0101),
            VR::US,
            PrimitiveValue::from(bits),
        ));
        let n = 4 * 6 * frames as usize;
        let value = if bits == 8 {
            PrimitiveValue::U8(vec![200u8; n].into())
        } else {
            PrimitiveValue::U16(vec![1000u16; n].into())
        };
        o.put(DataElement::new(
            Tag(0x7FE0, 0x0010),
            if bits == 8 { VR::OB } else { VR::OW },
            value,
        ));
        o
    }

    fn rule() -> MaskingRule {
        MaskingRule {
            manufacturer: Some("ACME".into()),
            model: None,
            rows: 4,
            columns: 6,
            rectangles: vec![
                Rect {
                    x: 0,
                    y: 0,
                    width: 6,
                    height: 1,
                },
                Rect {
                    x: 4,
                    y: 2,
                    width: 10,
                    height: 10,
                },
            ],
        }
    }

    #[test]
    fn masks_every_frame_inside_the_rectangles_only() {
        for bits in [8u16, 16] {
            let mut o = image(bits, 2, "MONOCHROME2");
            assert_eq!(
                burned_in_risk(&o),
                Some("ultrasound (Burned In Annotation is not trusted)")
            );
            let r = rule();
            assert!(matching_rule(&o, std::slice::from_ref(&r)).is_some());
            apply_mask(&mut o, &r).expect("masked");
            let px = o
                .get(Tag(0x7FE0, 0x0010))
                .expect("pixels")
                .value()
                .to_bytes()
                .expect("bytes")
                .into_owned();
            let bpp = usize::from(bits / 8);
            for f in 0..2 {
                for row in 0..4 {
                    for col in 0..6 {
                        let i = ((f * 4 + row) * 6 + col) * bpp;
                        let masked = row == 0 || (row >= 2 && col >= 4);
                        let v = px[i];
                        assert_eq!(v == 0, masked, "bits {bits} frame {f} ({row},{col})");
                    }
                }
            }
            assert_eq!(
                text(&o, Tag(0x0028, 0x0301)),
                "NO",
                "marked NO after masking"
            );
        }
    }

    #[test]
    fn monochrome1_black_is_the_largest_value_and_rules_must_match() {
        let mut o = image(16, 1, "MONOCHROME1");
        apply_mask(&mut o, &rule()).expect("masked");
        let px = o
            .get(Tag(0x7FE0, 0x0010))
            .expect("pixels")
            .value()
            .to_multi_int::<u16>()
            .expect("words");
        assert_eq!(px[0], 0xFFFF);
        let other = MaskingRule { rows: 5, ..rule() };
        assert!(matching_rule(&image(8, 1, "MONOCHROME2"), &[other]).is_none());
        let wrong_maker = MaskingRule {
            manufacturer: Some("Other".into()),
            ..rule()
        };
        assert!(matching_rule(&image(8, 1, "MONOCHROME2"), &[wrong_maker]).is_none());
    }

    #[test]
    fn risk_rules() {
        let mut o = InMemDicomObject::new_empty();
        o.put(DataElement::new(
            Tag(0x0008, 0x0060),
            VR::CS,
            PrimitiveValue::from("CT"),
        ));
        assert_eq!(burned_in_risk(&o), None);
        o.put(DataElement::new(
            Tag(0x0008, 0x0008),
            VR::CS,
            PrimitiveValue::from("DERIVED\\SECONDARY"),
        ));
        assert!(burned_in_risk(&o).is_some());
        o.put(DataElement::new(
            Tag(0x0028, 0x0301),
            VR::CS,
            PrimitiveValue::from("NO"),
        ));
        assert_eq!(burned_in_risk(&o), None, "an explicit NO is trusted");
        let mut sc = InMemDicomObject::new_empty();
        sc.put(DataElement::new(
            Tag(0x0008, 0x0016),
            VR::UI,
            PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.7"),
        ));
        assert!(burned_in_risk(&sc).is_some());
        let mut yes = InMemDicomObject::new_empty();
        yes.put(DataElement::new(
            Tag(0x0028, 0x0301),
            VR::CS,
            PrimitiveValue::from("YES"),
        ));
        assert_eq!(burned_in_risk(&yes), Some("Burned In Annotation is YES"));
    }

    #[test]
    fn bits_above_high_bit_are_cleared() {
        let mut o = image(16, 1, "MONOCHROME2");
        o.put(DataElement::new(
            Tag(0x0028, 0x0101),
            VR::US,
            PrimitiveValue::from(12u16),
        ));
        o.put(DataElement::new(
            Tag(0x0028, 0x0102),
            VR::US,
            PrimitiveValue::from(11u16),
        ));
        // An overlay in bit 15 of some words (text drawn in the overlay plane).
        let words: Vec<u16> = (0..24u16)
            .map(|i| (i * 100) | if i % 3 == 0 { 0x8000 } else { 0 })
            .collect();
        o.put(DataElement::new(
            Tag(0x7FE0, 0x0010),
            VR::OW,
            PrimitiveValue::U16(words.clone().into()),
        ));
        assert!(clear_bits_above_high_bit(&mut o));
        let out: Vec<u16> = o
            .get(Tag(0x7FE0, 0x0010))
            .expect("pixels")
            .value()
            .to_multi_int::<u16>()
            .expect("words");
        let expected: Vec<u16> = words.iter().map(|w| w & 0x0FFF).collect();
        assert_eq!(out, expected);
        assert!(!clear_bits_above_high_bit(&mut o), "nothing left to clear");
        // Signed samples keep the sign extension of High Bit and lose the rest.
        o.put(DataElement::new(
            Tag(0x0028, 0x0103),
            VR::US,
            PrimitiveValue::from(1u16),
        ));
        let minus_1000 = (-1000i16) as u16 & 0x0FFF;
        o.put(DataElement::new(
            Tag(0x7FE0, 0x0010),
            VR::OW,
            PrimitiveValue::U16(vec![minus_1000 | 0x4000, 1000 | 0x8000, 5].into()),
        ));
        assert!(clear_bits_above_high_bit(&mut o));
        let out: Vec<u16> = o
            .get(Tag(0x7FE0, 0x0010))
            .expect("pixels")
            .value()
            .to_multi_int::<u16>()
            .expect("words");
        assert_eq!(out, vec![(-1000i16) as u16, 1000, 5]);
    }

    fn object(pairs: &[(Tag, VR, &str)]) -> InMemDicomObject {
        let mut o = InMemDicomObject::new_empty();
        for (tag, vr, v) in pairs {
            o.put(DataElement::new(*tag, *vr, PrimitiveValue::from(*v)));
        }
        o
    }

    #[test]
    fn only_an_exact_no_is_trusted_and_not_for_every_modality() {
        let modality = Tag(0x0008, 0x0060);
        let annotation = Tag(0x0028, 0x0301);
        // Modalities that usually burn text in are flagged without an explicit NO.
        for m in ["XA", "RF", "CR", "DX", "ES", "XC", "GM"] {
            assert!(
                burned_in_risk(&object(&[(modality, VR::CS, m)])).is_some(),
                "{m} without Burned In Annotation"
            );
            assert_eq!(
                burned_in_risk(&object(&[
                    (modality, VR::CS, m),
                    (annotation, VR::CS, "NO")
                ])),
                None,
                "{m} marked NO"
            );
        }
        // Any value but YES or NO is not trusted.
        for v in ["N", "UNKNOWN", "NONE"] {
            assert!(
                burned_in_risk(&object(&[
                    (modality, VR::CS, "CT"),
                    (annotation, VR::CS, v)
                ]))
                .is_some(),
                "{v}"
            );
        }
        // Ultrasound, secondary capture and OT marked NO are still flagged.
        for m in ["US", "OT"] {
            assert!(
                burned_in_risk(&object(&[
                    (modality, VR::CS, m),
                    (annotation, VR::CS, "NO")
                ]))
                .is_some(),
                "{m} marked NO"
            );
        }
        let sc = object(&[
            (Tag(0x0008, 0x0016), VR::UI, "1.2.840.10008.5.1.4.1.1.7"),
            (annotation, VR::CS, "NO"),
        ]);
        assert!(burned_in_risk(&sc).is_some());
        // Whole-slide label and overview images.
        for t in [
            "ORIGINAL\\PRIMARY\\LABEL\\NONE",
            "ORIGINAL\\PRIMARY\\OVERVIEW\\NONE",
        ] {
            let o = object(&[
                (modality, VR::CS, "SM"),
                (Tag(0x0008, 0x0008), VR::CS, t),
                (annotation, VR::CS, "NO"),
            ]);
            assert!(burned_in_risk(&o).is_some(), "{t}");
        }
        let volume = object(&[
            (modality, VR::CS, "SM"),
            (
                Tag(0x0008, 0x0008),
                VR::CS,
                "ORIGINAL\\PRIMARY\\VOLUME\\NONE",
            ),
            (annotation, VR::CS, "NO"),
        ]);
        assert_eq!(burned_in_risk(&volume), None);
    }
}
