//! Burned-in text: which objects may carry it, and masking rules that black out rectangles
//! of uncompressed pixel data in every frame. Pure functions over in-memory objects.

use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{DataElement, Tag, VR};
use dicom_object::InMemDicomObject;
use serde::Deserialize;

use crate::read::text;

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

/// Why an object may carry burned-in text, if it may.
pub fn burned_in_risk(obj: &InMemDicomObject) -> Option<&'static str> {
    let annotation = text(obj, Tag(0x0028, 0x0301)).to_ascii_uppercase();
    if annotation == "YES" {
        return Some("Burned In Annotation is YES");
    }
    if !annotation.is_empty() {
        return None;
    }
    let class = text(obj, Tag(0x0008, 0x0016));
    let modality = text(obj, Tag(0x0008, 0x0060)).to_ascii_uppercase();
    let conversion = text(obj, Tag(0x0008, 0x0064)).to_ascii_uppercase();
    let image_type = text(obj, Tag(0x0008, 0x0008)).to_ascii_uppercase();
    if modality == "US" || ULTRASOUND_CLASSES.contains(&class.as_str()) {
        Some("ultrasound without Burned In Annotation")
    } else if class.starts_with("1.2.840.10008.5.1.4.1.1.7")
        || matches!(conversion.as_str(), "WSD" | "SYN")
    {
        Some("secondary capture without Burned In Annotation")
    } else if image_type
        .split('\\')
        .any(|v| v == "SCREEN" || v == "SECONDARY")
    {
        Some("screen capture or secondary image without Burned In Annotation")
    } else if modality == "OT" {
        Some("modality OT without Burned In Annotation")
    } else {
        None
    }
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
                Some("ultrasound without Burned In Annotation")
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
            assert_eq!(burned_in_risk(&o), None, "marked NO after masking");
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
}
