//! The PS3.6 data dictionary (`node/data/standard/data-dictionary.tsv`): the VR the standard
//! gives each attribute. The safety net uses it when a file was written in implicit VR and the
//! parser could only say `UN`, so an unknown-to-the-parser PN, DA or UI is still caught.

use std::collections::HashMap;
use std::sync::OnceLock;

use dicom_core::{Tag, VR};

const DICTIONARY_TSV: &str = include_str!("../../data/standard/data-dictionary.tsv");

/// Value multiplicity: `min`, `max` (`None`: unbounded), and `step` (`2-2n` has step 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vm {
    pub min: u32,
    pub max: Option<u32>,
    pub step: u32,
}

impl Vm {
    fn parse(s: &str) -> Option<Vm> {
        let s = s.trim();
        if let Some((a, b)) = s.split_once('-') {
            let min: u32 = a.parse().ok()?;
            if b.ends_with('n') {
                let k = b.trim_end_matches('n');
                let step = if k.is_empty() { 1 } else { k.parse().ok()? };
                Some(Vm {
                    min,
                    max: None,
                    step,
                })
            } else {
                Some(Vm {
                    min,
                    max: Some(b.parse().ok()?),
                    step: 1,
                })
            }
        } else {
            let n: u32 = s.parse().ok()?;
            Some(Vm {
                min: n,
                max: Some(n),
                step: 1,
            })
        }
    }

    /// Whether `n` values satisfy the multiplicity.
    pub fn allows(self, n: u32) -> bool {
        n >= self.min
            && self.max.is_none_or(|m| n <= m)
            && (n - self.min).is_multiple_of(self.step.max(1))
    }
}

/// A dictionary entry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Allowed VRs (`US or SS` lists two).
    pub vrs: Vec<VR>,
    pub vm: Option<Vm>,
    pub keyword: String,
}

/// Tag → VR, with the repeating-group entries (`60XX,3000`, `1000,XXX0`) as masks.
#[derive(Debug, Default)]
pub struct Dictionary {
    exact: HashMap<Tag, VR>,
    /// (mask, value, vr): the entry matches when `tag_u32 & mask == value`.
    masked: Vec<(u32, u32, VR)>,
    entries: HashMap<Tag, Entry>,
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
            let (Some(tag), Some(keyword), Some(vr_text)) =
                (cells.next(), cells.next(), cells.next())
            else {
                continue;
            };
            let vm = cells.next().and_then(Vm::parse);
            let Some(vr) = parse_vr(vr_text) else {
                continue;
            };
            let vrs: Vec<VR> = vr_text
                .split(" or ")
                .filter_map(|v| v.trim().parse().ok())
                .collect();
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
                let tag = Tag((v >> 16) as u16, v as u16);
                d.exact.insert(tag, vr);
                d.entries.insert(
                    tag,
                    Entry {
                        vrs,
                        vm,
                        keyword: keyword.to_owned(),
                    },
                );
            }
        }
        d
    }

    /// The full entry (allowed VRs, VM) of a public attribute with a fixed tag.
    pub fn entry(&self, tag: Tag) -> Option<&Entry> {
        self.entries.get(&tag)
    }

    /// The keyword of a public attribute with a fixed tag.
    pub fn keyword(&self, tag: Tag) -> Option<&str> {
        self.entries.get(&tag).map(|e| e.keyword.as_str())
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
        let e = d.entry(Tag(0x0020, 0x0037)).expect("IOP");
        assert_eq!(e.vrs, vec![VR::DS]);
        let vm = e.vm.expect("vm");
        assert!(vm.allows(6) && !vm.allows(5) && !vm.allows(7));
        let pv = d.entry(Tag(0x0028, 0x0106)).expect("smallest pixel value");
        assert_eq!(pv.vrs, vec![VR::US, VR::SS]);
        let two_2n = Vm::parse("2-2n").expect("vm");
        assert!(two_2n.allows(2) && two_2n.allows(4) && !two_2n.allows(3) && !two_2n.allows(1));
        let one_n = Vm::parse("1-n").expect("vm");
        assert!(one_n.allows(1) && one_n.allows(99) && !one_n.allows(0));
    }
}
