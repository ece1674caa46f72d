//! The text allow-list: public attributes with a text VR (LO, SH, ST, LT, UT, UC, UR) that
//! Table E.1-1 does not list and that the node keeps anyway, because they hold technical
//! descriptors (codes, equipment models, acquisition settings), never a person's data. Every
//! other unlisted text attribute is removed by the safety net: a free-text field the standard
//! forgot (or added after our edition) is treated as identifying until someone says why it is
//! not. The list ships in `node/data/local/text-allow-list.tsv`, one reason per row; a site adds
//! its own in `[deid] keep_text_attributes`.

use std::collections::HashMap;
use std::sync::OnceLock;

use dicom_core::Tag;

const ALLOW_TSV: &str = include_str!("../../data/local/text-allow-list.tsv");

/// One allowed attribute and why it is safe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    pub keyword: String,
    pub reason: String,
}

/// The shipped allow-list.
#[derive(Debug, Default)]
pub struct TextAllowList {
    tags: HashMap<Tag, Allowed>,
}

/// Parse `gggg,eeee` (hex).
pub fn parse_tag(s: &str) -> Option<Tag> {
    let (g, e) = s.trim().split_once(',')?;
    if g.len() != 4 || e.len() != 4 {
        return None;
    }
    Some(Tag(
        u16::from_str_radix(g, 16).ok()?,
        u16::from_str_radix(e, 16).ok()?,
    ))
}

impl TextAllowList {
    /// The list shipped with the node.
    pub fn standard() -> &'static TextAllowList {
        static LIST: OnceLock<TextAllowList> = OnceLock::new();
        LIST.get_or_init(|| Self::parse(ALLOW_TSV))
    }

    fn parse(text: &str) -> Self {
        let mut tags = HashMap::new();
        for line in text.lines().skip(1) {
            let mut cells = line.split('\t');
            let (Some(tag), Some(keyword), Some(reason)) =
                (cells.next(), cells.next(), cells.next())
            else {
                continue;
            };
            if let Some(tag) = parse_tag(tag) {
                tags.insert(
                    tag,
                    Allowed {
                        keyword: keyword.to_owned(),
                        reason: reason.to_owned(),
                    },
                );
            }
        }
        TextAllowList { tags }
    }

    pub fn get(&self, tag: Tag) -> Option<&Allowed> {
        self.tags.get(&tag)
    }

    pub fn contains(&self, tag: Tag) -> bool {
        self.tags.contains_key(&tag)
    }

    pub fn len(&self) -> usize {
        self.tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// Every entry, in tag order.
    pub fn entries(&self) -> Vec<(Tag, &Allowed)> {
        let mut v: Vec<(Tag, &Allowed)> = self.tags.iter().map(|(t, a)| (*t, a)).collect();
        v.sort_by_key(|(t, _)| *t);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::VR;

    #[test]
    fn every_entry_is_a_text_attribute_the_table_lacks_with_a_reason() {
        let list = TextAllowList::standard();
        let dictionary = super::super::dictionary::Dictionary::standard();
        let table = super::super::table::RuleTable::standard();
        assert_eq!(list.len(), 65);
        for (tag, a) in list.entries() {
            assert_eq!(dictionary.keyword(tag), Some(a.keyword.as_str()), "{tag}");
            assert!(
                matches!(
                    dictionary.vr(tag),
                    Some(VR::LO | VR::SH | VR::ST | VR::LT | VR::UT | VR::UC | VR::UR)
                ),
                "{tag} {} is not a text attribute",
                a.keyword
            );
            assert!(table.lookup(tag).is_none(), "{tag} is in the table");
            assert!(a.reason.len() > 10, "{tag} needs a reason");
        }
        assert_eq!(parse_tag("0008,0070"), Some(Tag(0x0008, 0x0070)));
        assert_eq!(parse_tag("8,70"), None);
    }
}
