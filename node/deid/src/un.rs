//! Attributes encoded as `UN`, re-interpreted before de-identification.
//!
//! Some PACS and converters write standard attributes with explicit VR `UN` (an implicit VR
//! file converted without a dictionary). Read as they are, such attributes are opaque bytes:
//! UIDs come out empty, text inside is never examined. As dcmtk and pydicom do, every `UN`
//! element whose tag the data dictionary knows is decoded with the dictionary's VR, including
//! sequences (their content is implicit VR little endian, PS3.5 §6.2.2), which are then walked
//! like any other. Private `UN` sequences are walked when their creator is on the safe-private
//! list; other private `UN` elements are left to the private-attribute rules (kept only when
//! safe-listed). A standard element that cannot be re-interpreted is removed, never kept as
//! opaque bytes. Pure over the object.

use std::borrow::Cow;
use std::collections::HashMap;

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_object::mem::InMemElement;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::dictionary::Dictionary;
use super::private::{PrivateKind, SafePrivate, private_kind};
use fc_read::lengths::{self, Encoding};

/// Whether any element at any depth is encoded as `UN`.
pub fn contains_un(obj: &InMemDicomObject) -> bool {
    obj.iter().any(|e| {
        e.vr() == VR::UN
            || matches!(e.value(), Value::Sequence(s) if s.items().iter().any(contains_un))
    })
}

/// The object with every `UN` element re-interpreted (or removed), or `None` when it holds
/// no `UN` element.
pub fn reinterpret(
    obj: &InMemDicomObject,
    big_endian: bool,
    dictionary: &Dictionary,
    safe: &SafePrivate,
) -> Option<InMemDicomObject> {
    if !contains_un(obj) {
        return None;
    }
    Some(
        Reinterpreter {
            big_endian,
            dictionary,
            safe,
        }
        .data_set(obj, 0),
    )
}

struct Reinterpreter<'a> {
    big_endian: bool,
    dictionary: &'a Dictionary,
    safe: &'a SafePrivate,
}

impl Reinterpreter<'_> {
    fn data_set(&self, obj: &InMemDicomObject, depth: usize) -> InMemDicomObject {
        // Private creators first (they may themselves be UN: text either way).
        let mut creators: HashMap<(u16, u8), String> = HashMap::new();
        for e in obj.iter() {
            let t = e.tag();
            if !t.group().is_multiple_of(2)
                && let PrivateKind::Creator { block } = private_kind(t)
            {
                creators.insert((t.group(), block), text_of_bytes(&bytes_of(e)).into_owned());
            }
        }
        let mut out = Vec::new();
        for e in obj.iter() {
            let tag = e.tag();
            let new = match e.value() {
                Value::Sequence(s) => Some(sequence(
                    tag,
                    s.items()
                        .iter()
                        .map(|i| self.data_set(i, depth + 1))
                        .collect(),
                )),
                _ if e.vr() != VR::UN => Some(e.clone()),
                _ if !tag.group().is_multiple_of(2) => match private_kind(tag) {
                    PrivateKind::Creator { .. } => Some(DataElement::new(
                        tag,
                        VR::LO,
                        PrimitiveValue::from(text_of_bytes(&bytes_of(e)).into_owned()),
                    )),
                    PrivateKind::Data { block } => {
                        let bytes = bytes_of(e);
                        let safe = creators
                            .get(&(tag.group(), block))
                            .is_some_and(|c| self.safe.is_safe(tag, c));
                        if opens_with_item(&bytes) {
                            // A private sequence: walked only under a known creator.
                            safe.then(|| self.as_sequence(tag, &bytes, depth)).flatten()
                        } else {
                            // Left to the private rules (kept only when safe-listed).
                            Some(e.clone())
                        }
                    }
                    PrivateKind::Other => None,
                },
                _ => {
                    let bytes = bytes_of(e);
                    match self.dictionary.vr(tag) {
                        Some(VR::SQ) => self.as_sequence(tag, &bytes, depth),
                        Some(vr) => self.as_value(tag, vr, &bytes),
                        None => None,
                    }
                }
            };
            if let Some(n) = new {
                out.push(n);
            }
        }
        InMemDicomObject::from_element_iter(out)
    }

    /// Parse a sequence's content (implicit VR little endian) and walk its items.
    fn as_sequence(&self, tag: Tag, content: &[u8], depth: usize) -> Option<InMemElement> {
        if depth >= lengths::MAX_DEPTH {
            return None;
        }
        let mut wrapped = Vec::with_capacity(content.len() + 16);
        wrapped.extend_from_slice(&tag.group().to_le_bytes());
        wrapped.extend_from_slice(&tag.element().to_le_bytes());
        wrapped.extend_from_slice(&u32::MAX.to_le_bytes());
        wrapped.extend_from_slice(content);
        wrapped.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        lengths::check_dataset(&wrapped, Encoding::IMPLICIT_LE).ok()?;
        let ts = TransferSyntaxRegistry.get("1.2.840.10008.1.2")?;
        let parsed = InMemDicomObject::read_dataset_with_ts(wrapped.as_slice(), ts).ok()?;
        let element = parsed.get(tag)?;
        let Value::Sequence(s) = element.value() else {
            return None;
        };
        let items = s
            .items()
            .iter()
            .map(|i| {
                // Inside, elements the parser could not type are UN again: recurse.
                self.data_set(i, depth + 1)
            })
            .collect();
        Some(sequence(tag, items))
    }

    /// Decode a value's bytes with the dictionary's VR.
    fn as_value(&self, tag: Tag, vr: VR, bytes: &[u8]) -> Option<InMemElement> {
        let value = match vr {
            // Single-valued text: a backslash is part of the value.
            VR::LT | VR::ST | VR::UT | VR::UR => {
                PrimitiveValue::from(text_of_bytes(bytes).into_owned())
            }
            vr if super::is_text_vr(vr) => {
                let text = text_of_bytes(bytes);
                if text.is_empty() {
                    PrimitiveValue::Empty
                } else {
                    let parts: Vec<String> = text.split('\\').map(str::to_owned).collect();
                    if parts.len() == 1 {
                        PrimitiveValue::from(text.into_owned())
                    } else {
                        PrimitiveValue::Strs(parts.into())
                    }
                }
            }
            VR::US => PrimitiveValue::U16(self.numbers(bytes, |b| self.u16(b))?.into()),
            VR::SS => PrimitiveValue::I16(
                self.numbers(bytes, |b| self.u16(b).map(|v| v as i16))?
                    .into(),
            ),
            VR::UL => PrimitiveValue::U32(self.numbers(bytes, |b| self.u32(b))?.into()),
            VR::SL => PrimitiveValue::I32(
                self.numbers(bytes, |b| self.u32(b).map(|v| v as i32))?
                    .into(),
            ),
            VR::FL => PrimitiveValue::F32(
                self.numbers(bytes, |b| self.u32(b).map(f32::from_bits))?
                    .into(),
            ),
            VR::FD => PrimitiveValue::F64(
                self.numbers(bytes, |b| self.u64(b).map(f64::from_bits))?
                    .into(),
            ),
            VR::AT => {
                let halves: Vec<u16> = self.numbers(bytes, |b| self.u16(b))?;
                if !halves.len().is_multiple_of(2) {
                    return None;
                }
                PrimitiveValue::Tags(
                    halves
                        .chunks(2)
                        .map(|c| Tag(c[0], c[1]))
                        .collect::<Vec<_>>()
                        .into(),
                )
            }
            VR::OB | VR::OW | VR::OF | VR::OD | VR::OL | VR::OV => {
                PrimitiveValue::U8(bytes.to_vec().into())
            }
            _ => return None,
        };
        Some(DataElement::new(tag, vr, value))
    }

    fn numbers<T, const N: usize>(
        &self,
        bytes: &[u8],
        read: impl Fn([u8; N]) -> Option<T>,
    ) -> Option<Vec<T>> {
        if !bytes.len().is_multiple_of(N) {
            return None;
        }
        bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                read(a)
            })
            .collect()
    }

    fn u16(&self, b: [u8; 2]) -> Option<u16> {
        Some(if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&self, b: [u8; 4]) -> Option<u32> {
        Some(if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    fn u64(&self, b: [u8; 8]) -> Option<u64> {
        Some(if self.big_endian {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        })
    }
}

fn sequence(tag: Tag, items: Vec<InMemDicomObject>) -> InMemElement {
    DataElement::new(
        tag,
        VR::SQ,
        Value::from(DataSetSequence::new(items, Length::UNDEFINED)),
    )
}

/// The raw bytes of a `UN` element's value.
fn bytes_of(e: &InMemElement) -> Cow<'_, [u8]> {
    match e.value() {
        Value::Primitive(PrimitiveValue::U8(b)) => Cow::Borrowed(b.as_slice()),
        Value::Primitive(PrimitiveValue::Empty) => Cow::Borrowed(&[]),
        Value::Primitive(p) => Cow::Owned(p.to_bytes().into_owned()),
        _ => Cow::Borrowed(&[]),
    }
}

/// Text from bytes: UTF-8 when valid, otherwise byte for byte (ISO 8859-1); DICOM padding
/// (trailing spaces and NUL) removed.
fn text_of_bytes(bytes: &[u8]) -> Cow<'_, str> {
    let text = match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(bytes.iter().map(|&b| char::from(b)).collect()),
    };
    match text {
        Cow::Borrowed(s) => Cow::Borrowed(s.trim_end_matches([' ', '\0'])),
        Cow::Owned(s) => Cow::Owned(s.trim_end_matches([' ', '\0']).to_owned()),
    }
}

fn opens_with_item(bytes: &[u8]) -> bool {
    bytes.get(0..4) == Some(&[0xFE, 0xFF, 0x00, 0xE0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn un(tag: Tag, bytes: &[u8]) -> InMemElement {
        DataElement::new(tag, VR::UN, PrimitiveValue::U8(bytes.to_vec().into()))
    }

    fn implicit(tag: Tag, value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&tag.group().to_le_bytes());
        v.extend_from_slice(&tag.element().to_le_bytes());
        v.extend_from_slice(&(value.len() as u32).to_le_bytes());
        v.extend_from_slice(value);
        v
    }

    fn reinterpreted(elements: Vec<InMemElement>) -> InMemDicomObject {
        reinterpret(
            &InMemDicomObject::from_element_iter(elements),
            false,
            Dictionary::standard(),
            SafePrivate::standard(),
        )
        .expect("has UN")
    }

    fn text(o: &InMemDicomObject, tag: Tag) -> (VR, String) {
        let e = o.get(tag).expect("present");
        (e.vr(), e.value().to_str().expect("text").into_owned())
    }

    #[test]
    fn standard_values_get_their_dictionary_vr() {
        let o = reinterpreted(vec![
            un(Tag(0x0008, 0x0016), b"1.2.840.10008.5.1.4.1.1.2\0"),
            un(Tag(0x0010, 0x0010), b"DOE^JANE"),
            un(Tag(0x0028, 0x0010), &512u16.to_le_bytes()),
            un(Tag(0x0018, 0x0050), b"1.25"),
        ]);
        assert_eq!(
            text(&o, Tag(0x0008, 0x0016)),
            (VR::UI, "1.2.840.10008.5.1.4.1.1.2".into())
        );
        assert_eq!(text(&o, Tag(0x0010, 0x0010)), (VR::PN, "DOE^JANE".into()));
        let rows = o.get(Tag(0x0028, 0x0010)).expect("rows");
        assert_eq!(
            (rows.vr(), rows.value().to_int::<u16>().ok()),
            (VR::US, Some(512))
        );
        assert_eq!(text(&o, Tag(0x0018, 0x0050)).0, VR::DS);
    }

    #[test]
    fn sequences_encoded_as_un_are_walked() {
        // Referenced Study Sequence with one item holding a UID and a nested UN-free name.
        let mut item_content = implicit(Tag(0x0008, 0x1150), b"1.2.3\0");
        item_content.extend(implicit(Tag(0x0008, 0x1155), b"1.2.3.4.5.6\0"));
        item_content.extend(implicit(Tag(0x0040, 0xA123), b"PERSON^X"));
        let mut seq = Vec::new();
        seq.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        seq.extend_from_slice(&(item_content.len() as u32).to_le_bytes());
        seq.extend_from_slice(&item_content);
        let o = reinterpreted(vec![un(Tag(0x0008, 0x1110), &seq)]);
        let e = o.get(Tag(0x0008, 0x1110)).expect("sequence");
        assert_eq!(e.vr(), VR::SQ);
        let items = e.items().expect("items");
        assert_eq!(items.len(), 1);
        assert_eq!(
            text(&items[0], Tag(0x0008, 0x1155)),
            (VR::UI, "1.2.3.4.5.6".into())
        );
        assert_eq!(
            text(&items[0], Tag(0x0040, 0xA123)),
            (VR::PN, "PERSON^X".into())
        );
    }

    #[test]
    fn what_cannot_be_reinterpreted_is_removed() {
        let mut bad_item = vec![0xFE, 0xFF, 0x00, 0xE0];
        bad_item.extend_from_slice(&0x4000_0000u32.to_le_bytes());
        let o = reinterpreted(vec![
            // A sequence whose item declares 1 GB.
            un(Tag(0x0008, 0x1110), &bad_item),
            // US with 3 bytes.
            un(Tag(0x0028, 0x0010), &[1, 2, 3]),
            // A public tag unknown to the dictionary.
            un(Tag(0x0009, 0x0000), &[1, 2]),
            un(Tag(0x0041, 0x0000), &[1, 2]),
            un(Tag(0x00F0, 0x00F0), &[1, 2]),
            // A private sequence under a creator not on the safe list.
            DataElement::new(
                Tag(0x0029, 0x0010),
                VR::LO,
                PrimitiveValue::from("ACME 1.0"),
            ),
            un(Tag(0x0029, 0x1010), &{
                let mut v = vec![0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0];
                v.truncate(8);
                v
            }),
        ]);
        for gone in [
            Tag(0x0008, 0x1110),
            Tag(0x0028, 0x0010),
            Tag(0x00F0, 0x00F0),
            Tag(0x0029, 0x1010),
        ] {
            assert!(o.get(gone).is_none(), "{gone} removed");
        }
        assert!(
            o.iter()
                .all(|e| e.vr() != VR::UN || !e.tag().group().is_multiple_of(2))
        );
    }
}
