//! PS3.15 Annex E de-identification of one DICOM object: a pure function of the object, the
//! policy (profile options) and the keys. No file, clock or network access happens here.
//!
//! The rules come from the standard's Table E.1-1 ([`table`]); combined action codes are
//! resolved by the attribute's type in the object's IOD ([`iod`]); a safety net beyond the
//! table catches person names, dates, times and UIDs by VR and every private attribute not on
//! the safe list ([`private`]). The walk recurses into every sequence item at every depth.

pub mod allow;
pub mod dates;
pub mod dictionary;
pub mod iod;
pub mod keys;
pub mod pixels;
pub mod private;
pub mod registry;
pub mod table;
pub mod un;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::ops::RangeInclusive;

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_object::mem::InMemElement;
use dicom_object::{DefaultDicomObject, FileMetaTableBuilder, InMemDicomObject};

use self::dictionary::Dictionary;
use self::iod::{IodLookup, IodTables, Position};
use self::keys::{Keys, OriginalIdentity, PatientIdentity, Pseudonym};
use self::private::{PrivateKind, SafePrivate, private_kind};
use self::table::{BasicAction, DeidOption, OptionAction, Rule, RuleTable};

pub use fc_read::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};

const DUMMY_TEXT: &str = "DEIDENTIFIED";

mod tags {
    use dicom_core::Tag;
    pub const SOP_CLASS_UID: Tag = Tag(0x0008, 0x0016);
    pub const SOP_INSTANCE_UID: Tag = Tag(0x0008, 0x0018);
    pub const STUDY_DATE: Tag = Tag(0x0008, 0x0020);
    pub const CODE_VALUE: Tag = Tag(0x0008, 0x0100);
    pub const CODING_SCHEME_DESIGNATOR: Tag = Tag(0x0008, 0x0102);
    pub const CODE_MEANING: Tag = Tag(0x0008, 0x0104);
    pub const PATIENT_NAME: Tag = Tag(0x0010, 0x0010);
    pub const PATIENT_ID: Tag = Tag(0x0010, 0x0020);
    pub const ISSUER_OF_PATIENT_ID: Tag = Tag(0x0010, 0x0021);
    pub const PATIENT_BIRTH_DATE: Tag = Tag(0x0010, 0x0030);
    pub const PATIENT_AGE: Tag = Tag(0x0010, 0x1010);
    pub const PATIENT_IDENTITY_REMOVED: Tag = Tag(0x0012, 0x0062);
    pub const DEIDENTIFICATION_METHOD: Tag = Tag(0x0012, 0x0063);
    pub const DEIDENTIFICATION_METHOD_CODE_SEQUENCE: Tag = Tag(0x0012, 0x0064);
    pub const STUDY_INSTANCE_UID: Tag = Tag(0x0020, 0x000D);
    pub const SERIES_INSTANCE_UID: Tag = Tag(0x0020, 0x000E);
    pub const LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED: Tag = Tag(0x0028, 0x0303);
    pub const VALUE_TYPE: Tag = Tag(0x0040, 0xA040);
    pub const TEXT_VALUE: Tag = Tag(0x0040, 0xA160);
    pub const TEXT_OBJECT_SEQUENCE: Tag = Tag(0x0070, 0x0008);
    pub const GRAPHIC_OBJECT_SEQUENCE: Tag = Tag(0x0070, 0x0009);
    pub const OVERLAY_DATA: u16 = 0x3000;
    pub const CURVE_DATA: u16 = 0x3000;
}

/// The profile options and their parameters, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeidPolicy {
    /// Options of the profile in force (the basic profile alone when empty).
    pub options: BTreeSet<DeidOption>,
    /// Clean Descriptors keeps a descriptor only if it equals one of these phrases (compared
    /// case-insensitively, with runs of spaces collapsed).
    pub descriptor_allow_list: Vec<String>,
    /// Modified Dates shifts every date of a patient back by a keyed number of days in this range.
    pub date_shift_days: RangeInclusive<u32>,
    /// Retain Patient Characteristics writes the age as the lower bound of its band.
    pub age_band_lower_bounds: Vec<u32>,
    /// Objects that may carry burned-in text are quarantined unless one of these covers them.
    pub masking_rules: Vec<pixels::MaskingRule>,
    /// Text attributes the table does not list that this site keeps beyond the shipped
    /// allow-list ([`allow::TextAllowList`]).
    pub keep_text_attributes: BTreeSet<Tag>,
    /// NIfTI sidecar keys this site keeps beyond the shipped acquisition fields.
    pub sidecar_keys: Vec<String>,
}

impl Default for DeidPolicy {
    fn default() -> Self {
        DeidPolicy {
            options: BTreeSet::new(),
            descriptor_allow_list: Vec::new(),
            date_shift_days: 1..=3650,
            age_band_lower_bounds: (0..=85).step_by(5).collect(),
            masking_rules: Vec::new(),
            keep_text_attributes: BTreeSet::new(),
            sidecar_keys: Vec::new(),
        }
    }
}

/// A policy that cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error(
        "options retain-longitudinal-full-dates and retain-longitudinal-modified-dates exclude each other (PS3.15 E.3.6); choose one"
    )]
    BothDateOptions,
    #[error(
        "date shift range {0}..={1} is invalid: the minimum must be at least 1 day and not above the maximum"
    )]
    DateShiftRange(u32, u32),
    #[error("age band lower bounds must start at 0 and increase strictly")]
    AgeBands,
    #[error("unknown de-identification option {0:?}; known options: {1}")]
    UnknownOption(String, String),
}

impl DeidPolicy {
    /// Check the policy before use.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.has(DeidOption::RetainLongitudinalFullDates)
            && self.has(DeidOption::RetainLongitudinalModifiedDates)
        {
            return Err(PolicyError::BothDateOptions);
        }
        let (lo, hi) = (*self.date_shift_days.start(), *self.date_shift_days.end());
        if lo == 0 || lo > hi {
            return Err(PolicyError::DateShiftRange(lo, hi));
        }
        let b = &self.age_band_lower_bounds;
        if b.first() != Some(&0) || b.windows(2).any(|w| w[0] >= w[1]) {
            return Err(PolicyError::AgeBands);
        }
        Ok(())
    }

    /// Parse option names as written in configuration files.
    pub fn parse_options<'a>(
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<BTreeSet<DeidOption>, PolicyError> {
        names
            .into_iter()
            .map(|n| {
                DeidOption::from_config_name(n).ok_or_else(|| {
                    let known: Vec<&str> =
                        DeidOption::ALL.iter().map(|o| o.config_name()).collect();
                    PolicyError::UnknownOption(n.to_owned(), known.join(", "))
                })
            })
            .collect()
    }

    /// Whether an option is in force.
    pub fn has(&self, o: DeidOption) -> bool {
        self.options.contains(&o)
    }

    fn allows_descriptor(&self, value: &str) -> bool {
        let v = normalise_phrase(value);
        !v.is_empty()
            && self
                .descriptor_allow_list
                .iter()
                .any(|a| normalise_phrase(a) == v)
    }
}

fn normalise_phrase(s: &str) -> String {
    s.trim_matches([' ', '\0'])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_uppercase()
}

/// A content problem that keeps an object from being de-identified. The object goes to
/// quarantine with [`Finding::code`] as its reason; the batch goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// A Type 1 attribute the de-identifier needs is absent or empty.
    MissingAttribute {
        tag: Tag,
        keyword: &'static str,
        reason: &'static str,
    },
    /// A Type 1 UID the de-identifier needs is not one UID (several values, or characters a
    /// UID cannot hold): the file meta could not name it.
    InvalidUid {
        tag: Tag,
        keyword: &'static str,
        reason: &'static str,
    },
    /// The object may carry burned-in text and no masking rule covers it.
    BurnedInRisk { why: &'static str },
    /// A masking rule covers the object but its pixel data is compressed.
    BurnedInCompressed,
    /// A masking rule covers the object but its pixel layout cannot be masked.
    Unmaskable { detail: String },
    /// The output could not be assembled (file meta information).
    Unwritable { detail: String },
}

impl Finding {
    /// Machine-readable reason.
    pub fn code(&self) -> String {
        match self {
            Self::MissingAttribute { reason, .. } | Self::InvalidUid { reason, .. } => {
                (*reason).to_owned()
            }
            Self::BurnedInRisk { .. } => "burned-in-risk".to_owned(),
            Self::BurnedInCompressed => "burned-in-compressed".to_owned(),
            Self::Unmaskable { .. } => "unmaskable-pixel-data".to_owned(),
            Self::Unwritable { .. } => "unwritable".to_owned(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingAttribute { tag, keyword, .. } => write!(
                f,
                "{keyword} ({:04X},{:04X}) is absent or empty; the object cannot be de-identified consistently",
                tag.group(),
                tag.element()
            ),
            Self::InvalidUid { tag, keyword, .. } => write!(
                f,
                "{keyword} ({:04X},{:04X}) is not a single valid UID; the file meta information cannot name the object",
                tag.group(),
                tag.element()
            ),
            Self::BurnedInRisk { why } => write!(
                f,
                "may carry burned-in text ({why}); add a masking rule for this device and matrix size, or review and release"
            ),
            Self::BurnedInCompressed => write!(
                f,
                "a masking rule covers this object but its pixel data is compressed; it is not decoded and re-encoded here"
            ),
            Self::Unmaskable { detail } => write!(f, "pixel data cannot be masked: {detail}"),
            Self::Unwritable { detail } => write!(f, "output header could not be built: {detail}"),
        }
    }
}

/// A de-identified object and the pseudonymous keys that place it in the output layout.
#[derive(Debug)]
pub struct Deidentified {
    pub object: DefaultDicomObject,
    pub patient: Pseudonym,
    /// Keyed hash of the original Study Instance UID.
    pub study_token: String,
    /// Keyed hash of the original Series Instance UID.
    pub series_token: String,
    /// Keyed hash of the original SOP Instance UID.
    pub instance_token: String,
    /// The original identifiers, for the encrypted re-identification map only.
    pub original: OriginalIdentity,
    /// A conformance problem of the input that was read past (e.g. `odd-length`), set by the
    /// caller that read it; recorded with the output.
    pub input_finding: Option<&'static str>,
}

impl Deidentified {
    /// Relative output path `<patient>/<study>/<series>/<instance>.dcm`: every component is a
    /// pseudonym or a keyed hash, never an original value.
    pub fn relative_path(&self) -> std::path::PathBuf {
        [
            self.patient.as_str(),
            &self.study_token,
            &self.series_token,
            &format!("{}.dcm", self.instance_token),
        ]
        .iter()
        .collect()
    }
}

/// What to do with one attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Remove,
    Empty,
    Dummy,
    Keep,
    RemapUid,
    Clean(CleanKind),
}

/// The meaning of `C`, by the option that asked for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum CleanKind {
    /// Ordered by protectiveness: when two options clean the same row, the first wins.
    Descriptor,
    StructuredContent,
    Graphics,
    Token,
    ShiftDate,
}

fn clean_kind(o: DeidOption) -> CleanKind {
    match o {
        DeidOption::CleanDescriptors | DeidOption::RetainPatientCharacteristics => {
            CleanKind::Descriptor
        }
        DeidOption::CleanStructuredContent => CleanKind::StructuredContent,
        DeidOption::CleanGraphics => CleanKind::Graphics,
        DeidOption::RetainLongitudinalModifiedDates => CleanKind::ShiftDate,
        // Device identity cleans AE titles and network names to consistent tokens; the safe
        // private row's C is handled by the private-attribute walk.
        DeidOption::RetainDeviceIdentity
        | DeidOption::RetainSafePrivate
        | DeidOption::RetainUids
        | DeidOption::RetainInstitutionIdentity
        | DeidOption::RetainLongitudinalFullDates => CleanKind::Token,
    }
}

/// Per-object state of one run of the walk.
struct Instance<'o> {
    sop_class: &'o str,
    shift_days: u32,
}

/// The de-identifier: rules, tables, policy and keys.
#[derive(Debug)]
pub struct Deidentifier<'a> {
    policy: &'a DeidPolicy,
    keys: &'a Keys,
    table: &'static RuleTable,
    iods: &'static IodTables,
    dictionary: &'static Dictionary,
    safe: &'static SafePrivate,
}

fn text_of(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let e = obj.get(tag)?;
    let s = e.value().to_str().ok()?;
    let s = s.trim_matches([' ', '\0']);
    (!s.is_empty()).then(|| s.to_owned())
}

fn is_text_vr(vr: VR) -> bool {
    matches!(
        vr,
        VR::AE
            | VR::AS
            | VR::CS
            | VR::DA
            | VR::DS
            | VR::DT
            | VR::IS
            | VR::LO
            | VR::LT
            | VR::PN
            | VR::SH
            | VR::ST
            | VR::TM
            | VR::UC
            | VR::UI
            | VR::UR
            | VR::UT
    )
}

fn strings_of(e: &InMemElement) -> Vec<String> {
    match e.value() {
        Value::Primitive(PrimitiveValue::Empty) => Vec::new(),
        Value::Primitive(p) if is_text_vr(e.vr()) => p.to_multi_str().into_owned(),
        _ => Vec::new(),
    }
}

fn element(tag: Tag, vr: VR, value: PrimitiveValue) -> InMemElement {
    DataElement::new(tag, vr, value)
}

fn strs(values: Vec<String>) -> PrimitiveValue {
    match values.len() {
        0 => PrimitiveValue::Empty,
        1 => PrimitiveValue::Str(values.into_iter().next().unwrap_or_default()),
        _ => PrimitiveValue::Strs(values.into()),
    }
}

fn sequence(tag: Tag, items: Vec<InMemDicomObject>) -> InMemElement {
    DataElement::new(
        tag,
        VR::SQ,
        Value::from(DataSetSequence::new(items, Length::UNDEFINED)),
    )
}

fn position_below(pos: Position, seq: Tag) -> Position {
    match pos {
        Position::Top => Position::FirstLevel { parent: seq },
        _ => Position::Deeper,
    }
}

impl<'a> Deidentifier<'a> {
    /// A de-identifier for the embedded edition of the standard.
    pub fn new(policy: &'a DeidPolicy, keys: &'a Keys) -> Self {
        Deidentifier {
            policy,
            keys,
            table: RuleTable::standard(),
            iods: IodTables::standard(),
            dictionary: Dictionary::standard(),
            safe: SafePrivate::standard(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &DeidPolicy {
        self.policy
    }

    /// The keys in use.
    pub fn keys(&self) -> &Keys {
        self.keys
    }

    /// The patient identity an object carries.
    pub fn patient_identity(obj: &InMemDicomObject) -> PatientIdentity {
        if let Some(id) = text_of(obj, tags::PATIENT_ID) {
            return PatientIdentity::Id {
                id,
                issuer: text_of(obj, tags::ISSUER_OF_PATIENT_ID).unwrap_or_default(),
            };
        }
        let name = text_of(obj, tags::PATIENT_NAME);
        let birth = text_of(obj, tags::PATIENT_BIRTH_DATE);
        if name.is_some() || birth.is_some() {
            return PatientIdentity::NameAndBirthDate {
                name: name.unwrap_or_default(),
                birth_date: birth.unwrap_or_default(),
            };
        }
        PatientIdentity::Study(
            text_of(obj, tags::STUDY_INSTANCE_UID)
                .or_else(|| text_of(obj, tags::SOP_INSTANCE_UID))
                .unwrap_or_default(),
        )
    }

    /// De-identify one object. The output keeps the input's transfer syntax; its file meta
    /// information is rebuilt from the new values.
    pub fn deidentify(&self, file: &DefaultDicomObject) -> Result<Deidentified, Finding> {
        // Attributes a converter wrote as UN are read with their dictionary VR first, so the
        // rules see their values (and no UID or text passes as opaque bytes).
        let big_endian =
            file.meta().transfer_syntax().trim_end_matches('\0') == "1.2.840.10008.1.2.2";
        let reinterpreted = un::reinterpret(file, big_endian, self.dictionary, self.safe);
        let obj: &InMemDicomObject = reinterpreted.as_ref().unwrap_or(file);
        let required = |tag: Tag, keyword: &'static str, missing: &'static str, invalid| {
            let v = text_of(obj, tag).ok_or(Finding::MissingAttribute {
                tag,
                keyword,
                reason: missing,
            })?;
            // One UID: VR UI, digits and dots, at most 64 characters (PS3.5 §9.1).
            if obj.get(tag).map(|e| e.vr()) != Some(VR::UI)
                || v.len() > 64
                || !v.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            {
                return Err(Finding::InvalidUid {
                    tag,
                    keyword,
                    reason: invalid,
                });
            }
            Ok(v)
        };
        let sop_class = required(
            tags::SOP_CLASS_UID,
            "SOPClassUID",
            "missing-sop-class-uid",
            "invalid-sop-class-uid",
        )?;
        let sop_instance = required(
            tags::SOP_INSTANCE_UID,
            "SOPInstanceUID",
            "missing-sop-instance-uid",
            "invalid-sop-instance-uid",
        )?;
        let study = text_of(obj, tags::STUDY_INSTANCE_UID).unwrap_or_default();
        let series = text_of(obj, tags::SERIES_INSTANCE_UID).unwrap_or_default();

        let risk = pixels::burned_in_risk(obj);
        let mask = match risk {
            Some(why) => Some(
                pixels::matching_rule(obj, &self.policy.masking_rules)
                    .ok_or(Finding::BurnedInRisk { why })?,
            ),
            None => None,
        };
        let identity = Self::patient_identity(obj);
        let patient = self.keys.pseudonym(&identity);
        let inst = Instance {
            sop_class: &sop_class,
            shift_days: self
                .keys
                .date_shift_days(&identity, &self.policy.date_shift_days),
        };

        let mut out = self.walk(&inst, obj, Position::Top);
        if let Some(rule) = mask {
            pixels::apply_mask(&mut out, rule).map_err(|e| match e {
                pixels::MaskError::Compressed => Finding::BurnedInCompressed,
                pixels::MaskError::Unsupported(detail) => Finding::Unmaskable { detail },
            })?;
        }
        // Overlay planes in the unused high bits of native pixel data go.
        pixels::clear_bits_above_high_bit(&mut out);
        self.finish_top_level(obj, &mut out, &patient, mask.is_some());

        // The file meta says what the data set says: never two different instance UIDs.
        let new_sop_instance = text_of(&out, tags::SOP_INSTANCE_UID).unwrap_or_else(|| {
            if self.policy.has(DeidOption::RetainUids) {
                sop_instance.clone()
            } else {
                self.keys.remap_uid(&sop_instance)
            }
        });
        // Both from the output data set: what a reader finds in the meta is what it holds
        // (a class UID that is not registered was remapped there).
        let meta_class = text_of(&out, tags::SOP_CLASS_UID).unwrap_or_else(|| sop_class.clone());
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(meta_class)
            .media_storage_sop_instance_uid(new_sop_instance)
            .transfer_syntax(file.meta().transfer_syntax())
            .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
            .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
            .build()
            .map_err(|e| Finding::Unwritable {
                detail: e.to_string(),
            })?;
        Ok(Deidentified {
            object: out.with_exact_meta(meta),
            patient,
            study_token: self.keys.path_token("study", &study),
            series_token: self.keys.path_token("series", &series),
            instance_token: self.keys.path_token("instance", &sop_instance),
            input_finding: None,
            original: OriginalIdentity {
                patient_id: text_of(obj, tags::PATIENT_ID).unwrap_or_default(),
                issuer: text_of(obj, tags::ISSUER_OF_PATIENT_ID).unwrap_or_default(),
                name: text_of(obj, tags::PATIENT_NAME).unwrap_or_default(),
                birth_date: text_of(obj, tags::PATIENT_BIRTH_DATE).unwrap_or_default(),
            },
        })
    }

    /// Attributes the profile writes at the top level (E.1.1 items 6, and the options'
    /// own attributes).
    fn finish_top_level(
        &self,
        orig: &InMemDicomObject,
        out: &mut InMemDicomObject,
        p: &Pseudonym,
        masked: bool,
    ) {
        out.put(element(
            tags::PATIENT_ID,
            VR::LO,
            PrimitiveValue::from(p.as_str()),
        ));
        out.put(element(
            tags::PATIENT_NAME,
            VR::PN,
            PrimitiveValue::from(p.as_str()),
        ));
        if self.policy.has(DeidOption::RetainPatientCharacteristics) {
            match self.age_years(orig) {
                Some(years) => {
                    let band = dates::band_age(years, &self.policy.age_band_lower_bounds);
                    out.put(element(
                        tags::PATIENT_AGE,
                        VR::AS,
                        PrimitiveValue::from(band),
                    ));
                }
                None => {
                    out.remove_element(tags::PATIENT_AGE);
                }
            }
        }
        out.put(element(
            tags::PATIENT_IDENTITY_REMOVED,
            VR::CS,
            PrimitiveValue::from("YES"),
        ));
        let mut method = vec![format!("PS3.15 {} Basic Profile", table::EDITION)];
        method.extend(
            self.policy
                .options
                .iter()
                .map(|o| o.config_name().to_owned()),
        );
        if masked {
            method.push("clean-pixel-data (masking rule)".to_owned());
        }
        out.put(element(tags::DEIDENTIFICATION_METHOD, VR::LO, strs(method)));
        let code_item = |c: &table::MethodCode| {
            InMemDicomObject::from_element_iter([
                element(
                    tags::CODE_VALUE,
                    VR::SH,
                    PrimitiveValue::from(c.value.as_str()),
                ),
                element(
                    tags::CODING_SCHEME_DESIGNATOR,
                    VR::SH,
                    PrimitiveValue::from(c.scheme.as_str()),
                ),
                element(
                    tags::CODE_MEANING,
                    VR::LO,
                    PrimitiveValue::from(c.meaning.as_str()),
                ),
            ])
        };
        let mut items = vec![code_item(table::basic_profile_code())];
        items.extend(
            self.policy
                .options
                .iter()
                .map(|o| code_item(o.method_code())),
        );
        if masked && let Some(c) = table::method_codes().iter().find(|c| c.value == "113101") {
            items.push(code_item(c));
        }
        out.put(sequence(tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE, items));
        let longitudinal = if self.policy.has(DeidOption::RetainLongitudinalFullDates) {
            "UNMODIFIED"
        } else if self.policy.has(DeidOption::RetainLongitudinalModifiedDates) {
            "MODIFIED"
        } else {
            "REMOVED"
        };
        out.put(element(
            tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
            VR::CS,
            PrimitiveValue::from(longitudinal),
        ));
    }

    /// Age in years: Patient's Age if valid, else computed from birth and study dates.
    fn age_years(&self, orig: &InMemDicomObject) -> Option<u32> {
        if let Some(a) = text_of(orig, tags::PATIENT_AGE).and_then(|a| dates::parse_age_years(&a)) {
            return Some(a);
        }
        let birth = dates::Date::parse_da(&text_of(orig, tags::PATIENT_BIRTH_DATE)?)?;
        let study = dates::Date::parse_da(&text_of(orig, tags::STUDY_DATE)?)?;
        u32::try_from(birth.years_until(study)).ok()
    }

    /// De-identify one data set (the top level or a sequence item).
    fn walk(&self, inst: &Instance<'_>, obj: &InMemDicomObject, pos: Position) -> InMemDicomObject {
        // Private creators of this data set: (group, block) -> creator.
        let mut creators: HashMap<(u16, u8), (String, &InMemElement)> = HashMap::new();
        for e in obj.iter() {
            let t = e.tag();
            if !t.group().is_multiple_of(2)
                && let PrivateKind::Creator { block } = private_kind(t)
            {
                let c = e
                    .value()
                    .to_str()
                    .map(|s| s.into_owned())
                    .unwrap_or_default();
                creators.insert((t.group(), block), (c, e));
            }
        }
        let mut used_blocks: HashSet<(u16, u8)> = HashSet::new();
        let mut out: Vec<InMemElement> = Vec::new();
        for e in obj.iter() {
            let tag = e.tag();
            if !tag.group().is_multiple_of(2) {
                if let Some(kept) = self.private_element(inst, e, pos, &creators) {
                    if let PrivateKind::Data { block } = private_kind(tag) {
                        used_blocks.insert((tag.group(), block));
                    }
                    out.push(kept);
                }
                continue;
            }
            // Command and file meta groups have no place in a data set; group lengths are
            // recomputed by writers; signatures and trailing padding go (E.1.1, Note 8).
            if matches!(tag.group(), 0x0000 | 0x0002 | 0xFFFA | 0xFFFC) || tag.element() == 0 {
                continue;
            }
            let action = self.action_for(inst, e, pos);
            if let Some(new) = self.apply(inst, e, action, pos) {
                out.push(new);
            }
        }
        for (group, block) in used_blocks {
            if let Some((_, creator)) = creators.get(&(group, block)) {
                out.push((*creator).clone());
            }
        }
        InMemDicomObject::from_element_iter(out)
    }

    /// A private element survives only under Retain Safe Private, when its creator and element
    /// are on the safe list; its content is then walked like any other.
    fn private_element(
        &self,
        inst: &Instance<'_>,
        e: &InMemElement,
        pos: Position,
        creators: &HashMap<(u16, u8), (String, &InMemElement)>,
    ) -> Option<InMemElement> {
        if !self.policy.has(DeidOption::RetainSafePrivate) {
            return None;
        }
        let tag = e.tag();
        let PrivateKind::Data { block } = private_kind(tag) else {
            return None;
        };
        let (creator, _) = creators.get(&(tag.group(), block))?;
        if !self.safe.is_safe(tag, creator) {
            return None;
        }
        self.apply(inst, e, Action::Keep, pos)
    }

    /// The VR to reason with: the element's own, or the dictionary's when the file said `UN`.
    fn effective_vr(&self, e: &InMemElement) -> VR {
        match e.vr() {
            VR::UN => self.dictionary.vr(e.tag()).unwrap_or(VR::UN),
            vr => vr,
        }
    }

    fn action_for(&self, inst: &Instance<'_>, e: &InMemElement, pos: Position) -> Action {
        let tag = e.tag();
        if let Some(rule) = self.table.lookup(tag) {
            return self.rule_action(inst, rule, tag, pos);
        }
        // Overlay attributes without a row: the whole overlay goes with its data under the
        // basic profile; under Clean Graphics its free-text labels are emptied.
        if table::is_repeating_group(tag.group(), 0x6000) {
            return if self.policy.has(DeidOption::CleanGraphics) {
                match self.effective_vr(e) {
                    VR::LO | VR::SH | VR::LT | VR::ST | VR::UT => Action::Empty,
                    _ => Action::Keep,
                }
            } else {
                Action::Remove
            };
        }
        self.safety_net(inst, e, pos)
    }

    /// Beyond the table: PN, DA, DT, TM and UI by VR, and free text by content: an attribute
    /// with a text VR (or an unknown one) goes unless the allow-list or the site keeps it.
    fn safety_net(&self, inst: &Instance<'_>, e: &InMemElement, pos: Position) -> Action {
        let full = self.policy.has(DeidOption::RetainLongitudinalFullDates);
        let modified = self.policy.has(DeidOption::RetainLongitudinalModifiedDates);
        let allowed = || {
            allow::TextAllowList::standard().contains(e.tag())
                || self.policy.keep_text_attributes.contains(&e.tag())
        };
        let by_vr = match self.effective_vr(e) {
            VR::PN => Action::Remove,
            VR::LO | VR::SH | VR::ST | VR::LT | VR::UT | VR::UC | VR::UR | VR::UN if !allowed() => {
                Action::Remove
            }
            VR::DA | VR::DT if modified => Action::Clean(CleanKind::ShiftDate),
            VR::DA | VR::DT | VR::TM if full => Action::Keep,
            VR::TM if modified => Action::Keep,
            VR::DA | VR::DT | VR::TM => Action::Remove,
            VR::UI if self.policy.has(DeidOption::RetainUids) => Action::Keep,
            VR::UI => Action::RemapUid,
            _ => Action::Keep,
        };
        if by_vr == Action::Remove {
            // Keep the object valid where the IOD needs the attribute.
            return match self.iods.lookup(inst.sop_class, pos, e.tag()) {
                IodLookup::Type(t) if t.needs_value() => Action::Dummy,
                IodLookup::Type(t) if t.needs_presence() => Action::Empty,
                _ => Action::Remove,
            };
        }
        by_vr
    }

    fn rule_action(&self, inst: &Instance<'_>, rule: &Rule, tag: Tag, pos: Position) -> Action {
        let mut keep = false;
        let mut clean: Option<CleanKind> = None;
        for &o in &self.policy.options {
            match rule.option(o) {
                Some(OptionAction::K) => keep = true,
                Some(OptionAction::C) => {
                    let k = clean_kind(o);
                    clean = Some(clean.map_or(k, |c| c.min(k)));
                }
                None => {}
            }
        }
        // The more protective wins: C over K.
        if let Some(c) = clean {
            return Action::Clean(c);
        }
        if keep {
            return Action::Keep;
        }
        let lookup = self.iods.lookup(inst.sop_class, pos, tag);
        let ty = match lookup {
            IodLookup::Type(t) => Some(t),
            _ => None,
        };
        let covered = lookup != IodLookup::NotCovered;
        let by_type = |one: Action, two: Action, three: Action| match ty {
            Some(t) if t.needs_value() => one,
            Some(t) if t.needs_presence() => two,
            _ => three,
        };
        match rule.basic {
            BasicAction::D => Action::Dummy,
            BasicAction::U => Action::RemapUid,
            BasicAction::Z => by_type(Action::Dummy, Action::Empty, Action::Empty),
            BasicAction::X => Action::Remove,
            // Where the tables do not say, a dummy (never the original value) keeps the
            // object valid whatever its IOD requires.
            BasicAction::ZD if !covered => Action::Dummy,
            BasicAction::XD | BasicAction::XZD if !covered => Action::Dummy,
            BasicAction::XZ if !covered => Action::Empty,
            BasicAction::XZU if !covered => Action::RemapUid,
            BasicAction::ZD => by_type(Action::Dummy, Action::Empty, Action::Empty),
            BasicAction::XZ => by_type(Action::Empty, Action::Empty, Action::Remove),
            BasicAction::XD => by_type(Action::Dummy, Action::Remove, Action::Remove),
            BasicAction::XZD => by_type(Action::Dummy, Action::Empty, Action::Remove),
            BasicAction::XZU => by_type(Action::RemapUid, Action::Empty, Action::Remove),
        }
    }

    fn walk_items(
        &self,
        inst: &Instance<'_>,
        items: &[InMemDicomObject],
        seq: Tag,
        pos: Position,
    ) -> Vec<InMemDicomObject> {
        let below = position_below(pos, seq);
        items.iter().map(|i| self.walk(inst, i, below)).collect()
    }

    fn apply(
        &self,
        inst: &Instance<'_>,
        e: &InMemElement,
        action: Action,
        pos: Position,
    ) -> Option<InMemElement> {
        let tag = e.tag();
        let vr = self.effective_vr(e);
        match (action, e.value()) {
            (Action::Remove, _) => None,
            (Action::Empty, Value::Sequence(_)) => Some(sequence(tag, Vec::new())),
            (Action::Empty, _) => Some(element(tag, vr, PrimitiveValue::Empty)),
            (Action::Dummy, Value::Sequence(_)) => {
                Some(sequence(tag, vec![InMemDicomObject::new_empty()]))
            }
            (Action::Dummy, _) if vr == VR::UI => self.apply(inst, e, Action::RemapUid, pos),
            (Action::Dummy, _) => Some(element(tag, vr, dummy_value(vr))),
            // Items that declare a Value Type are content items wherever they appear:
            // cleaned like structured content (text, names, dates and UIDs go).
            (Action::Keep | Action::RemapUid, Value::Sequence(s))
                if s.items().iter().any(|i| i.get(tags::VALUE_TYPE).is_some()) =>
            {
                Some(sequence(
                    tag,
                    self.clean_content_items(inst, s.items(), tag, pos),
                ))
            }
            (Action::Keep | Action::RemapUid, Value::Sequence(s)) => {
                Some(sequence(tag, self.walk_items(inst, s.items(), tag, pos)))
            }
            (Action::Keep, _) => Some(e.clone()),
            (Action::RemapUid, Value::Primitive(_)) => {
                let values = strings_of(e)
                    .into_iter()
                    .map(|u| {
                        let u = u.trim_matches([' ', '\0']).to_owned();
                        if u.is_empty() || registry::UidRegistry::standard().is_registered(&u) {
                            u
                        } else {
                            self.keys.remap_uid(&u)
                        }
                    })
                    .collect();
                Some(element(tag, VR::UI, strs(values)))
            }
            (Action::RemapUid, _) => Some(element(tag, vr, PrimitiveValue::Empty)),
            (Action::Clean(kind), _) => self.clean(inst, e, kind, vr, pos),
        }
    }

    fn clean(
        &self,
        inst: &Instance<'_>,
        e: &InMemElement,
        kind: CleanKind,
        vr: VR,
        pos: Position,
    ) -> Option<InMemElement> {
        let tag = e.tag();
        let empty = || Some(element(tag, vr, PrimitiveValue::Empty));
        if let Value::Sequence(s) = e.value() {
            let items = match kind {
                CleanKind::StructuredContent => self.clean_content_items(inst, s.items(), tag, pos),
                CleanKind::Graphics => s
                    .items()
                    .iter()
                    .map(|item| {
                        let mut item = self.walk(inst, item, position_below(pos, tag));
                        item.remove_element(tags::TEXT_OBJECT_SEQUENCE);
                        item.remove_element(tags::GRAPHIC_OBJECT_SEQUENCE);
                        self.scrub_free_text(&item)
                    })
                    .collect(),
                CleanKind::Descriptor => self
                    .walk_items(inst, s.items(), tag, pos)
                    .iter()
                    .map(|i| self.scrub_free_text(i))
                    .collect(),
                _ => self.walk_items(inst, s.items(), tag, pos),
            };
            return Some(sequence(tag, items));
        }
        match kind {
            CleanKind::Descriptor => {
                let values = strings_of(e);
                if !values.is_empty() && values.iter().all(|v| self.policy.allows_descriptor(v)) {
                    Some(e.clone())
                } else {
                    empty()
                }
            }
            CleanKind::ShiftDate => match vr {
                VR::DA | VR::DT => {
                    let shift = |v: &String| match vr {
                        VR::DA => dates::shift_da(v, inst.shift_days),
                        _ => dates::shift_dt(v, inst.shift_days),
                    };
                    let values: Option<Vec<String>> = strings_of(e).iter().map(shift).collect();
                    match values {
                        Some(v) => Some(element(tag, vr, strs(v))),
                        None => empty(),
                    }
                }
                VR::TM => Some(e.clone()),
                _ => None,
            },
            CleanKind::Token => {
                let values: Vec<String> = strings_of(e)
                    .iter()
                    .map(|v| self.keys.token("AE", v, 16))
                    .collect();
                if values.is_empty() {
                    empty()
                } else {
                    Some(element(tag, vr, strs(values)))
                }
            }
            CleanKind::Graphics => {
                let is_data = (table::is_repeating_group(tag.group(), 0x6000)
                    && tag.element() == tags::OVERLAY_DATA)
                    || (table::is_repeating_group(tag.group(), 0x5000)
                        && tag.element() == tags::CURVE_DATA);
                match e.value() {
                    Value::Primitive(p) if is_data => {
                        let len = p.calculate_byte_len();
                        Some(match vr {
                            VR::OW => {
                                element(tag, vr, PrimitiveValue::U16(vec![0u16; len / 2].into()))
                            }
                            _ => element(tag, VR::OB, PrimitiveValue::U8(vec![0u8; len].into())),
                        })
                    }
                    _ if is_text_vr(vr) && !matches!(vr, VR::DS | VR::IS | VR::CS) => empty(),
                    _ => Some(e.clone()),
                }
            }
            CleanKind::StructuredContent => empty(),
        }
    }

    /// Inside a sequence cleaned as a descriptor, free text (LO, ST, LT, UT, UC: code meanings,
    /// comments) survives only if allow-listed; coded values (SH, CS) and structure stay.
    fn scrub_free_text(&self, item: &InMemDicomObject) -> InMemDicomObject {
        let elements = item.iter().map(|e| match (e.value(), e.vr()) {
            (Value::Sequence(s), _) => sequence(
                e.tag(),
                s.items().iter().map(|i| self.scrub_free_text(i)).collect(),
            ),
            (Value::Primitive(_), VR::LO | VR::ST | VR::LT | VR::UT | VR::UC) => {
                let values = strings_of(e);
                if !values.is_empty() && values.iter().all(|v| self.policy.allows_descriptor(v)) {
                    e.clone()
                } else {
                    element(e.tag(), e.vr(), PrimitiveValue::Empty)
                }
            }
            _ => e.clone(),
        });
        InMemDicomObject::from_element_iter(elements.collect::<Vec<_>>())
    }

    /// Clean Structured Content: keep coded content items (and containers, numbers, image and
    /// spatial references), remove text, person name, date, time and UID items, and items
    /// that declare no value type (nothing says what they hold).
    fn clean_content_items(
        &self,
        inst: &Instance<'_>,
        items: &[InMemDicomObject],
        seq: Tag,
        pos: Position,
    ) -> Vec<InMemDicomObject> {
        let below = position_below(pos, seq);
        items
            .iter()
            .filter(|item| {
                let vt = text_of(item, tags::VALUE_TYPE).unwrap_or_default();
                matches!(
                    vt.as_str(),
                    "CONTAINER"
                        | "CODE"
                        | "NUM"
                        | "IMAGE"
                        | "COMPOSITE"
                        | "WAVEFORM"
                        | "SCOORD"
                        | "SCOORD3D"
                        | "TCOORD"
                )
            })
            .map(|item| {
                let mut item = self.walk(inst, item, below);
                item.remove_element(tags::TEXT_VALUE);
                item
            })
            .collect()
    }
}

/// A non-empty value valid for the VR that carries no information.
fn dummy_value(vr: VR) -> PrimitiveValue {
    match vr {
        VR::AE | VR::CS | VR::LO | VR::LT | VR::PN | VR::SH | VR::ST | VR::UC | VR::UT => {
            PrimitiveValue::from(DUMMY_TEXT)
        }
        VR::UR => PrimitiveValue::from("urn:oid:2.25.0"),
        VR::AS => PrimitiveValue::from("000Y"),
        VR::DA => PrimitiveValue::from("19000101"),
        VR::DT => PrimitiveValue::from("19000101000000"),
        VR::TM => PrimitiveValue::from("000000"),
        VR::DS | VR::IS => PrimitiveValue::from("0"),
        VR::UI => PrimitiveValue::from("2.25.0"),
        VR::US | VR::OW => PrimitiveValue::U16(vec![0].into()),
        VR::SS => PrimitiveValue::I16(vec![0].into()),
        VR::UL | VR::OL => PrimitiveValue::U32(vec![0].into()),
        VR::SL => PrimitiveValue::I32(vec![0].into()),
        VR::UV | VR::OV => PrimitiveValue::U64(vec![0].into()),
        VR::SV => PrimitiveValue::I64(vec![0].into()),
        VR::FL | VR::OF => PrimitiveValue::F32(vec![0.0].into()),
        VR::FD | VR::OD => PrimitiveValue::F64(vec![0.0].into()),
        VR::AT => PrimitiveValue::Tags(vec![Tag(0, 0)].into()),
        VR::OB | VR::UN | VR::SQ => PrimitiveValue::U8(vec![0, 0].into()),
    }
}
