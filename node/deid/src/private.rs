//! Safe private attributes (PS3.15 Table E.3.10-1, `node/data/standard/safe-private.tsv`).
//!
//! A private data element `(gggg,xxee)` is identified by its group, its private creator (the
//! value of `(gggg,00xx)` in the same data set) and the low byte `ee`; the block byte `xx`
//! varies per file. The creator must match the table's string exactly (trailing spaces and
//! NUL padding aside): a near miss is not on the list, so it is removed.

use std::collections::HashSet;
use std::sync::OnceLock;

use dicom_core::Tag;

const SAFE_PRIVATE_TSV: &str = include_str!("../../data/standard/safe-private.tsv");

/// The safe list.
#[derive(Debug, Default)]
pub struct SafePrivate {
    entries: HashSet<(u16, u8, String)>,
}

impl SafePrivate {
    /// The embedded list.
    pub fn standard() -> &'static SafePrivate {
        static S: OnceLock<SafePrivate> = OnceLock::new();
        S.get_or_init(|| Self::parse(SAFE_PRIVATE_TSV))
    }

    fn parse(text: &str) -> Self {
        let mut s = SafePrivate::default();
        for line in text.lines().skip(1) {
            let mut cells = line.split('\t');
            let (Some(tag), Some(creator)) = (cells.next(), cells.next()) else {
                continue;
            };
            let Some((g, e)) = tag.split_once(',') else {
                continue;
            };
            let (Ok(g), Some(Ok(low))) = (
                u16::from_str_radix(g, 16),
                e.get(2..4).map(|l| u8::from_str_radix(l, 16)),
            ) else {
                continue;
            };
            s.entries.insert((g, low, creator.to_owned()));
        }
        s
    }

    /// Number of rows on the list.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the private data element `tag`, whose block was reserved by `creator`, is safe.
    pub fn is_safe(&self, tag: Tag, creator: &str) -> bool {
        let creator = creator.trim_end_matches([' ', '\0']);
        self.entries.contains(&(
            tag.group(),
            (tag.element() & 0xFF) as u8,
            creator.to_owned(),
        ))
    }
}

/// The kind of a private-group element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrivateKind {
    /// `(gggg,0010)`–`(gggg,00FF)`: reserves block `xx` for a creator.
    Creator { block: u8 },
    /// `(gggg,xxee)` with `xx` ≥ 0x10: data in block `xx`.
    Data { block: u8 },
    /// Group length or the illegal `(gggg,0001)`–`(gggg,000F)`.
    Other,
}

/// Classify an element of an odd group.
pub fn private_kind(tag: Tag) -> PrivateKind {
    let e = tag.element();
    match e {
        0x0010..=0x00FF => PrivateKind::Creator { block: e as u8 },
        0x1000..=0xFFFF => PrivateKind::Data {
            block: (e >> 8) as u8,
        },
        _ => PrivateKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creator_and_low_byte_must_both_match() {
        let s = SafePrivate::standard();
        assert_eq!(s.len(), 479);
        // SIEMENS MR HEADER (0019,xx0C) B-value is on the list at any block.
        assert!(s.is_safe(Tag(0x0019, 0x100C), "SIEMENS MR HEADER"));
        assert!(s.is_safe(Tag(0x0019, 0x120C), "SIEMENS MR HEADER "));
        assert!(!s.is_safe(Tag(0x0019, 0x100C), "SIEMENS MR HEADR"));
        assert!(!s.is_safe(Tag(0x0019, 0x100C), "siemens mr header"));
        assert!(!s.is_safe(Tag(0x0021, 0x100C), "SIEMENS MR HEADER"));
        assert!(s.is_safe(Tag(0x7053, 0x1000), "Philips PET Private Group"));
    }

    #[test]
    fn private_kinds() {
        assert_eq!(
            private_kind(Tag(0x0009, 0x0010)),
            PrivateKind::Creator { block: 0x10 }
        );
        assert_eq!(
            private_kind(Tag(0x0009, 0x10AB)),
            PrivateKind::Data { block: 0x10 }
        );
        assert_eq!(private_kind(Tag(0x0009, 0x0000)), PrivateKind::Other);
        assert_eq!(private_kind(Tag(0x0009, 0x0005)), PrivateKind::Other);
    }
}
