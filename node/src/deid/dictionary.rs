//! The PS3.6 data dictionary (`node/data/standard/data-dictionary.tsv`): the VR the standard
//! gives each attribute. The safety net uses it when a file was written in implicit VR and the
//! parser could only say `UN`, so an unknown-to-the-parser PN, DA or UI is still caught.

use std::collections::HashMap;
use std::sync::OnceLock;

use dicom_core::{Tag, VR};

const DICTIONARY_TSV: &str = include_str!("../../data/standard/data-dictionary.tsv");

/// Tag → VR, with the repeating-group entries (`60XX,3000`, `1000,XXX0`) as masks.
#[derive(Debug, Default)]
pub struct Dictionary {
    exact: HashMap<Tag, VR>,
    /// (mask, value, vr): the entry matches when `tag_u32 & mask == value`.
    masked: Vec<(u32, u32, VR)>,
}

fn parse_vr(s: &str) -> Option<VR> {
    // "US or SS" and friends: the first alternative is the one to assume.
    let first = s.split(" or ").next()?.trim();
    first.parse().ok()
}

impl Dictionary {
    /// The embedded dictionary.
    pub fn standard() -> &'static Dictionary {
        static D: OnceLock<Dictionary> = OnceLock::new();
        D.get_or_init(|| Self::parse(DICTIONARY_TSV))
    }

    fn parse(text: &str) -> Self {
        let mut d = Dictionary::default();
        for line in text.lines().skip(1) {
            let mut cells = line.split('\t');
            let (Some(tag), Some(_kw), Some(vr)) = (cells.next(), cells.next(), cells.next())
            else {
                continue;
            };
            let Some(vr) = parse_vr(vr) else { continue };
            let hex: String = tag.chars().filter(|c| *c != ',').collect();
            if hex.len() != 8 {
                continue;
            }
            if hex.contains(['X', 'x']) {
                let mut mask = 0u32;
                let mut value = 0u32;
                for c in hex.chars() {
                    mask <<= 4;
                    value <<= 4;
                    if let Some(v) = c.to_digit(16) {
                        mask |= 0xF;
                        value |= v;
                    }
                }
                d.masked.push((mask, value, vr));
            } else if let Ok(v) = u32::from_str_radix(&hex, 16) {
                d.exact.insert(Tag((v >> 16) as u16, v as u16), vr);
            }
        }
        d
    }

    /// The dictionary VR of a public attribute.
    pub fn vr(&self, tag: Tag) -> Option<VR> {
        if let Some(&vr) = self.exact.get(&tag) {
            return Some(vr);
        }
        let t = (u32::from(tag.group()) << 16) | u32::from(tag.element());
        self.masked
            .iter()
            .find(|(mask, value, _)| t & mask == *value)
            .map(|&(_, _, vr)| vr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vrs_from_the_dictionary() {
        let d = Dictionary::standard();
        assert_eq!(d.vr(Tag(0x0010, 0x0010)), Some(VR::PN));
        assert_eq!(d.vr(Tag(0x0008, 0x0020)), Some(VR::DA));
        assert_eq!(d.vr(Tag(0x0020, 0x000D)), Some(VR::UI));
        assert_eq!(d.vr(Tag(0x6004, 0x3000)), Some(VR::OB));
        assert_eq!(d.vr(Tag(0x0028, 0x0106)), Some(VR::US));
        assert_eq!(d.vr(Tag(0x0009, 0x0010)), None);
    }
}
