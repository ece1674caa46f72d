//! PS3.15 Table E.1-1 (attribute actions of the Basic Application Level Confidentiality Profile
//! and its options), generated at start-up from the standard's own data in
//! `node/data/standard/annex-e.tsv`, with the CID 7050 codes from `deid-method-codes.tsv`.
//!
//! Nothing here is typed by hand: the option columns, the pattern rows and the codes are read
//! from the tables, and the unit tests pin the counts the provenance note documents.

use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use dicom_core::Tag;

/// Edition of PS3.15 the embedded table was taken from.
pub const EDITION: &str = "2026c";

const ANNEX_E_TSV: &str = include_str!("../../data/standard/annex-e.tsv");
const METHOD_CODES_TSV: &str = include_str!("../../data/standard/deid-method-codes.tsv");
/// Rows the standard's table lacks, in the same layout with a `reason` column; see
/// `node/data/local/PROVENANCE.md`.
const SUPPLEMENT_TSV: &str = include_str!("../../data/local/annex-e-supplement.tsv");

/// Action code of the basic profile column (Table E.1-1a).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BasicAction {
    /// Replace with a non-empty dummy consistent with the VR.
    D,
    /// Replace with an empty value.
    Z,
    /// Remove.
    X,
    /// Replace the UID consistently.
    U,
    /// Z unless the IOD makes it Type 1, then D.
    ZD,
    /// X unless the IOD makes it Type 2, then Z.
    XZ,
    /// X unless the IOD makes it Type 1, then D.
    XD,
    /// X, Z or D by IOD type 3, 2 or 1.
    XZD,
    /// X, Z, or keep the sequence with its instance UIDs replaced, by IOD type 3, 2 or 1.
    XZU,
}

impl BasicAction {
    fn parse(code: &str) -> Option<Self> {
        Some(match code {
            "D" => Self::D,
            "Z" => Self::Z,
            "X" => Self::X,
            "U" => Self::U,
            "Z/D" => Self::ZD,
            "X/Z" => Self::XZ,
            "X/D" => Self::XD,
            "X/Z/D" => Self::XZD,
            "X/Z/U*" => Self::XZU,
            _ => return None,
        })
    }

    /// The code as the standard prints it.
    pub fn code(self) -> &'static str {
        match self {
            Self::D => "D",
            Self::Z => "Z",
            Self::X => "X",
            Self::U => "U",
            Self::ZD => "Z/D",
            Self::XZ => "X/Z",
            Self::XD => "X/D",
            Self::XZD => "X/Z/D",
            Self::XZU => "X/Z/U*",
        }
    }
}

/// Action code an option column gives a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OptionAction {
    /// Keep (recursing into sequences).
    K,
    /// Clean.
    C,
}

/// The options of the profile that have a column in Table E.1-1, in the table's column order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeidOption {
    RetainSafePrivate,
    RetainUids,
    RetainDeviceIdentity,
    RetainInstitutionIdentity,
    RetainPatientCharacteristics,
    RetainLongitudinalFullDates,
    RetainLongitudinalModifiedDates,
    CleanDescriptors,
    CleanStructuredContent,
    CleanGraphics,
}

impl DeidOption {
    /// Every option, in the table's column order.
    pub const ALL: [DeidOption; 10] = [
        Self::RetainSafePrivate,
        Self::RetainUids,
        Self::RetainDeviceIdentity,
        Self::RetainInstitutionIdentity,
        Self::RetainPatientCharacteristics,
        Self::RetainLongitudinalFullDates,
        Self::RetainLongitudinalModifiedDates,
        Self::CleanDescriptors,
        Self::CleanStructuredContent,
        Self::CleanGraphics,
    ];

    /// Column name in `annex-e.tsv` (and in `deid-method-codes.tsv`).
    pub fn column(self) -> &'static str {
        match self {
            Self::RetainSafePrivate => "retain_safe_private",
            Self::RetainUids => "retain_uids",
            Self::RetainDeviceIdentity => "retain_device_identity",
            Self::RetainInstitutionIdentity => "retain_institution_identity",
            Self::RetainPatientCharacteristics => "retain_patient_characteristics",
            Self::RetainLongitudinalFullDates => "retain_long_full_dates",
            Self::RetainLongitudinalModifiedDates => "retain_long_modified_dates",
            Self::CleanDescriptors => "clean_descriptors",
            Self::CleanStructuredContent => "clean_structured_content",
            Self::CleanGraphics => "clean_graphics",
        }
    }

    /// Name used in configuration files and on the command line.
    pub fn config_name(self) -> &'static str {
        match self {
            Self::RetainSafePrivate => "retain-safe-private",
            Self::RetainUids => "retain-uids",
            Self::RetainDeviceIdentity => "retain-device-identity",
            Self::RetainInstitutionIdentity => "retain-institution-identity",
            Self::RetainPatientCharacteristics => "retain-patient-characteristics",
            Self::RetainLongitudinalFullDates => "retain-longitudinal-full-dates",
            Self::RetainLongitudinalModifiedDates => "retain-longitudinal-modified-dates",
            Self::CleanDescriptors => "clean-descriptors",
            Self::CleanStructuredContent => "clean-structured-content",
            Self::CleanGraphics => "clean-graphics",
        }
    }

    /// Parse a configuration name.
    pub fn from_config_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.config_name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The CID 7050 code of this option, from `deid-method-codes.tsv`.
    pub fn method_code(self) -> &'static MethodCode {
        let codes = method_codes();
        // The table tests prove every column has exactly one code.
        codes
            .iter()
            .find(|c| c.column.as_deref() == Some(self.column()))
            .unwrap_or(&codes[0])
    }
}

impl fmt::Display for DeidOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.config_name())
    }
}

/// Which attributes a row of the table covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TagPattern {
    /// One attribute.
    Exact(Tag),
    /// `50xx,xxxx`: every element of the retired curve groups 5000–501E (even).
    CurveGroup,
    /// `60xx,eeee`: one element of every overlay group 6000–601E (even).
    OverlayElement(u16),
    /// `gggg,eeee` with gggg odd: every private attribute.
    Private,
}

impl TagPattern {
    /// Whether the pattern covers `tag`.
    pub fn matches(self, tag: Tag) -> bool {
        match self {
            Self::Exact(t) => t == tag,
            Self::CurveGroup => is_repeating_group(tag.group(), 0x5000),
            Self::OverlayElement(e) => {
                is_repeating_group(tag.group(), 0x6000) && tag.element() == e
            }
            Self::Private => tag.group() % 2 == 1,
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let (g, e) = text.split_once(',')?;
        match (g, e) {
            ("50xx", "xxxx") => Some(Self::CurveGroup),
            ("gggg", "eeee") => Some(Self::Private),
            ("60xx", e) => u16::from_str_radix(e, 16).ok().map(Self::OverlayElement),
            (g, e) => Some(Self::Exact(Tag(
                u16::from_str_radix(g, 16).ok()?,
                u16::from_str_radix(e, 16).ok()?,
            ))),
        }
    }
}

impl fmt::Display for TagPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(t) => write!(f, "({:04X},{:04X})", t.group(), t.element()),
            Self::CurveGroup => f.write_str("(50xx,xxxx)"),
            Self::OverlayElement(e) => write!(f, "(60xx,{e:04X})"),
            Self::Private => f.write_str("(gggg,eeee)"),
        }
    }
}

/// Whether `group` is one of the 16 even repeating groups starting at `base` (5000 or 6000).
pub fn is_repeating_group(group: u16, base: u16) -> bool {
    (base..=base + 0x1E).contains(&group) && group.is_multiple_of(2)
}

/// One row of Table E.1-1.
#[derive(Clone, Debug)]
pub struct Rule {
    pub pattern: TagPattern,
    pub keyword: String,
    pub name: String,
    pub basic: BasicAction,
    options: [Option<OptionAction>; 10],
    /// The row is in 2026c but not in the 2024b data.
    pub added_after_2024b: bool,
    /// PS3.6 lists the attribute as retired.
    pub retired: bool,
    /// A row of the node's local supplement, not of the standard's table.
    pub local: bool,
}

impl Rule {
    /// The code the given option's column gives this row, if any.
    pub fn option(&self, option: DeidOption) -> Option<OptionAction> {
        self.options[option.index()]
    }
}

/// A CID 7050 code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodCode {
    pub value: String,
    pub scheme: String,
    pub meaning: String,
    /// The Table E.1-1 column the code stands for (`basic` for the profile), if any.
    pub column: Option<String>,
}

/// The generated table.
#[derive(Debug)]
pub struct RuleTable {
    rules: Vec<Rule>,
    exact: HashMap<Tag, usize>,
    overlay: HashMap<u16, usize>,
    curve: Option<usize>,
    private: Option<usize>,
}

/// A defect in the embedded standard data; only possible if the data files were edited.
#[derive(Debug, thiserror::Error)]
#[error(
    "embedded standard table {file} line {line}: {problem}; restore node/data/standard from the provenance note"
)]
pub struct TableError {
    pub file: &'static str,
    pub line: usize,
    pub problem: String,
}

impl RuleTable {
    /// The table for the embedded edition, with the node's local supplement (rows the
    /// standard lacks; a supplement row never overrides a standard one).
    pub fn standard() -> &'static RuleTable {
        static TABLE: OnceLock<RuleTable> = OnceLock::new();
        TABLE.get_or_init(|| {
            let table = Self::parse(ANNEX_E_TSV).and_then(|mut t| {
                let local = Self::parse_named(SUPPLEMENT_TSV, "annex-e-supplement.tsv")?;
                t.extend(local)?;
                Ok(t)
            });
            match table {
                Ok(t) => t,
                // The embedded data is part of the binary and covered by tests.
                Err(e) => panic!("{e}"),
            }
        })
    }

    /// Add the rows of `local` (marked local); a row the table already has is an error.
    fn extend(&mut self, local: RuleTable) -> Result<(), TableError> {
        for (i, mut rule) in local.rules.into_iter().enumerate() {
            let TagPattern::Exact(tag) = rule.pattern else {
                return Err(TableError {
                    file: "annex-e-supplement.tsv",
                    line: i + 2,
                    problem: "only exact tags may be supplemented".into(),
                });
            };
            if self.exact.contains_key(&tag) {
                return Err(TableError {
                    file: "annex-e-supplement.tsv",
                    line: i + 2,
                    problem: format!("{tag} is in the standard's table: remove the local row"),
                });
            }
            rule.local = true;
            self.exact.insert(tag, self.rules.len());
            self.rules.push(rule);
        }
        Ok(())
    }

    /// Parse a table in the `annex-e.tsv` layout.
    pub fn parse(text: &str) -> Result<Self, TableError> {
        Self::parse_named(text, "annex-e.tsv")
    }

    fn parse_named(text: &str, file: &'static str) -> Result<Self, TableError> {
        let err = |line: usize, problem: String| TableError {
            file,
            line,
            problem,
        };
        let mut lines = text.lines().enumerate();
        let (_, header) = lines.next().ok_or_else(|| err(1, "empty file".into()))?;
        let columns: Vec<&str> = header.split('\t').collect();
        let col = |name: &str| {
            columns
                .iter()
                .position(|c| *c == name)
                .ok_or_else(|| err(1, format!("missing column {name}")))
        };
        let tag_c = col("tag")?;
        let kw_c = col("keyword")?;
        let name_c = col("name")?;
        let basic_c = col("basic")?;
        let note_c = col("edition_note")?;
        let retired_c = col("retired")?;
        let mut option_c = [0usize; 10];
        for o in DeidOption::ALL {
            option_c[o.index()] = col(o.column())?;
        }
        let mut table = RuleTable {
            rules: Vec::new(),
            exact: HashMap::new(),
            overlay: HashMap::new(),
            curve: None,
            private: None,
        };
        for (i, line) in lines {
            let n = i + 1;
            if line.is_empty() {
                continue;
            }
            let cells: Vec<&str> = line.split('\t').collect();
            let cell = |c: usize| cells.get(c).copied().unwrap_or("");
            let pattern = TagPattern::parse(cell(tag_c))
                .ok_or_else(|| err(n, format!("bad tag {:?}", cell(tag_c))))?;
            let basic = BasicAction::parse(cell(basic_c))
                .ok_or_else(|| err(n, format!("bad basic action {:?}", cell(basic_c))))?;
            let mut options = [None; 10];
            for o in DeidOption::ALL {
                options[o.index()] = match cell(option_c[o.index()]) {
                    "" => None,
                    "K" => Some(OptionAction::K),
                    "C" => Some(OptionAction::C),
                    other => return Err(err(n, format!("bad option action {other:?}"))),
                };
            }
            let idx = table.rules.len();
            let slot = match pattern {
                TagPattern::Exact(t) => table.exact.insert(t, idx).is_some(),
                TagPattern::OverlayElement(e) => table.overlay.insert(e, idx).is_some(),
                TagPattern::CurveGroup => table.curve.replace(idx).is_some(),
                TagPattern::Private => table.private.replace(idx).is_some(),
            };
            if slot {
                return Err(err(n, format!("duplicate row {pattern}")));
            }
            table.rules.push(Rule {
                pattern,
                keyword: cell(kw_c).to_owned(),
                name: cell(name_c).to_owned(),
                basic,
                options,
                added_after_2024b: cell(note_c) == "added after 2024b",
                retired: cell(retired_c) == "Y",
                local: false,
            });
        }
        Ok(table)
    }

    /// Every row, in table order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The row that covers a public attribute, if any. Private attributes (odd groups) are
    /// covered by the `gggg,eeee` row, returned by [`RuleTable::private_rule`].
    pub fn lookup(&self, tag: Tag) -> Option<&Rule> {
        if let Some(&i) = self.exact.get(&tag) {
            return Some(&self.rules[i]);
        }
        if is_repeating_group(tag.group(), 0x6000)
            && let Some(&i) = self.overlay.get(&tag.element())
        {
            return Some(&self.rules[i]);
        }
        if is_repeating_group(tag.group(), 0x5000)
            && let Some(i) = self.curve
        {
            return Some(&self.rules[i]);
        }
        None
    }

    /// The private-attributes row.
    pub fn private_rule(&self) -> Option<&Rule> {
        self.private.map(|i| &self.rules[i])
    }
}

/// The CID 7050 codes, parsed from `deid-method-codes.tsv`.
pub fn method_codes() -> &'static [MethodCode] {
    static CODES: OnceLock<Vec<MethodCode>> = OnceLock::new();
    CODES.get_or_init(|| {
        METHOD_CODES_TSV
            .lines()
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(|l| {
                let c: Vec<&str> = l.split('\t').collect();
                let get = |i: usize| c.get(i).copied().unwrap_or("").to_owned();
                MethodCode {
                    value: get(0),
                    scheme: get(1),
                    meaning: get(2),
                    column: Some(get(4)).filter(|s| !s.is_empty()),
                }
            })
            .collect()
    })
}

/// The code of the basic profile itself (113100).
pub fn basic_profile_code() -> &'static MethodCode {
    let codes = method_codes();
    codes
        .iter()
        .find(|c| c.column.as_deref() == Some("basic"))
        .unwrap_or(&codes[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> &'static RuleTable {
        RuleTable::standard()
    }

    fn rule(g: u16, e: u16) -> &'static Rule {
        table()
            .lookup(Tag(g, e))
            .unwrap_or_else(|| panic!("no rule for ({g:04X},{e:04X})"))
    }

    #[test]
    fn row_count_and_pattern_rows() {
        assert_eq!(
            table().rules().iter().filter(|r| !r.local).count(),
            656,
            "the standard's rows"
        );
        let patterns = table()
            .rules()
            .iter()
            .filter(|r| !matches!(r.pattern, TagPattern::Exact(_)))
            .count();
        assert_eq!(patterns, 4);
    }

    #[test]
    fn basic_action_distribution_matches_the_provenance_note() {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for r in table().rules().iter().filter(|r| !r.local) {
            *counts.entry(r.basic.code()).or_default() += 1;
        }
        let expect = [
            ("X", 416),
            ("D", 93),
            ("U", 55),
            ("Z", 42),
            ("X/D", 23),
            ("X/Z", 11),
            ("X/Z/D", 8),
            ("Z/D", 6),
            ("X/Z/U*", 2),
        ];
        for (code, n) in expect {
            assert_eq!(counts.get(code), Some(&n), "basic {code}");
        }
    }

    #[test]
    fn the_local_supplement_adds_rows_the_standard_lacks() {
        let dictionary = crate::dictionary::Dictionary::standard();
        let local: Vec<&Rule> = table().rules().iter().filter(|r| r.local).collect();
        assert_eq!(local.len(), 12);
        for r in &local {
            let TagPattern::Exact(tag) = r.pattern else {
                panic!("{}", r.pattern)
            };
            assert_eq!(
                dictionary.keyword(tag),
                Some(r.keyword.as_str()),
                "{tag}: the keyword is the dictionary's"
            );
            assert_eq!(table().lookup(tag).map(|x| x.local), Some(true));
        }
        for (g, e) in [(0x0400, 0x0500), (0x0010, 0x0033), (0x0008, 0x1190)] {
            assert_eq!(
                table().lookup(Tag(g, e)).map(|r| r.basic),
                Some(BasicAction::X)
            );
        }
        // A row the standard has cannot be supplemented.
        let mut t = RuleTable::parse(ANNEX_E_TSV).expect("table");
        let dup = ANNEX_E_TSV
            .lines()
            .take(1)
            .chain(ANNEX_E_TSV.lines().filter(|l| l.starts_with("0010,0010")))
            .collect::<Vec<_>>()
            .join("\n");
        let again = RuleTable::parse(&dup).expect("one row");
        assert!(t.extend(again).is_err());
    }

    #[test]
    fn option_column_counts() {
        let count = |o: DeidOption, a: OptionAction| {
            table()
                .rules()
                .iter()
                .filter(|r| !r.local && r.option(o) == Some(a))
                .count()
        };
        use DeidOption::*;
        use OptionAction::*;
        assert_eq!(count(RetainSafePrivate, C), 1);
        assert_eq!(count(RetainUids, K), 60);
        assert_eq!(count(RetainDeviceIdentity, K), 48);
        assert_eq!(count(RetainDeviceIdentity, C), 11);
        assert_eq!(count(RetainInstitutionIdentity, K), 10);
        assert_eq!(count(RetainPatientCharacteristics, K), 14);
        assert_eq!(count(RetainPatientCharacteristics, C), 5);
        assert_eq!(count(RetainLongitudinalFullDates, K), 169);
        assert_eq!(count(RetainLongitudinalModifiedDates, C), 169);
        assert_eq!(count(CleanDescriptors, C), 140);
        assert_eq!(count(CleanStructuredContent, C), 4);
        assert_eq!(count(CleanGraphics, C), 4);
    }

    #[test]
    fn the_35_rows_added_after_2024b_are_present() {
        let added: Vec<&Rule> = table()
            .rules()
            .iter()
            .filter(|r| r.added_after_2024b)
            .collect();
        assert_eq!(added.len(), 35);
        // Spot checks from the reference list of new rows.
        for (g, e, kw, basic) in [
            (0x0010, 0x0012, "NameToUse", BasicAction::X),
            (0x0070, 0x0006, "UnformattedTextValue", BasicAction::D),
            (
                0x300A,
                0x0054,
                "TableTopPositionAlignmentUID",
                BasicAction::U,
            ),
            (
                0x0040,
                0xB020,
                "WaveformAnnotationSequence",
                BasicAction::XD,
            ),
            (0x0010, 0x2161, "EthnicGroupCodeSequence", BasicAction::X),
        ] {
            let r = rule(g, e);
            assert!(r.added_after_2024b, "{kw}");
            assert_eq!(r.keyword, kw);
            assert_eq!(r.basic, basic, "{kw}");
        }
    }

    #[test]
    fn well_known_rows() {
        use DeidOption::*;
        let check = |g, e, basic: BasicAction, opts: &[(DeidOption, OptionAction)]| {
            let r = rule(g, e);
            assert_eq!(r.basic, basic, "{}", r.keyword);
            for &(o, a) in opts {
                assert_eq!(r.option(o), Some(a), "{} {o}", r.keyword);
            }
        };
        check(0x0010, 0x0010, BasicAction::Z, &[]);
        check(0x0010, 0x0020, BasicAction::ZD, &[]);
        check(
            0x0020,
            0x000D,
            BasicAction::U,
            &[(RetainUids, OptionAction::K)],
        );
        check(
            0x0008,
            0x0020,
            BasicAction::Z,
            &[
                (RetainLongitudinalFullDates, OptionAction::K),
                (RetainLongitudinalModifiedDates, OptionAction::C),
            ],
        );
        check(
            0x0008,
            0x0080,
            BasicAction::XZD,
            &[(RetainInstitutionIdentity, OptionAction::K)],
        );
        check(
            0x0010,
            0x1010,
            BasicAction::X,
            &[(RetainPatientCharacteristics, OptionAction::K)],
        );
        check(
            0x0008,
            0x1030,
            BasicAction::X,
            &[(CleanDescriptors, OptionAction::C)],
        );
        check(0x0008, 0x1140, BasicAction::XZU, &[]);
        check(0x0008, 0x2112, BasicAction::XZU, &[]);
        assert!(rule(0x0010, 0x0010).name.find('\n').is_none());
    }

    #[test]
    fn pattern_rows_match_repeating_groups_only() {
        let t = table();
        assert_eq!(
            t.lookup(Tag(0x6002, 0x3000)).map(|r| r.pattern),
            Some(TagPattern::OverlayElement(0x3000))
        );
        assert_eq!(
            t.lookup(Tag(0x601E, 0x4000)).map(|r| r.pattern),
            Some(TagPattern::OverlayElement(0x4000))
        );
        assert!(t.lookup(Tag(0x6020, 0x3000)).is_none());
        assert!(t.lookup(Tag(0x6002, 0x0010)).is_none());
        assert_eq!(
            t.lookup(Tag(0x5010, 0x0005)).map(|r| r.pattern),
            Some(TagPattern::CurveGroup)
        );
        assert!(t.lookup(Tag(0x5011, 0x0005)).is_none());
        let private = t
            .private_rule()
            .map(|r| (r.basic, r.option(DeidOption::RetainSafePrivate)));
        assert_eq!(private, Some((BasicAction::X, Some(OptionAction::C))));
        assert!(TagPattern::Private.matches(Tag(0x0009, 0x1010)));
        assert!(!TagPattern::Private.matches(Tag(0x0008, 0x1010)));
    }

    #[test]
    fn cid_7050_codes_map_to_their_columns() {
        let expect = [
            (DeidOption::CleanGraphics, "113103", "Clean Graphics Option"),
            (
                DeidOption::CleanStructuredContent,
                "113104",
                "Clean Structured Content Option",
            ),
            (
                DeidOption::CleanDescriptors,
                "113105",
                "Clean Descriptors Option",
            ),
            (
                DeidOption::RetainLongitudinalFullDates,
                "113106",
                "Retain Longitudinal Temporal Information Full Dates Option",
            ),
            (
                DeidOption::RetainLongitudinalModifiedDates,
                "113107",
                "Retain Longitudinal Temporal Information Modified Dates Option",
            ),
            (
                DeidOption::RetainPatientCharacteristics,
                "113108",
                "Retain Patient Characteristics Option",
            ),
            (
                DeidOption::RetainDeviceIdentity,
                "113109",
                "Retain Device Identity Option",
            ),
            (DeidOption::RetainUids, "113110", "Retain UIDs Option"),
            (
                DeidOption::RetainSafePrivate,
                "113111",
                "Retain Safe Private Option",
            ),
            (
                DeidOption::RetainInstitutionIdentity,
                "113112",
                "Retain Institution Identity Option",
            ),
        ];
        for (o, value, meaning) in expect {
            let c = o.method_code();
            assert_eq!(
                (c.value.as_str(), c.meaning.as_str(), c.scheme.as_str()),
                (value, meaning, "DCM"),
                "{o}"
            );
        }
        assert_eq!(basic_profile_code().value, "113100");
        assert_eq!(method_codes().len(), 13);
    }

    #[test]
    fn malformed_tables_are_rejected_with_the_line() {
        let header = ANNEX_E_TSV.lines().next().unwrap_or_default();
        let bad = format!("{header}\n0010,0010\tPatientName\tPatient's Name\tQ\n");
        let e = RuleTable::parse(&bad).expect_err("bad code must fail");
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("bad basic action"));
        assert!(RuleTable::parse("tag\tkeyword\n").is_err());
    }
}
