//! The DIMSE layer on top of dicom-ul's associations and PDUs: command sets (always implicit
//! VR little endian, PS3.7 §6.3.1) and the Storage SCP with C-ECHO and C-STORE.
//!
//! Only this module speaks DIMSE; the rest of the node sees received objects as files in the
//! inbox, de-identified by the same batch pipeline (catalog, quarantine, nothing lost).

pub mod scp;
pub mod scu;

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, Tag, VR};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// Command field values (PS3.7 Annex E).
pub mod command {
    pub const C_STORE_RQ: u16 = 0x0001;
    pub const C_STORE_RSP: u16 = 0x8001;
    pub const C_ECHO_RQ: u16 = 0x0030;
    pub const C_ECHO_RSP: u16 = 0x8030;
}

/// Status codes.
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: out of resources.
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: cannot understand.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Refused: SOP class not supported.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
}

/// The Verification SOP class.
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

/// Storage SOP classes the node accepts (the common modalities).
pub const STORAGE_CLASSES: &[&str] = &[
    "1.2.840.10008.5.1.4.1.1.1",     // CR
    "1.2.840.10008.5.1.4.1.1.1.1",   // DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1", // DX for processing
    "1.2.840.10008.5.1.4.1.1.1.2",   // MG for presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1", // MG for processing
    "1.2.840.10008.5.1.4.1.1.2",     // CT
    "1.2.840.10008.5.1.4.1.1.2.1",   // Enhanced CT
    "1.2.840.10008.5.1.4.1.1.3.1",   // US multi-frame
    "1.2.840.10008.5.1.4.1.1.4",     // MR
    "1.2.840.10008.5.1.4.1.1.4.1",   // Enhanced MR
    "1.2.840.10008.5.1.4.1.1.6.1",   // US
    "1.2.840.10008.5.1.4.1.1.7",     // SC
    "1.2.840.10008.5.1.4.1.1.7.3",   // MF grayscale word SC
    "1.2.840.10008.5.1.4.1.1.12.1",  // XA
    "1.2.840.10008.5.1.4.1.1.20",    // NM
    "1.2.840.10008.5.1.4.1.1.66.4",  // SEG
    "1.2.840.10008.5.1.4.1.1.88.11", // Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22", // Enhanced SR
    "1.2.840.10008.5.1.4.1.1.128",   // PET
    "1.2.840.10008.5.1.4.1.1.481.1", // RT Image
];

/// Transfer syntaxes the node accepts: uncompressed and the usual compressed ones (their
/// pixel data passes through de-identification untouched).
pub const TRANSFER_SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2",      // implicit VR LE
    "1.2.840.10008.1.2.1",    // explicit VR LE
    "1.2.840.10008.1.2.1.99", // deflated
    "1.2.840.10008.1.2.2",    // explicit VR BE
    "1.2.840.10008.1.2.4.50", // JPEG baseline
    "1.2.840.10008.1.2.4.51", // JPEG extended
    "1.2.840.10008.1.2.4.57", // JPEG lossless
    "1.2.840.10008.1.2.4.70", // JPEG lossless SV1
    "1.2.840.10008.1.2.4.80", // JPEG-LS lossless
    "1.2.840.10008.1.2.4.81", // JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90", // JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91", // JPEG 2000
    "1.2.840.10008.1.2.5",    // RLE
];

/// A command set is a handful of short elements; anything larger is refused before it is
/// decoded (or even collected).
pub const MAX_COMMAND_SET: usize = 16 * 1024;

/// Decode a command set: refused when larger than [`MAX_COMMAND_SET`] or when a length it
/// declares reaches past its bytes (checked before the parser reserves anything).
pub fn decode_command(bytes: &[u8]) -> Option<InMemDicomObject> {
    if bytes.len() > MAX_COMMAND_SET {
        return None;
    }
    fc_read::lengths::check_dataset(bytes, fc_read::lengths::Encoding::IMPLICIT_LE).ok()?;
    let ts = TransferSyntaxRegistry.get("1.2.840.10008.1.2")?;
    InMemDicomObject::read_dataset_with_ts(bytes, ts).ok()
}

/// Encode a command set (group length computed).
pub fn encode_command(elements: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
    let Some(ts) = TransferSyntaxRegistry.get("1.2.840.10008.1.2") else {
        return Vec::new();
    };
    let body_obj = InMemDicomObject::command_from_element_iter(elements);
    let mut body = Vec::new();
    if body_obj.write_dataset_with_ts(&mut body, ts).is_err() {
        return Vec::new();
    }
    body
}

/// A text value of a command.
pub use fc_read::text;

/// A US value of a command.
pub fn number(cmd: &InMemDicomObject, tag: Tag) -> Option<u16> {
    cmd.get(tag).and_then(|e| e.value().to_int::<u16>().ok())
}

/// A response command set.
pub fn response(
    field: u16,
    message_id: u16,
    sop_class: &str,
    sop_instance: Option<&str>,
    status: u16,
) -> Vec<u8> {
    let mut e = vec![
        DataElement::new(Tag(0x0000, 0x0002), VR::UI, PrimitiveValue::from(sop_class)),
        DataElement::new(Tag(0x0000, 0x0100), VR::US, PrimitiveValue::from(field)),
        DataElement::new(
            Tag(0x0000, 0x0120),
            VR::US,
            PrimitiveValue::from(message_id),
        ),
        DataElement::new(Tag(0x0000, 0x0800), VR::US, PrimitiveValue::from(0x0101u16)),
        DataElement::new(Tag(0x0000, 0x0900), VR::US, PrimitiveValue::from(status)),
    ];
    if let Some(i) = sop_instance {
        e.push(DataElement::new(
            Tag(0x0000, 0x1000),
            VR::UI,
            PrimitiveValue::from(i),
        ));
    }
    encode_command(e)
}
