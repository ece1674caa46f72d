//! Reading DICOM as real archives hold it: with or without preamble, with a file meta group
//! that lacks its group length or transfer syntax, or with none at all (the encoding is then
//! sniffed from the data set); deflated; big endian. What cannot be read faithfully is refused
//! with a precise, machine-readable reason — truncated files and pixel data, odd lengths, bad
//! item delimiters, DICOMDIR files, non-DICOM — and never passed through. Pure function of
//! the bytes.

/// Transfer syntax UIDs the node names (reading, writing, fixtures).
pub mod ts {
    pub const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
    pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
    pub const DEFLATED_LE: &str = "1.2.840.10008.1.2.1.99";
    pub const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";
    pub const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
    pub const RLE: &str = "1.2.840.10008.1.2.5";
}

/// Implementation Class UID written to every output's file meta header (a UUID-derived UID
/// under 2.25).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.255878127389062424870542330452185519407";
/// Implementation Version Name written to every output's file meta header.
pub const IMPLEMENTATION_VERSION_NAME: &str = "FEDCURATE_0_1";

use dicom_core::value::Value;
use dicom_core::{PrimitiveValue, Tag, VR};
use dicom_object::{DefaultDicomObject, FileMetaTableBuilder, InMemDicomObject, OpenFileOptions};
use dicom_parser::dataset::read::OddLengthStrategy;

pub mod lengths;

use lengths::Encoding;

/// A deflated data set is inflated at most to this size (a deflate bomb is refused, not
/// inflated).
pub const DEFLATED_LIMIT: u64 = 32 * 1024 * 1024;

/// Why an input is refused before de-identification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Machine-readable reason (`truncated`, `bad-file-meta`, `dicomdir`, ...), naming what
    /// could not be handled; never a bare "unreadable".
    pub reason: &'static str,
    /// Parser detail for the quarantine (may quote the file; never logged).
    pub detail: String,
}

fn refuse(reason: &'static str, detail: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        detail: detail.into(),
    }
}

/// Media Storage Directory Storage (DICOMDIR).
const DICOMDIR_CLASS: &str = "1.2.840.10008.1.3.10";

/// The full text of an error and its sources.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Map a parser error to a reason.
fn classify(text: &str) -> &'static str {
    let t = text.to_ascii_lowercase();
    if t.contains("odd length") || t.contains("invalid data element length") {
        "odd-length"
    } else if t.contains("delimit")
        || t.contains("item header")
        || t.contains("unexpected item")
        || t.contains("premature data set end")
    {
        "bad-item-delimiter"
    } else if t.contains("fill whole buffer")
        || t.contains("unexpectedeof")
        || t.contains("unexpected end")
        || t.contains("end of file")
        || t.contains("eof")
    {
        "truncated"
    } else if t.contains("meta") || t.contains("magic code") || t.contains("preamble") {
        BAD_FILE_META
    } else if t.contains("transfer syntax") {
        "unsupported-transfer-syntax"
    } else {
        "undecodable-data-set"
    }
}

/// A file meta group the strict reader cannot use (no preamble, no group length or transfer
/// syntax, a group length that disagrees with its elements): the lenient reader rebuilds it
/// from the elements, and gives this reason only if that fails too.
const BAD_FILE_META: &str = "bad-file-meta";

fn u16le(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn u32le(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
        *b.get(at + 2)?,
        *b.get(at + 3)?,
    ]))
}

fn is_vr(b: &[u8]) -> bool {
    b.len() == 2 && b[0].is_ascii_uppercase() && b[1].is_ascii_uppercase()
}

/// What a file meta group (explicit VR little endian, group 0002) says, read leniently.
#[derive(Debug, Default)]
struct MetaScan {
    /// Offset of the data set.
    end: usize,
    transfer_syntax: Option<String>,
    sop_class: Option<String>,
}

fn scan_meta(bytes: &[u8], start: usize) -> MetaScan {
    let mut at = start;
    let mut scan = MetaScan::default();
    while u16le(bytes, at) == Some(0x0002) {
        let Some(element) = u16le(bytes, at + 2) else {
            break;
        };
        let vr = bytes.get(at + 4..at + 6).unwrap_or(&[]);
        if !is_vr(vr) {
            break;
        }
        let (header, len) = if lengths::long_length(vr) {
            (12, u32le(bytes, at + 8).unwrap_or(u32::MAX) as usize)
        } else {
            (8, usize::from(u16le(bytes, at + 6).unwrap_or(u16::MAX)))
        };
        let Some(value) = bytes.get(at + header..at + header + len) else {
            break;
        };
        let text = || {
            String::from_utf8_lossy(value)
                .trim_end_matches(['\0', ' '])
                .to_owned()
        };
        match element {
            0x0002 => scan.sop_class = Some(text()),
            0x0010 => scan.transfer_syntax = Some(text()).filter(|s| !s.is_empty()),
            _ => {}
        }
        at += header + len;
    }
    scan.end = at;
    scan
}

/// Guess the transfer syntax of a bare data set from its first element.
fn sniff(dataset: &[u8]) -> Option<&'static str> {
    let g_le = u16le(dataset, 0)?;
    let g_be = u16::from_be_bytes([*dataset.first()?, *dataset.get(1)?]);
    let plausible = |g: u16| g.is_multiple_of(2) && (0x0002..=0x0010).contains(&g);
    if plausible(g_le) {
        Some(if is_vr(dataset.get(4..6)?) {
            ts::EXPLICIT_LE
        } else {
            ts::IMPLICIT_LE
        })
    } else if plausible(g_be) && is_vr(dataset.get(4..6)?) {
        Some(ts::EXPLICIT_BE)
    } else {
        None
    }
}

/// Check every length a file declares against the bytes it holds, before the parser (which
/// reserves what a length declares before reading) sees it. One walk; it also returns the
/// CP-246 sequences of the top-level data set (`(start, end)` in `bytes`), which the parser
/// does not follow and which [`open`] cuts out.
fn guard(bytes: &[u8]) -> Result<Vec<(usize, usize)>, Refusal> {
    if bytes.get(128..132) != Some(b"DICM") {
        return Ok(Vec::new());
    }
    let to_refusal = |p: lengths::LengthProblem| refuse(p.reason, p.detail);
    let (start, syntax) = lengths::check_meta_syntax(bytes, 132).map_err(to_refusal)?;
    let Some(ts) = syntax else {
        // The parser refuses a meta group without transfer syntax before reading the data
        // set; the lenient path rewraps it and comes back here.
        return Ok(Vec::new());
    };
    let dataset = bytes.get(start..).unwrap_or(&[]);
    let ts = ts.trim_end_matches(['\0', ' ']);
    let checked = |enc| lengths::check_dataset(dataset, enc).map(|()| Vec::new());
    match ts {
        ts::IMPLICIT_LE => checked(Encoding::IMPLICIT_LE),
        ts::EXPLICIT_BE => checked(Encoding::EXPLICIT_BE),
        ts::DEFLATED_LE => {
            use std::io::Read;
            let mut inflated = Vec::new();
            flate2::read::DeflateDecoder::new(dataset)
                .take(DEFLATED_LIMIT + 1)
                .read_to_end(&mut inflated)
                .map_err(|e| refuse("truncated", format!("deflated data set: {e}")))?;
            if inflated.len() as u64 > DEFLATED_LIMIT {
                return Err(refuse(
                    "deflated-too-large",
                    format!(
                        "the deflated data set inflates beyond {} MiB",
                        DEFLATED_LIMIT >> 20
                    ),
                ));
            }
            lengths::check_dataset(&inflated, Encoding::EXPLICIT_LE).map(|()| Vec::new())
        }
        t if t == ts::EXPLICIT_LE || is_encapsulated_syntax(t) => {
            // A CP-246 sequence inside another sequence cannot be cut out (the enclosing
            // lengths would no longer hold), and the parser would lose its place: refused.
            lengths::cp246_sequences(dataset, Encoding::EXPLICIT_LE).and_then(|spans| {
                spans
                    .into_iter()
                    .map(|(s, e, depth)| match depth {
                        0 => Ok((start + s, start + e)),
                        _ => Err(lengths::LengthProblem {
                            reason: "nested-un-sequence",
                            detail: format!(
                                "a UN sequence of undefined length at offset {s} sits inside another sequence"
                            ),
                        }),
                    })
                    .collect()
            })
        }
        other => {
            return Err(refuse(
                "unsupported-transfer-syntax",
                format!("transfer syntax {other} is not one the node reads"),
            ));
        }
    }
    .map_err(to_refusal)
}

/// Transfer syntaxes whose data set is explicit VR little endian with encapsulated pixel
/// data (JPEG family, JPEG-LS, JPEG 2000, RLE, MPEG, HEVC, JPEG XL, HTJ2K).
fn is_encapsulated_syntax(ts: &str) -> bool {
    ts == ts::RLE
        || ts
            .strip_prefix("1.2.840.10008.1.2.4.")
            .is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_digit()))
}

/// Guard, then parse: CP-246 sequences are cut out before the parser sees them (it does not
/// follow them, and on some contents spends seconds and gigabytes failing to) and put back
/// as UN elements with a defined length, which de-identification decodes with the
/// dictionary's VR or removes.
fn open(bytes: &[u8], odd: OddLengthStrategy) -> Result<DefaultDicomObject, Refusal> {
    let spans = guard(bytes)?;
    if spans.is_empty() {
        return parse(bytes, odd);
    }
    let mut cleaned = Vec::with_capacity(bytes.len());
    let mut excised = Vec::with_capacity(spans.len());
    let mut at = 0;
    for (s, e) in spans {
        cleaned.extend_from_slice(&bytes[at..s]);
        excised.push(dicom_core::DataElement::new(
            Tag(
                u16le(bytes, s).unwrap_or(0),
                u16le(bytes, s + 2).unwrap_or(0),
            ),
            dicom_core::VR::UN,
            // The items: after the 12-byte header, up to the 8-byte sequence delimiter.
            PrimitiveValue::U8(bytes[s + 12..e - 8].to_vec().into()),
        ));
        at = e;
    }
    cleaned.extend_from_slice(&bytes[at..]);
    let mut obj = parse(&cleaned, odd)?;
    for e in excised {
        obj.put(e);
    }
    Ok(obj)
}

fn parse(bytes: &[u8], odd: OddLengthStrategy) -> Result<DefaultDicomObject, Refusal> {
    OpenFileOptions::new()
        .odd_length_strategy(odd)
        .from_reader(bytes)
        .map_err(|e| {
            let text = chain(&e);
            refuse(classify(&text), text)
        })
}

/// Rebuild a proper file (preamble, magic, full meta group) around a data set.
fn rewrap(dataset: &[u8], transfer_syntax: &str, sop_class: &str) -> Result<Vec<u8>, Refusal> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid("2.25.0")
        .transfer_syntax(transfer_syntax)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .build()
        .map_err(|e| refuse(BAD_FILE_META, e.to_string()))?;
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    meta.write(&mut out)
        .map_err(|e| refuse(BAD_FILE_META, e.to_string()))?;
    out.extend_from_slice(dataset);
    Ok(out)
}

/// A text attribute's value without DICOM padding (spaces, NUL); empty when the attribute
/// is absent or not text.
pub fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| {
            e.value()
                .to_str()
                .ok()
                .map(|s| s.trim_matches([' ', '\0']).to_owned())
        })
        .unwrap_or_default()
}

/// Character sets whose text dicom-rs decodes and re-encodes byte for byte.
fn charset_round_trips(value: &str) -> bool {
    matches!(
        value.trim_matches([' ', '\0']),
        "" | "ISO_IR 6" | "ISO_IR 100" | "ISO_IR 192"
    )
}

/// An object read so that text in any character set survives byte for byte.
#[derive(Debug)]
pub struct ReadObject {
    pub object: DefaultDicomObject,
    /// When set, the object's text was decoded byte-for-byte as ISO_IR 100 and the encoded
    /// output's Specific Character Set value must be put back to these bytes (same length).
    pub restore_charset: Option<Vec<u8>>,
    /// A conformance problem read past (`odd-length`), recorded with the output.
    pub finding: Option<&'static str>,
}

/// Where the value of the top-level Specific Character Set starts, and its length, in an
/// uncompressed file whose data set starts at `dataset`.
fn find_charset_value(bytes: &[u8], dataset: usize, big_endian: bool) -> Option<(usize, usize)> {
    let window = bytes.get(dataset..)?;
    let limit = window.len().min(4096);
    let tag: [u8; 4] = if big_endian {
        [0x00, 0x08, 0x00, 0x05]
    } else {
        [0x08, 0x00, 0x05, 0x00]
    };
    let at = window[..limit].windows(4).position(|w| w == tag)? + dataset;
    if bytes.get(at + 4..at + 6) == Some(b"CS") {
        let l = bytes.get(at + 6..at + 8)?;
        let len = if big_endian {
            u16::from_be_bytes([l[0], l[1]])
        } else {
            u16::from_le_bytes([l[0], l[1]])
        };
        Some((at + 8, usize::from(len)))
    } else {
        let len = u32le(bytes, at + 4)? as usize;
        Some((at + 8, len))
    }
}

/// Where the top-level Pixel Data element of a large file lies: `(start, end)` byte offsets,
/// found from the file's first bytes `head` (which must hold the whole header) and, for
/// encapsulated pixel data, by walking its items in `file`. `None` when the layout is not one
/// that can be copied as bytes (deflated, no file meta, no consistent Pixel Data element).
pub fn locate_pixel_data<F: std::io::Read + std::io::Seek>(
    head: &[u8],
    file: &mut F,
    file_len: u64,
) -> Option<(usize, u64)> {
    if head.get(128..132) != Some(b"DICM") {
        return None;
    }
    let scan = scan_meta(head, 132);
    let ts = scan.transfer_syntax?;
    let (be, implicit) = match ts.as_str() {
        ts::EXPLICIT_LE | ts::JPEG_BASELINE | ts::RLE => (false, false),
        ts::EXPLICIT_BE => (true, false),
        ts::IMPLICIT_LE => (false, true),
        t if t.starts_with("1.2.840.10008.1.2.4.") => (false, false),
        _ => return None,
    };
    let tag: [u8; 4] = if be {
        [0x7F, 0xE0, 0x00, 0x10]
    } else {
        [0xE0, 0x7F, 0x10, 0x00]
    };
    let u32at = |at: usize| -> Option<u32> {
        let b = head.get(at..at + 4)?;
        let a = [b[0], b[1], b[2], b[3]];
        Some(if be {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        })
    };
    let mut from = scan.end;
    while let Some(rel) = head.get(from..)?.windows(4).position(|w| w == tag) {
        let pos = from + rel;
        from = pos + 1;
        let (header, len) = if implicit {
            (8usize, u32at(pos + 4)?)
        } else {
            let vr = head.get(pos + 4..pos + 6)?;
            if !(vr == b"OB" || vr == b"OW") || head.get(pos + 6..pos + 8) != Some(&[0, 0]) {
                continue;
            }
            (12usize, u32at(pos + 8)?)
        };
        if len != u32::MAX {
            let end = (pos + header) as u64 + u64::from(len);
            if end == file_len {
                return Some((pos, end));
            }
            continue;
        }
        // Encapsulated: items until the sequence delimiter.
        let mut at = (pos + header) as u64;
        loop {
            let mut item = [0u8; 8];
            file.seek(std::io::SeekFrom::Start(at)).ok()?;
            file.read_exact(&mut item).ok()?;
            let (g, e, l) = if be {
                (
                    u16::from_be_bytes([item[0], item[1]]),
                    u16::from_be_bytes([item[2], item[3]]),
                    u32::from_be_bytes([item[4], item[5], item[6], item[7]]),
                )
            } else {
                (
                    u16::from_le_bytes([item[0], item[1]]),
                    u16::from_le_bytes([item[2], item[3]]),
                    u32::from_le_bytes([item[4], item[5], item[6], item[7]]),
                )
            };
            match (g, e) {
                (0xFFFE, 0xE000) if l != u32::MAX => at += 8 + u64::from(l),
                (0xFFFE, 0xE0DD) => return Some((pos, at + 8)),
                _ => break,
            }
            if at > file_len {
                break;
            }
        }
    }
    None
}

/// Native pixel data a file ends with, to be copied as bytes (see [`native_pixel_data`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NativePixels {
    /// Offset of the Pixel Data element's header: the file's bytes before it are the header.
    pub start: usize,
    /// Whether the words are big endian (Explicit VR Big Endian).
    pub big_endian: bool,
    /// Bytes of the element's header (8 in implicit VR, 12 in explicit VR).
    pub header: usize,
    /// Whether the element's VR is OB (explicit VR only).
    pub ob: bool,
}

/// Whether a file's data set ends with its top-level Pixel Data element, native (defined
/// length, OB or OW) in a little-endian or big-endian uncompressed transfer syntax with a
/// file meta group, found by walking the element headers. `None` for anything else (no
/// meta, deflated, encapsulated, elements after Pixel Data, a structure the walk refuses):
/// such files are read whole.
pub fn native_pixel_data(bytes: &[u8]) -> Option<NativePixels> {
    if bytes.get(128..132) != Some(b"DICM") {
        return None;
    }
    let (start, syntax) = lengths::check_meta_syntax(bytes, 132).ok()?;
    let ts = syntax?;
    let (enc, big_endian) = match ts.trim_end_matches(['\0', ' ']) {
        ts::IMPLICIT_LE => (Encoding::IMPLICIT_LE, false),
        ts::EXPLICIT_LE => (Encoding::EXPLICIT_LE, false),
        ts::EXPLICIT_BE => (Encoding::EXPLICIT_BE, true),
        _ => return None,
    };
    let dataset = bytes.get(start..)?;
    let (at, end, defined) = lengths::top_level_pixel_data(dataset, enc).ok()??;
    if !defined || end != dataset.len() {
        return None;
    }
    let vr = dataset.get(at + 4..at + 6);
    if enc.explicit_vr && !matches!(vr, Some(b"OB") | Some(b"OW")) {
        return None;
    }
    Some(NativePixels {
        start: start + at,
        big_endian,
        header: if enc.explicit_vr { 12 } else { 8 },
        ob: enc.explicit_vr && vr == Some(b"OB"),
    })
}

/// Read one input file so that kept text stays byte-identical whatever its character set:
/// for sets dicom-rs cannot round-trip (code extensions, unsupported sets), the value of
/// Specific Character Set is swapped for ISO_IR 100 before parsing (every byte then maps to
/// one character and back), and the original value is restored in the output.
pub fn read_object_preserving(bytes: &[u8]) -> Result<ReadObject, Refusal> {
    let (object, finding) = read_object_noting(bytes)?;
    let charset = object
        .get(Tag(0x0008, 0x0005))
        .and_then(|e| e.value().to_str().ok().map(|s| s.into_owned()))
        .unwrap_or_default();
    let ts = object
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_owned();
    if charset_round_trips(&charset)
        || ts == ts::DEFLATED_LE
        || bytes.get(128..132) != Some(b"DICM")
    {
        return Ok(ReadObject {
            object,
            restore_charset: None,
            finding,
        });
    }
    let dataset = scan_meta(bytes, 132).end;
    let Some((at, len)) = find_charset_value(bytes, dataset, ts == ts::EXPLICIT_BE) else {
        return Ok(ReadObject {
            object,
            restore_charset: None,
            finding,
        });
    };
    const LATIN1: &[u8] = b"ISO_IR 100";
    if len < LATIN1.len() || at + len > bytes.len() {
        return Ok(ReadObject {
            object,
            restore_charset: None,
            finding,
        });
    }
    let original = bytes[at..at + len].to_vec();
    let mut patched = bytes.to_vec();
    patched[at..at + len].fill(b' ');
    patched[at..at + LATIN1.len()].copy_from_slice(LATIN1);
    let (object, finding) = read_object_noting(&patched)?;
    Ok(ReadObject {
        object,
        restore_charset: Some(original),
        finding,
    })
}

/// Put the original Specific Character Set value back into an encoded output.
pub fn restore_charset(encoded: &mut [u8], original: &[u8], big_endian: bool) -> bool {
    let dataset = scan_meta(encoded, 132).end;
    match find_charset_value(encoded, dataset, big_endian) {
        Some((at, len)) if len == original.len() && at + len <= encoded.len() => {
            encoded[at..at + len].copy_from_slice(original);
            true
        }
        _ => false,
    }
}

/// Read one input file.
pub fn read_object(bytes: &[u8]) -> Result<DefaultDicomObject, Refusal> {
    read_object_noting(bytes).map(|(o, _)| o)
}

/// Read one input file, with a finding when it is readable but not conformant: values of odd
/// length are read as they are (as dcmtk does) and noted as `odd-length`; the writer pads
/// every value to an even length.
pub fn read_object_noting(
    bytes: &[u8],
) -> Result<(DefaultDicomObject, Option<&'static str>), Refusal> {
    match read_with(bytes, OddLengthStrategy::Fail) {
        Err(r) if r.reason == "odd-length" => {
            read_with(bytes, OddLengthStrategy::Accept).map(|o| (o, Some("odd-length")))
        }
        other => other.map(|o| (o, None)),
    }
}

fn read_with(bytes: &[u8], odd: OddLengthStrategy) -> Result<DefaultDicomObject, Refusal> {
    let magic_at = if bytes.get(128..132) == Some(b"DICM") {
        Some(132)
    } else if bytes.get(0..4) == Some(b"DICM") {
        Some(4)
    } else {
        None
    };
    let obj = match magic_at {
        Some(132) => match open(bytes, odd) {
            Ok(o) => o,
            Err(first) => reread(bytes, 132, first, odd)?,
        },
        Some(start) => reread(
            bytes,
            start,
            refuse(BAD_FILE_META, "no preamble before the DICM magic"),
            odd,
        )?,
        None => {
            let ts = sniff(bytes).ok_or_else(|| {
                refuse(
                    "not-dicom",
                    "neither a DICOM file header nor a recognisable data set",
                )
            })?;
            open(&rewrap(bytes, ts, "")?, odd)?
        }
    };
    check(&obj)?;
    Ok(obj)
}

/// Second chance for files whose meta group dicom-object refuses (no preamble, no group
/// length, no transfer syntax): scan it leniently and rewrap the data set.
fn reread(
    bytes: &[u8],
    start: usize,
    first: Refusal,
    odd: OddLengthStrategy,
) -> Result<DefaultDicomObject, Refusal> {
    let scan = scan_meta(bytes, start);
    let dataset = bytes.get(scan.end..).unwrap_or(&[]);
    // A content problem in the data set (truncation, odd length) is the real reason.
    if first.reason != BAD_FILE_META && scan.transfer_syntax.is_some() && start == 132 {
        return Err(first);
    }
    let ts = match scan.transfer_syntax.as_deref() {
        Some(t) => t.to_owned(),
        None => sniff(dataset)
            .ok_or_else(|| refuse("unknown-encoding", format!("meta group without transfer syntax, and the data set encoding is not recognisable; first error: {}", first.detail)))?
            .to_owned(),
    };
    open(
        &rewrap(dataset, &ts, scan.sop_class.as_deref().unwrap_or(""))?,
        odd,
    )
}

/// A numeric attribute of a data set, binary or written as text.
pub fn number(obj: &InMemDicomObject, tag: Tag) -> Option<u64> {
    let e = obj.get(tag)?;
    e.value()
        .to_int::<u64>()
        .ok()
        .or_else(|| e.value().to_str().ok()?.trim().parse().ok())
}

/// The bytes native pixel data must hold for what the header describes (rows × columns ×
/// samples × frames × bits allocated, rounded up to whole bytes); 0 when a dimension is
/// missing, `None` when the product overflows.
pub fn native_pixel_bytes(obj: &InMemDicomObject) -> Option<u64> {
    let rows = number(obj, Tag(0x0028, 0x0010)).unwrap_or(0);
    let cols = number(obj, Tag(0x0028, 0x0011)).unwrap_or(0);
    let bits = number(obj, Tag(0x0028, 0x0100)).unwrap_or(0);
    // YBR_FULL_422 keeps two luminance and two chrominance samples per pair of pixels
    // (PS3.5 §8.2.3): two samples per pixel, whatever Samples per Pixel says.
    let samples = if text(obj, Tag(0x0028, 0x0004)) == "YBR_FULL_422" {
        2
    } else {
        number(obj, Tag(0x0028, 0x0002)).unwrap_or(1)
    };
    let frames = number(obj, Tag(0x0028, 0x0008)).unwrap_or(1).max(1);
    [rows, cols, samples, frames, bits]
        .into_iter()
        .try_fold(1u64, u64::checked_mul)
        .map(|b| b.div_ceil(8))
}

/// Checks after a successful parse.
fn check(obj: &DefaultDicomObject) -> Result<(), Refusal> {
    let class = obj
        .meta()
        .media_storage_sop_class_uid()
        .trim_end_matches('\0');
    if class == DICOMDIR_CLASS
        || obj.get(Tag(0x0004, 0x1220)).is_some()
        || obj.get(Tag(0x0004, 0x1200)).is_some()
    {
        return Err(refuse(
            "dicomdir",
            "a DICOMDIR names patients and input paths; it is not copied",
        ));
    }
    // The attributes that describe the pixel data must have their standard VR: a value read
    // under another (Samples per Pixel as a date, say) would be rewritten as that VR's value
    // and describe pixel data the object does not hold.
    const PIXEL_DESCRIPTION: [(Tag, VR, &str); 10] = [
        (Tag(0x0028, 0x0002), VR::US, "Samples per Pixel"),
        (Tag(0x0028, 0x0004), VR::CS, "Photometric Interpretation"),
        (Tag(0x0028, 0x0006), VR::US, "Planar Configuration"),
        (Tag(0x0028, 0x0008), VR::IS, "Number of Frames"),
        (Tag(0x0028, 0x0010), VR::US, "Rows"),
        (Tag(0x0028, 0x0011), VR::US, "Columns"),
        (Tag(0x0028, 0x0100), VR::US, "Bits Allocated"),
        (Tag(0x0028, 0x0101), VR::US, "Bits Stored"),
        (Tag(0x0028, 0x0102), VR::US, "High Bit"),
        (Tag(0x0028, 0x0103), VR::US, "Pixel Representation"),
    ];
    for (tag, vr, name) in PIXEL_DESCRIPTION {
        if let Some(e) = obj.get(tag)
            && e.vr() != vr
            && e.vr() != VR::UN
        {
            return Err(refuse(
                "bad-value-representation",
                format!(
                    "{name} ({:04X},{:04X}) is encoded as {} where the standard says {}: the pixel data cannot be described",
                    tag.0,
                    tag.1,
                    e.vr().to_string(),
                    vr.to_string()
                ),
            ));
        }
    }
    let Some(pixels) = obj.get(Tag(0x7FE0, 0x0010)) else {
        return Ok(());
    };
    match pixels.value() {
        Value::Primitive(p) => {
            let expected = native_pixel_bytes(obj).unwrap_or(u64::MAX);
            let actual = match p {
                PrimitiveValue::Empty => 0,
                p => p.calculate_byte_len() as u64,
            };
            if expected > 0 && actual < expected {
                return Err(refuse(
                    "truncated-pixel-data",
                    format!(
                        "pixel data holds {actual} bytes where rows, columns, samples, frames and bits allocated need {expected}"
                    ),
                ));
            }
        }
        Value::PixelSequence(s) => {
            if s.fragments().is_empty() || s.fragments().iter().all(|f| f.is_empty()) {
                return Err(refuse(
                    "truncated-pixel-data",
                    "encapsulated pixel data without fragments",
                ));
            }
        }
        Value::Sequence(_) => {
            return Err(refuse(
                "pixel-data-as-sequence",
                "pixel data encoded as a sequence",
            ));
        }
    }
    Ok(())
}
