//! Attribute types (1, 1C, 2, 2C, 3) per IOD, generated from the PS3.3 tables in
//! `node/data/standard/{sop-classes,iod-modules,module-attributes}.tsv`.
//!
//! The combined action codes of Table E.1-1 (X/Z/D and friends) pick their action by the
//! attribute's type in the object's IOD. The tables cover 15 image IODs at the top level and the
//! first nested level; everything else is [`IodLookup::NotCovered`].

use std::collections::HashMap;
use std::sync::OnceLock;

use dicom_core::Tag;

const SOP_CLASSES_TSV: &str = include_str!("../../data/standard/sop-classes.tsv");
const IOD_MODULES_TSV: &str = include_str!("../../data/standard/iod-modules.tsv");
const MODULE_ATTRIBUTES_TSV: &str = include_str!("../../data/standard/module-attributes.tsv");

/// Attribute type within an IOD (PS3.5 §7.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AttrType {
    /// Required, non-empty. Ordered before the others: "stricter" sorts first.
    One,
    OneC,
    Two,
    TwoC,
    Three,
}

impl AttrType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "1" => Self::One,
            "1C" => Self::OneC,
            "2" => Self::Two,
            "2C" => Self::TwoC,
            "3" => Self::Three,
            _ => return None,
        })
    }

    /// Type 1 or 1C: must have a value when present.
    pub fn needs_value(self) -> bool {
        matches!(self, Self::One | Self::OneC)
    }

    /// Type 2 or 2C: must be present, may be empty.
    pub fn needs_presence(self) -> bool {
        matches!(self, Self::Two | Self::TwoC)
    }
}

/// What the IOD tables say about one attribute at one place in one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IodLookup {
    /// The attribute has this (strictest) type in one of the IOD's modules.
    Type(AttrType),
    /// The IOD is covered at this level and does not use the attribute here.
    NotInIod,
    /// The tables do not cover this IOD or this nesting depth.
    NotCovered,
}

/// Where an attribute sits in the data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// Top level of the data set.
    Top,
    /// In an item of the top-level sequence `parent`.
    FirstLevel { parent: Tag },
    /// Deeper than the first nested level.
    Deeper,
}

type TypeMap = HashMap<(Option<Tag>, Tag), AttrType>;

/// Module usage within an IOD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Mandatory,
    Conditional,
    UserOptional,
}

/// A module of an IOD with its top-level attributes and their types.
#[derive(Clone, Debug)]
pub struct ModuleSpec {
    pub key: String,
    pub usage: Usage,
    pub attributes: Vec<(Tag, AttrType)>,
}

/// The generated IOD tables.
#[derive(Debug, Default)]
pub struct IodTables {
    sop_to_iod: HashMap<String, String>,
    types: HashMap<String, TypeMap>,
    mandatory_type1: HashMap<String, Vec<Tag>>,
    modules: HashMap<String, Vec<ModuleSpec>>,
}

/// Parse `GGGG,EEEE` where `xx` stands for a repeating group's low byte (folded to 00).
fn parse_tag(s: &str) -> Option<Tag> {
    let (g, e) = s.split_once(',')?;
    let g = g.to_ascii_lowercase().replace("xx", "00");
    Some(Tag(
        u16::from_str_radix(&g, 16).ok()?,
        u16::from_str_radix(e, 16).ok()?,
    ))
}

/// Fold repeating groups (50xx, 60xx) onto their base group, as the tables write them.
fn fold(tag: Tag) -> Tag {
    let g = tag.group();
    if super::table::is_repeating_group(g, 0x5000) || super::table::is_repeating_group(g, 0x6000) {
        Tag(g & 0xFF00, tag.element())
    } else {
        tag
    }
}

impl IodTables {
    /// The tables of the embedded edition.
    pub fn standard() -> &'static IodTables {
        static T: OnceLock<IodTables> = OnceLock::new();
        T.get_or_init(|| Self::parse(SOP_CLASSES_TSV, IOD_MODULES_TSV, MODULE_ATTRIBUTES_TSV))
    }

    fn parse(sop_classes: &str, iod_modules: &str, module_attributes: &str) -> Self {
        let rows = |text: &str| -> Vec<Vec<String>> {
            text.lines()
                .skip(1)
                .filter(|l| !l.is_empty())
                .map(|l| l.split('\t').map(str::to_owned).collect())
                .collect()
        };
        let get = |r: &Vec<String>, i: usize| r.get(i).cloned().unwrap_or_default();
        let mut t = IodTables::default();
        for r in rows(sop_classes) {
            t.sop_to_iod.insert(get(&r, 0), get(&r, 3));
        }
        // module key -> [(parent, tag, type)]
        let mut modules: HashMap<String, Vec<(Option<Tag>, Tag, AttrType)>> = HashMap::new();
        for r in rows(module_attributes) {
            let path = get(&r, 1);
            let Some(ty) = AttrType::parse(&get(&r, 3)) else {
                continue;
            };
            let (parent, tag) = match path.split_once('>') {
                Some((p, c)) => (parse_tag(p), parse_tag(c)),
                None => (None, parse_tag(&path)),
            };
            let Some(tag) = tag else { continue };
            modules
                .entry(get(&r, 0))
                .or_default()
                .push((parent, tag, ty));
        }
        for r in rows(iod_modules) {
            let iod = get(&r, 0);
            let module = get(&r, 2);
            let usage = get(&r, 3);
            let Some(attrs) = modules.get(&module) else {
                continue;
            };
            t.modules.entry(iod.clone()).or_default().push(ModuleSpec {
                key: module.clone(),
                usage: match usage.as_str() {
                    "M" => Usage::Mandatory,
                    "C" => Usage::Conditional,
                    _ => Usage::UserOptional,
                },
                attributes: attrs
                    .iter()
                    .filter(|(parent, _, _)| parent.is_none())
                    .map(|&(_, tag, ty)| (tag, ty))
                    .collect(),
            });
            let map = t.types.entry(iod.clone()).or_default();
            for &(parent, tag, ty) in attrs {
                let e = map.entry((parent, tag)).or_insert(ty);
                if ty < *e {
                    *e = ty;
                }
                if usage == "M" && parent.is_none() && ty == AttrType::One {
                    t.mandatory_type1.entry(iod.clone()).or_default().push(tag);
                }
            }
        }
        for v in t.mandatory_type1.values_mut() {
            v.sort();
            v.dedup();
        }
        t
    }

    /// The IOD name for a SOP class, if the tables cover it.
    pub fn iod_of(&self, sop_class_uid: &str) -> Option<&str> {
        self.sop_to_iod.get(sop_class_uid).map(String::as_str)
    }

    /// The type of `tag` at `position` in an object of `sop_class_uid`.
    pub fn lookup(&self, sop_class_uid: &str, position: Position, tag: Tag) -> IodLookup {
        let Some(iod) = self.iod_of(sop_class_uid) else {
            return IodLookup::NotCovered;
        };
        let Some(map) = self.types.get(iod) else {
            return IodLookup::NotCovered;
        };
        let key = match position {
            Position::Top => (None, fold(tag)),
            Position::FirstLevel { parent } => (Some(fold(parent)), fold(tag)),
            Position::Deeper => return IodLookup::NotCovered,
        };
        match map.get(&key) {
            Some(&t) => IodLookup::Type(t),
            None => IodLookup::NotInIod,
        }
    }

    /// The modules of the IOD of a SOP class, if the tables cover it.
    pub fn modules(&self, sop_class_uid: &str) -> Option<&[ModuleSpec]> {
        self.iod_of(sop_class_uid)
            .and_then(|iod| self.modules.get(iod))
            .map(Vec::as_slice)
    }

    /// Top-level Type 1 attributes of the IOD's mandatory modules.
    pub fn mandatory_type1(&self, sop_class_uid: &str) -> &[Tag] {
        self.iod_of(sop_class_uid)
            .and_then(|iod| self.mandatory_type1.get(iod))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    #[test]
    fn types_come_from_the_iod_tables() {
        let t = IodTables::standard();
        assert_eq!(t.iod_of(CT), Some("CT Image"));
        // Patient ID is Type 2 in the Patient module.
        assert_eq!(
            t.lookup(CT, Position::Top, Tag(0x0010, 0x0020)),
            IodLookup::Type(AttrType::Two)
        );
        // Study Instance UID is Type 1.
        assert_eq!(
            t.lookup(CT, Position::Top, Tag(0x0020, 0x000D)),
            IodLookup::Type(AttrType::One)
        );
        // Referenced SOP Instance UID inside Referenced Patient Sequence: Type 1 at the first level.
        assert_eq!(
            t.lookup(
                CT,
                Position::FirstLevel {
                    parent: Tag(0x0008, 0x1120)
                },
                Tag(0x0008, 0x1155)
            ),
            IodLookup::Type(AttrType::One)
        );
        // Overlay Data in any overlay group folds onto 60xx.
        assert!(matches!(
            t.lookup(CT, Position::Top, Tag(0x6002, 0x3000)),
            IodLookup::Type(_)
        ));
        // Not part of a CT image.
        assert_eq!(
            t.lookup(CT, Position::Top, Tag(0x0040, 0xA730)),
            IodLookup::NotInIod
        );
        // SR is not covered, nor are deep levels.
        assert_eq!(
            t.lookup(
                "1.2.840.10008.5.1.4.1.1.88.11",
                Position::Top,
                Tag(0x0010, 0x0020)
            ),
            IodLookup::NotCovered
        );
        assert_eq!(
            t.lookup(CT, Position::Deeper, Tag(0x0010, 0x0020)),
            IodLookup::NotCovered
        );
    }

    #[test]
    fn mandatory_type1_attributes_of_ct() {
        let t = IodTables::standard();
        let m = t.mandatory_type1(CT);
        for tag in [
            Tag(0x0020, 0x000D),
            Tag(0x0020, 0x000E),
            Tag(0x0008, 0x0016),
            Tag(0x0008, 0x0018),
        ] {
            assert!(m.contains(&tag), "{tag}");
        }
        assert_eq!(
            t.iod_of("1.2.840.10008.5.1.4.1.1.1.1.1"),
            Some("Digital X-Ray Image")
        );
    }
}
