//! Declared lengths checked against the bytes held, before any parser sees them.
//!
//! dicom-rs reserves and zero-fills a buffer of the length an element declares before it reads
//! the value, so a few hostile bytes declaring 4 GB cost 4 GB. This module walks a data set
//! shallowly (headers only, no value decoded, nothing allocated per element) and refuses any
//! defined length that reaches past its container (the file, a defined-length sequence or
//! item), any item structure that does not close, and nesting deeper than real objects use.
//! It follows exactly the structure the parser follows: sequences (explicit `SQ`, implicit
//! sequences by dictionary or by their first item tag, `UN` with undefined length as implicit
//! VR little endian per CP-246) and encapsulated pixel data (fragments). Pure over bytes.

use dicom_core::{Tag, VR};

/// Nesting deeper than this is refused (real objects nest a handful of levels; the parser
/// recurses once per level).
pub const MAX_DEPTH: usize = 32;

/// How a data set is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoding {
    pub explicit_vr: bool,
    pub big_endian: bool,
}

impl Encoding {
    pub const IMPLICIT_LE: Encoding = Encoding {
        explicit_vr: false,
        big_endian: false,
    };
    pub const EXPLICIT_LE: Encoding = Encoding {
        explicit_vr: true,
        big_endian: false,
    };
    pub const EXPLICIT_BE: Encoding = Encoding {
        explicit_vr: true,
        big_endian: true,
    };
}

/// Why a data set's declared structure does not fit its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LengthProblem {
    /// Machine-readable reason: `truncated`, `bad-item-delimiter`, `nesting-too-deep`,
    /// `bad-value-representation`, `bad-value-length`, `bad-file-meta`.
    pub reason: &'static str,
    /// Where and what (offsets and lengths only; never a value).
    pub detail: String,
}

fn problem(reason: &'static str, detail: String) -> LengthProblem {
    LengthProblem { reason, detail }
}

const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);
const UNDEFINED: u32 = u32::MAX;
const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);

struct Walker<'a> {
    b: &'a [u8],
    /// CP-246 sequences met: (element start, end past its delimiter, depth).
    cp246: std::cell::RefCell<Vec<(usize, usize, usize)>>,
    /// The top-level Pixel Data element: (start, end, whether its length is defined).
    pixel_data: std::cell::Cell<Option<(usize, usize, bool)>>,
}

impl Walker<'_> {
    fn u16(&self, at: usize, enc: Encoding) -> Option<u16> {
        let s = self.b.get(at..at.checked_add(2)?)?;
        let a = [s[0], s[1]];
        Some(if enc.big_endian {
            u16::from_be_bytes(a)
        } else {
            u16::from_le_bytes(a)
        })
    }

    fn u32(&self, at: usize, enc: Encoding) -> Option<u32> {
        let s = self.b.get(at..at.checked_add(4)?)?;
        let a = [s[0], s[1], s[2], s[3]];
        Some(if enc.big_endian {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        })
    }

    /// Tag and length of an item or delimiter header (always 8 bytes, no VR).
    fn item_header(
        &self,
        at: usize,
        end: usize,
        enc: Encoding,
    ) -> Result<((u16, u16), u32), LengthProblem> {
        if at.saturating_add(8) > end {
            return Err(problem(
                "truncated",
                format!("an item header at offset {at} reaches past its container (ends at {end})"),
            ));
        }
        let g = self.u16(at, enc).unwrap_or(0);
        let e = self.u16(at + 2, enc).unwrap_or(0);
        let len = self.u32(at + 4, enc).unwrap_or(0);
        Ok(((g, e), len))
    }

    /// Walk data set elements from `at`. With `end_delimited`, the walk stops after an item
    /// delimiter (an undefined-length item); otherwise it must end exactly at `end`.
    fn dataset(
        &self,
        mut at: usize,
        end: usize,
        enc: Encoding,
        depth: usize,
        end_delimited: bool,
    ) -> Result<usize, LengthProblem> {
        if depth > MAX_DEPTH {
            return Err(problem(
                "nesting-too-deep",
                format!("sequences nest deeper than {MAX_DEPTH} levels at offset {at}"),
            ));
        }
        loop {
            if at == end && !end_delimited {
                return Ok(at);
            }
            if at.saturating_add(8) > end {
                // Trailing padding shorter than an element header is tolerated at the top
                // level only when it is all zero (some writers pad the file).
                if depth == 0 && !end_delimited && self.b[at..end].iter().all(|&x| x == 0) {
                    return Ok(end);
                }
                return Err(problem(
                    "truncated",
                    format!(
                        "an element header at offset {at} reaches past its container (ends at {end})"
                    ),
                ));
            }
            let group = self.u16(at, enc).unwrap_or(0);
            let element = self.u16(at + 2, enc).unwrap_or(0);
            if group == 0xFFFE {
                let len = self.u32(at + 4, enc).unwrap_or(0);
                if (group, element) == ITEM_END && end_delimited {
                    return Ok(at + 8);
                }
                return Err(problem(
                    "bad-item-delimiter",
                    format!(
                        "unexpected item tag (FFFE,{element:04X}) of length {len} at offset {at} inside a data set"
                    ),
                ));
            }
            // Header: explicit VR short form (8 bytes), explicit long form (12), implicit (8).
            let (vr, header, len): (Option<[u8; 2]>, usize, u32) = if enc.explicit_vr {
                let v = [self.b[at + 4], self.b[at + 5]];
                // Two capital letters that name no VR (`ON`) are read by the parser as UN
                // with a long length: refused rather than guessed.
                if VR::from_binary(v).is_none() {
                    return Err(problem(
                        "bad-value-representation",
                        format!(
                            "element ({group:04X},{element:04X}) at offset {at} has no valid value representation in an explicit VR data set"
                        ),
                    ));
                }
                if long_length(&v) {
                    if at.saturating_add(12) > end {
                        return Err(problem(
                            "truncated",
                            format!("an element header at offset {at} reaches past its container"),
                        ));
                    }
                    (Some(v), 12, self.u32(at + 8, enc).unwrap_or(0))
                } else {
                    (Some(v), 8, u32::from(self.u16(at + 6, enc).unwrap_or(0)))
                }
            } else {
                (None, 8, self.u32(at + 4, enc).unwrap_or(0))
            };
            let tag = (group, element);
            let start = at + header;
            let element_start = at;
            if len == UNDEFINED {
                at = match vr {
                    Some(v) if &v == b"SQ" => self.items(start, end, enc, depth + 1, None)?,
                    // CP-246: an undefined-length UN is a sequence in implicit VR LE.
                    Some(v) if &v == b"UN" => {
                        let e = self.items(start, end, Encoding::IMPLICIT_LE, depth + 1, None)?;
                        self.cp246.borrow_mut().push((at, e, depth));
                        e
                    }
                    Some(v) if &v == b"OB" || &v == b"OW" => {
                        self.fragments(start, end, enc, tag)?
                    }
                    None if tag == PIXEL_DATA => self.fragments(start, end, enc, tag)?,
                    None => self.items(start, end, enc, depth + 1, None)?,
                    Some(v) => {
                        return Err(problem(
                            "bad-value-representation",
                            format!(
                                "element ({group:04X},{element:04X}) at offset {at} has undefined length with VR {}{}",
                                v[0] as char, v[1] as char
                            ),
                        ));
                    }
                };
                if depth == 0 && tag == PIXEL_DATA {
                    self.pixel_data.set(Some((element_start, at, false)));
                }
                continue;
            }
            let value_end = start.checked_add(len as usize).filter(|&e| e <= end).ok_or_else(|| {
                problem(
                    "truncated",
                    format!(
                        "element ({group:04X},{element:04X}) at offset {at} declares {len} bytes where {} remain in its container",
                        end.saturating_sub(start)
                    ),
                )
            })?;
            // The VR the parser reads the value with: the stream's, or in implicit VR its
            // dictionary's (dicom-rs's own, so the walk follows exactly what it will do).
            let value_vr = match vr {
                Some(v) => VR::from_binary(v).unwrap_or(VR::UN),
                None => parser_vr(Tag(group, element)),
            };
            // A fixed-size VR whose length is not a multiple of its size makes the parser read
            // fewer bytes than declared and lose its place: refused.
            if let Some(size) = fixed_size(value_vr)
                && !(len as usize).is_multiple_of(size)
            {
                return Err(problem(
                    "bad-value-length",
                    format!(
                        "element ({group:04X},{element:04X}) at offset {at} is {value_vr:?} with {len} bytes, not a multiple of {size}"
                    ),
                ));
            }
            let sequence = value_vr == VR::SQ
                // A value that opens with an item tag is walked as a sequence too (implicit VR).
                || (vr.is_none()
                    && len >= 8
                    && self.u16(start, enc) == Some(0xFFFE)
                    && self.u16(start + 2, enc) == Some(0xE000));
            if sequence {
                self.items(start, value_end, enc, depth + 1, Some(value_end))?;
            } else if depth == 0 && tag == PIXEL_DATA {
                self.pixel_data.set(Some((element_start, value_end, true)));
            }
            at = value_end;
        }
    }

    /// Walk sequence items from `at`: to `defined_end` exactly, or (undefined length) to the
    /// sequence delimiter, within `end`.
    fn items(
        &self,
        mut at: usize,
        end: usize,
        enc: Encoding,
        depth: usize,
        defined_end: Option<usize>,
    ) -> Result<usize, LengthProblem> {
        if depth > MAX_DEPTH {
            return Err(problem(
                "nesting-too-deep",
                format!("sequences nest deeper than {MAX_DEPTH} levels at offset {at}"),
            ));
        }
        let end = defined_end.unwrap_or(end);
        loop {
            if defined_end.is_some() && at == end {
                return Ok(at);
            }
            let (tag, len) = self.item_header(at, end, enc)?;
            match tag {
                ITEM if len == UNDEFINED => {
                    at = self.dataset(at + 8, end, enc, depth, true)?;
                }
                ITEM => {
                    let item_end = (at + 8).checked_add(len as usize).filter(|&e| e <= end).ok_or_else(|| {
                        problem(
                            "truncated",
                            format!(
                                "an item at offset {at} declares {len} bytes where {} remain in its sequence",
                                end.saturating_sub(at + 8)
                            ),
                        )
                    })?;
                    self.dataset(at + 8, item_end, enc, depth, false)?;
                    at = item_end;
                }
                SEQUENCE_END if defined_end.is_none() => return Ok(at + 8),
                (g, e) => {
                    return Err(problem(
                        "bad-item-delimiter",
                        format!("expected an item at offset {at}, found ({g:04X},{e:04X})"),
                    ));
                }
            }
        }
    }

    /// Walk the fragments of encapsulated pixel data up to the sequence delimiter.
    fn fragments(
        &self,
        mut at: usize,
        end: usize,
        enc: Encoding,
        tag: (u16, u16),
    ) -> Result<usize, LengthProblem> {
        loop {
            let (t, len) = self.item_header(at, end, enc)?;
            match t {
                ITEM if len != UNDEFINED => {
                    at = (at + 8).checked_add(len as usize).filter(|&e| e <= end).ok_or_else(|| {
                        problem(
                            "truncated",
                            format!(
                                "a fragment of ({:04X},{:04X}) at offset {at} declares {len} bytes where {} remain",
                                tag.0,
                                tag.1,
                                end.saturating_sub(at + 8)
                            ),
                        )
                    })?;
                }
                SEQUENCE_END => return Ok(at + 8),
                (g, e) => {
                    return Err(problem(
                        "bad-item-delimiter",
                        format!(
                            "expected a fragment at offset {at}, found ({g:04X},{e:04X}) of length {len}"
                        ),
                    ));
                }
            }
        }
    }
}

/// The VR the parser gives an implicit VR element: its standard dictionary's, else UN.
fn parser_vr(tag: Tag) -> VR {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    dicom_dictionary_std::StandardDataDictionary
        .by_tag(tag)
        .map(|e| e.vr().relaxed())
        .unwrap_or(VR::UN)
}

/// Bytes per value of the VRs the parser reads as arrays of fixed-size numbers.
fn fixed_size(vr: VR) -> Option<usize> {
    match vr {
        VR::US | VR::SS | VR::OW => Some(2),
        VR::UL | VR::SL | VR::FL | VR::OF | VR::OL | VR::AT => Some(4),
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => Some(8),
        _ => None,
    }
}

/// Whether an explicit VR element with this VR has the long header (2 reserved bytes, a
/// 4-byte length).
pub fn long_length(vr: &[u8]) -> bool {
    matches!(
        vr,
        b"OB"
            | b"OW"
            | b"OF"
            | b"SQ"
            | b"UT"
            | b"UN"
            | b"UC"
            | b"UR"
            | b"OD"
            | b"OL"
            | b"OV"
            | b"SV"
            | b"UV"
    )
}

/// Check a data set's declared structure against its bytes.
pub fn check_dataset(bytes: &[u8], enc: Encoding) -> Result<(), LengthProblem> {
    walk(bytes, enc).map(|_| ())
}

fn walk(bytes: &[u8], enc: Encoding) -> Result<Walker<'_>, LengthProblem> {
    let w = Walker {
        b: bytes,
        cp246: Default::default(),
        pixel_data: Default::default(),
    };
    w.dataset(0, bytes.len(), enc, 0, false)?;
    Ok(w)
}

/// Where a data set's top-level Pixel Data element is, found by the walk (never by searching
/// bytes): `(start of its header, end of its value, whether its length is defined)`.
pub fn top_level_pixel_data(
    bytes: &[u8],
    enc: Encoding,
) -> Result<Option<(usize, usize, bool)>, LengthProblem> {
    walk(bytes, enc).map(|w| w.pixel_data.get())
}

/// The CP-246 sequences of a data set (explicit VR `UN` with undefined length, whose content
/// is implicit VR little endian and which the parser does not follow): `(start, end, depth)`
/// of each, outermost first, found by the walk (never by searching bytes, which would also
/// match inside values).
pub fn cp246_sequences(
    bytes: &[u8],
    enc: Encoding,
) -> Result<Vec<(usize, usize, usize)>, LengthProblem> {
    let w = walk(bytes, enc)?;
    let mut spans = w.cp246.into_inner();
    spans.sort_unstable();
    // Keep only the outermost of nested ones.
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    for s in spans {
        if out.last().is_none_or(|l| s.0 >= l.1) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Check a file meta group (explicit VR little endian, group 0002) starting at `at`: every
/// element's declared length fits the bytes. Returns where the data set starts.
pub fn check_meta(bytes: &[u8], at: usize) -> Result<usize, LengthProblem> {
    check_meta_syntax(bytes, at).map(|(end, _)| end)
}

/// [`check_meta`], also returning the transfer syntax the group names, read as the parser
/// reads it (an element whose VR is not one still counts).
pub fn check_meta_syntax(
    bytes: &[u8],
    start: usize,
) -> Result<(usize, Option<String>), LengthProblem> {
    let w = Walker {
        b: bytes,
        cp246: Default::default(),
        pixel_data: Default::default(),
    };
    let enc = Encoding::EXPLICIT_LE;
    // One element as the parser decodes a meta element: explicit VR little endian, a VR that
    // names no VR (`UD`, or not letters at all) read as UN (4-byte length after 2 reserved
    // bytes). Returns (group, element, value start, value end).
    let element = |at: usize| -> Result<(u16, u16, usize, usize), LengthProblem> {
        let cut = || {
            problem(
                "truncated",
                format!("file meta element at offset {at} is cut short"),
            )
        };
        let group = w.u16(at, enc).ok_or_else(cut)?;
        let element = w.u16(at + 2, enc).ok_or_else(cut)?;
        let v = bytes
            .get(at + 4..at + 6)
            .map(|s| [s[0], s[1]])
            .ok_or_else(cut)?;
        let (header, len) = if VR::from_binary(v).is_none() || long_length(&v) {
            (12usize, w.u32(at + 8, enc).ok_or_else(cut)?)
        } else {
            (8usize, u32::from(w.u16(at + 6, enc).ok_or_else(cut)?))
        };
        let value_end = (at + header)
            .checked_add(len as usize)
            .filter(|&e| e <= bytes.len() && len != UNDEFINED)
            .ok_or_else(|| {
                problem(
                    "truncated",
                    format!(
                        "file meta element ({group:04X},{element:04X}) at offset {at} declares {len} bytes where {} remain",
                        bytes.len().saturating_sub(at + header)
                    ),
                )
            })?;
        Ok((group, element, at + header, value_end))
    };
    let text = |from: usize, to: usize| {
        bytes
            .get(from..to)
            .map(|v| {
                String::from_utf8_lossy(v)
                    .trim_end_matches(['\0', ' '])
                    .to_owned()
            })
            .filter(|t| !t.is_empty())
    };
    // The group as the lenient reader sees it: the group 0002 elements.
    let mut at = start;
    let mut syntax = None;
    while w.u16(at, enc) == Some(0x0002) {
        let (_, e, value, end) = element(at)?;
        if e == 0x0010 {
            syntax = text(value, end);
        }
        at = end;
    }
    let group_end = at;
    // The group as the parser reads it: when it opens with a 4-byte group length, the parser
    // reads elements (of any group) until it has read that many bytes, and reserves what each
    // declares. Every one of them is checked, and the transfer syntax is the one it finds.
    let first = element(start).ok();
    if let Some((0x0002, 0x0000, value, end)) = first
        && end - value == 4
    {
        let gl = u64::from(w.u32(value, enc).unwrap_or(0));
        let mut at = end;
        let mut read = 0u64;
        let mut parser_syntax = None;
        while read < gl {
            let (g, e, value, next) = element(at)?;
            if (g, e) == (0x0002, 0x0010) {
                parser_syntax = text(value, next);
            }
            read += (next - at) as u64;
            at = next;
        }
        if at != group_end {
            // The parser would read past the group (or stop inside it); the lenient reader
            // rebuilds the meta group from its elements instead.
            return Err(problem(
                "bad-file-meta",
                format!(
                    "the file meta group length says {gl} bytes where its elements take {}",
                    group_end.saturating_sub(end)
                ),
            ));
        }
        return Ok((at, parser_syntax));
    }
    Ok((group_end, syntax))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el_le(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&tag.0.to_le_bytes());
        v.extend_from_slice(&tag.1.to_le_bytes());
        v.extend_from_slice(vr);
        if long_length(vr) {
            v.extend_from_slice(&[0, 0]);
            v.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            v.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        v.extend_from_slice(value);
        v
    }

    fn header_le(tag: (u16, u16), len: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&tag.0.to_le_bytes());
        v.extend_from_slice(&tag.1.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v
    }

    fn check(bytes: &[u8], enc: Encoding, expected: Option<&str>) {
        let got = check_dataset(bytes, enc).err().map(|p| p.reason);
        assert_eq!(got, expected, "{:?}", check_dataset(bytes, enc));
    }

    #[test]
    fn well_formed_sets_pass() {
        let mut d = el_le((0x0008, 0x0060), b"CS", b"CT");
        // A defined-length sequence with one defined-length item.
        let inner = el_le((0x0008, 0x0100), b"SH", b"T-1234");
        let mut item = header_le(ITEM, inner.len() as u32);
        item.extend_from_slice(&inner);
        d.extend_from_slice(&el_le((0x0008, 0x1032), b"SQ", &item));
        // An undefined-length sequence with an undefined-length item.
        let mut sq = Vec::new();
        sq.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0]);
        sq.extend_from_slice(&UNDEFINED.to_le_bytes());
        sq.extend_from_slice(&header_le(ITEM, UNDEFINED));
        sq.extend_from_slice(&inner);
        sq.extend_from_slice(&header_le(ITEM_END, 0));
        sq.extend_from_slice(&header_le(SEQUENCE_END, 0));
        d.extend_from_slice(&sq);
        // Encapsulated pixel data.
        d.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
        d.extend_from_slice(&UNDEFINED.to_le_bytes());
        d.extend_from_slice(&header_le(ITEM, 0));
        d.extend_from_slice(&header_le(ITEM, 4));
        d.extend_from_slice(&[1, 2, 3, 4]);
        d.extend_from_slice(&header_le(SEQUENCE_END, 0));
        check(&d, Encoding::EXPLICIT_LE, None);
    }

    #[test]
    fn lengths_past_the_end_are_refused_before_allocation() {
        // An element declaring about 4 GB in a 12-byte buffer.
        let mut d = vec![0x09, 0x00, 0x10, 0x10, b'U', b'N', 0, 0];
        d.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        check(&d, Encoding::EXPLICIT_LE, Some("truncated"));
        // The same in implicit VR.
        check(
            &header_le((0x0010, 0x0010), 0xFFFF_0000),
            Encoding::IMPLICIT_LE,
            Some("truncated"),
        );
        // An item inside a sequence declaring more than the sequence holds.
        let mut item = header_le(ITEM, 1 << 30);
        item.extend_from_slice(&[0; 8]);
        check(
            &el_le((0x0008, 0x1032), b"SQ", &item),
            Encoding::EXPLICIT_LE,
            Some("truncated"),
        );
        // A fragment declaring more than the file holds.
        let mut d = vec![0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0];
        d.extend_from_slice(&UNDEFINED.to_le_bytes());
        d.extend_from_slice(&header_le(ITEM, 0x7FFF_FFFF));
        check(&d, Encoding::EXPLICIT_LE, Some("truncated"));
    }

    #[test]
    fn un_sequences_are_walked_as_implicit_little_endian() {
        let mut d = vec![0x09, 0x00, 0x10, 0x10, b'U', b'N', 0, 0];
        d.extend_from_slice(&UNDEFINED.to_le_bytes());
        d.extend_from_slice(&header_le(ITEM, UNDEFINED));
        d.extend_from_slice(&header_le((0x0010, 0x0010), 0x4000_0000));
        check(&d, Encoding::EXPLICIT_LE, Some("truncated"));
        // Unclosed.
        let mut d = vec![0x09, 0x00, 0x10, 0x10, b'U', b'N', 0, 0];
        d.extend_from_slice(&UNDEFINED.to_le_bytes());
        d.extend_from_slice(&header_le(ITEM, UNDEFINED));
        check(&d, Encoding::EXPLICIT_LE, Some("truncated"));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut d = Vec::new();
        for _ in 0..(MAX_DEPTH + 5) {
            d.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0]);
            d.extend_from_slice(&UNDEFINED.to_le_bytes());
            d.extend_from_slice(&header_le(ITEM, UNDEFINED));
        }
        check(&d, Encoding::EXPLICIT_LE, Some("nesting-too-deep"));
    }

    #[test]
    fn stray_delimiters_and_bad_vrs_are_refused() {
        check(
            &header_le(ITEM_END, 0),
            Encoding::EXPLICIT_LE,
            Some("bad-item-delimiter"),
        );
        check(
            &[0x08, 0x00, 0x60, 0x00, 0x01, 0x02, 0, 0],
            Encoding::EXPLICIT_LE,
            Some("bad-value-representation"),
        );
        check(
            &el_le((0x0008, 0x1070), b"ON", b"Operator^Olga "),
            Encoding::EXPLICIT_LE,
            Some("bad-value-representation"),
        );
    }

    #[test]
    fn fixed_size_values_must_fill_whole_numbers() {
        check(
            &el_le((0x0028, 0x0010), b"US", &[1, 2, 3, 4]),
            Encoding::EXPLICIT_LE,
            None,
        );
        check(
            &el_le((0x0028, 0x0010), b"US", &[1, 2, 3]),
            Encoding::EXPLICIT_LE,
            Some("bad-value-length"),
        );
        // Implicit VR: the parser's dictionary says (0000,0000) is UL; 26 bytes is not.
        let mut d = header_le((0x0000, 0x0000), 26);
        d.extend_from_slice(&[0u8; 26]);
        check(&d, Encoding::IMPLICIT_LE, Some("bad-value-length"));
    }

    #[test]
    fn meta_lengths_are_checked() {
        let mut m = el_le((0x0002, 0x0010), b"UI", b"1.2.840.10008.1.2.1\0");
        assert_eq!(check_meta(&m, 0), Ok(m.len()));
        m.extend_from_slice(&[
            0x02, 0x00, 0x02, 0x00, b'O', b'B', 0, 0, 0xF0, 0xFF, 0xFF, 0xFF,
        ]);
        assert_eq!(check_meta(&m, 0).map_err(|p| p.reason), Err("truncated"));
        // A VR that is not one is read as UN (4-byte length) by the parser: checked as such.
        let mut m = el_le((0x0002, 0x0010), b"UI", b"1.2.840.10008.1.2.1\0");
        m.extend_from_slice(&[
            0x02, 0x00, 0x03, 0x00, b'U', 0x8E, 0x8E, 0x8E, 0x8E, 0x8E, 0x8E, 0x8E,
        ]);
        assert_eq!(check_meta(&m, 0).map_err(|p| p.reason), Err("truncated"));
    }
}
