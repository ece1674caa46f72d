//! De-identification of NIfTI-1/2 and Analyze 7.5 inputs and their JSON sidecars.
//!
//! The image is re-written by our NIfTI-1 writer, which keeps geometry and data only: every
//! text field (`descrip`, `aux_file`, `intent_name`, `db_name`, `data_type`, Analyze's
//! `patient_id`, `exp_date`, `exp_time`, `generated`, `scannum`, `originator`) and every header
//! extension of the input is gone, and the gzip stream has no file name or time stamp. A file
//! has no Patient ID: its subject key comes from a mapping file, a folder convention, or the
//! file itself, and only its keyed pseudonym is used. Output names come from pseudonyms and
//! keyed hashes, never from input names.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use serde_json::{Map, Value};

use fc_deid::DeidPolicy;
use fc_deid::keys::{Keys, OriginalIdentity, PatientIdentity, Pseudonym};
use fc_deid::table::DeidOption;

use super::nifti;

/// How NIfTI/Analyze inputs are assigned to subjects.
#[derive(Clone, Debug, Default)]
pub struct SubjectRule {
    /// Relative path (file or folder, `/`-separated) → subject identifier.
    pub mapping: BTreeMap<String, String>,
    /// If set, the first `n` folders of the relative path name the subject.
    pub folder_depth: Option<usize>,
}

impl SubjectRule {
    /// Parse a mapping CSV: `path,subject` per line (a header line `path,subject` is allowed).
    pub fn parse_mapping(text: &str) -> Result<BTreeMap<String, String>, String> {
        let mut m = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty()
                || line.starts_with('#')
                || (n == 0 && line.eq_ignore_ascii_case("path,subject"))
            {
                continue;
            }
            let (p, s) = line
                .split_once(',')
                .ok_or_else(|| format!("line {}: expected `path,subject`", n + 1))?;
            m.insert(p.trim().trim_matches('/').to_owned(), s.trim().to_owned());
        }
        Ok(m)
    }

    /// The subject of an input at `rel` (relative to the input folder).
    pub fn subject(&self, rel: &Path) -> String {
        let parts: Vec<String> = rel
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        // Longest mapped prefix wins.
        for n in (1..=parts.len()).rev() {
            if let Some(s) = self.mapping.get(&parts[..n].join("/")) {
                return s.clone();
            }
        }
        if let Some(d) = self.folder_depth
            && parts.len() > d
        {
            return parts[..d].join("/");
        }
        parts.join("/")
    }
}

/// Sidecar keys that identify a person, a place or an instance.
const IDENTIFYING_KEYS: &[&str] = &[
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "RequestingPhysician",
    "ImageComments",
    "PatientComments",
    "StudyComments",
];

/// Free-text descriptors, kept only when allow-listed under Clean Descriptors.
const DESCRIPTOR_KEYS: &[&str] = &[
    "SeriesDescription",
    "ProtocolName",
    "StudyDescription",
    "ProcedureStepDescription",
    "BodyPartExamined",
];

/// Patient characteristics, kept only under Retain Patient Characteristics.
const CHARACTERISTIC_KEYS: &[&str] = &["PatientSex", "PatientAge", "PatientWeight", "PatientSize"];

/// Device identity, kept only under Retain Device Identity.
const DEVICE_KEYS: &[&str] = &["ManufacturersModelName", "SoftwareVersions", "StationName"];

/// Times of day, kept under either longitudinal option.
const TIME_KEYS: &[&str] = &["AcquisitionTime", "SeriesTime", "StudyTime", "ContentTime"];

/// Acquisition fields a sidecar may keep: the BIDS sidecar fields that describe how an image
/// was acquired (MRI: hardware, sequence, spatial encoding, timing, RF and contrast; CT and PET:
/// technique and reconstruction), and dcm2niix's technical fields beside them. Everything else
/// a converter wrote (vendor dumps, comments, unknown keys) is dropped; a site adds keys in
/// `[deid] keep_sidecar_keys`.
const ACQUISITION_KEYS: &[&str] = &[
    // Provenance of the conversion.
    "Modality",
    "ConversionSoftware",
    "ConversionSoftwareVersion",
    // Scanner hardware (device identity keys are judged separately).
    "Manufacturer",
    "MagneticFieldStrength",
    "ReceiveCoilName",
    "ReceiveCoilActiveElements",
    "GradientSetType",
    "MRTransmitCoilSequence",
    "MatrixCoilMode",
    "CoilCombinationMethod",
    "CoilString",
    "ImagingFrequency",
    // Sequence specifics.
    "PulseSequenceType",
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "SequenceName",
    "PulseSequenceDetails",
    "NonlinearGradientCorrection",
    "MRAcquisitionType",
    "MTState",
    "MTOffsetFrequency",
    "MTPulseBandwidth",
    "MTNumberOfPulses",
    "MTPulseShape",
    "MTPulseDuration",
    "SpoilingState",
    "SpoilingType",
    "SpoilingRFPhaseIncrement",
    "SpoilingGradientMoment",
    "SpoilingGradientDuration",
    "ImageType",
    "ImageTypeText",
    "SeriesNumber",
    "AcquisitionNumber",
    "EchoNumber",
    "NumberOfAverages",
    "SAR",
    // Spatial encoding.
    "NumberShots",
    "ParallelReductionFactorInPlane",
    "ParallelReductionFactorOutOfPlane",
    "ParallelAcquisitionTechnique",
    "PartialFourier",
    "PartialFourierDirection",
    "PhaseEncodingDirection",
    "PhaseEncodingAxis",
    "EffectiveEchoSpacing",
    "DerivedVendorReportedEchoSpacing",
    "TotalReadoutTime",
    "MixingTime",
    "PixelBandwidth",
    "BandwidthPerPixelPhaseEncode",
    "AcquisitionMatrixPE",
    "ReconMatrixPE",
    "BaseResolution",
    "PhaseResolution",
    "PercentPhaseFOV",
    "PercentSampling",
    "EchoTrainLength",
    "InPlanePhaseEncodingDirectionDICOM",
    "ImageOrientationPatientDICOM",
    "ImageOrientationText",
    "SliceThickness",
    "SpacingBetweenSlices",
    "PatientPosition",
    "ShimSetting",
    "TxRefAmp",
    // Timing.
    "EchoTime",
    "EchoTime1",
    "EchoTime2",
    "InversionTime",
    "SliceTiming",
    "SliceEncodingDirection",
    "DwellTime",
    "RepetitionTime",
    "RepetitionTimeExcitation",
    "RepetitionTimePreparation",
    "VolumeTiming",
    "AcquisitionDuration",
    "DelayTime",
    "DelayAfterTrigger",
    "NumberOfVolumesDiscardedByScanner",
    "NumberOfVolumesDiscardedByUser",
    "MultibandAccelerationFactor",
    "FrameTimesStart",
    "FrameDuration",
    // RF and contrast.
    "FlipAngle",
    "NegativeContrast",
    "ContrastBolusIngredient",
    // CT.
    "XRayExposure",
    "XRayTubeCurrent",
    "ExposureTime",
    "KVP",
    "ReconstructionDiameter",
    "ConvolutionKernel",
    "DataCollectionDiameter",
    "SingleCollimationWidth",
    "TotalCollimationWidth",
    "TableSpeed",
    "TableFeedPerRotation",
    "SpiralPitchFactor",
    "GantryDetectorTilt",
    "ExposureModulationType",
    "CTDIvol",
    "Units",
    // PET.
    "TracerName",
    "TracerRadionuclide",
    "InjectedRadioactivity",
    "InjectedRadioactivityUnits",
    "InjectedMass",
    "InjectedMassUnits",
    "ModeOfAdministration",
    "AttenuationCorrection",
    "ReconMethodName",
    "ReconMethodParameterLabels",
    "ReconMethodParameterUnits",
    "ReconMethodParameterValues",
    "ReconFilterType",
    "ReconFilterSize",
    "DecayCorrectionFactor",
    "DoseCalibrationFactor",
    "ScatterFraction",
    "RadionuclideHalfLife",
];

/// Scrub a converter's JSON sidecar with the profile's options.
pub fn scrub_sidecar(value: &Value, policy: &DeidPolicy) -> Value {
    let Value::Object(map) = value else {
        return Value::Object(Map::new());
    };
    let mut out = Map::new();
    for (k, v) in map {
        let keep = if IDENTIFYING_KEYS.contains(&k.as_str())
            || k.ends_with("UID")
            || k.ends_with("Date")
            || k.ends_with("DateTime")
            || k.ends_with("SerialNumber")
            || k.ends_with("Address")
            || k.ends_with("PhysicianName")
        {
            false
        } else if DESCRIPTOR_KEYS.contains(&k.as_str()) {
            policy.has(DeidOption::CleanDescriptors)
                && v.as_str().is_some_and(|s| {
                    policy
                        .descriptor_allow_list
                        .iter()
                        .any(|a| a.trim().eq_ignore_ascii_case(s.trim()))
                })
        } else if CHARACTERISTIC_KEYS.contains(&k.as_str()) {
            policy.has(DeidOption::RetainPatientCharacteristics) && k != "PatientAge"
        } else if DEVICE_KEYS.contains(&k.as_str()) {
            policy.has(DeidOption::RetainDeviceIdentity)
        } else if TIME_KEYS.contains(&k.as_str()) {
            policy.has(DeidOption::RetainLongitudinalFullDates)
                || policy.has(DeidOption::RetainLongitudinalModifiedDates)
        } else if ACQUISITION_KEYS.contains(&k.as_str())
            || policy.sidecar_keys.iter().any(|x| x == k)
        {
            // Acquisition parameters (numbers, codes) stay; free text under their names goes.
            !matches!(v, Value::String(s) if s.chars().any(|c| c.is_ascii_lowercase()) && s.contains(' '))
        } else {
            // Unknown keys go, whatever they hold.
            false
        };
        if keep {
            out.insert(k.clone(), v.clone());
        }
    }
    Value::Object(out)
}

/// What de-identifying one NIfTI/Analyze input produced.
#[derive(Debug)]
pub struct NiftiOutput {
    pub patient: Pseudonym,
    /// Keyed hash of the input's relative path: the output's name.
    pub token: String,
    /// `.nii.gz` bytes.
    pub image: Vec<u8>,
    /// Scrubbed sidecar, if the input had one.
    pub sidecar: Option<Vec<u8>>,
    /// The subject key (for the encrypted map only).
    pub original: OriginalIdentity,
}

/// De-identify a NIfTI/Analyze file at `path` (relative path `rel` to the input folder).
pub fn deidentify(
    path: &Path,
    rel: &Path,
    keys: &Keys,
    policy: &DeidPolicy,
    subjects: &SubjectRule,
) -> Result<NiftiOutput, (String, String)> {
    // A 3D volume of a datatype we decode is rewritten by our writer; anything else (4D fMRI
    // and diffusion, 5D CIFTI, complex or 64-bit types) keeps its numbers and voxels as they
    // are, with every text field and extension removed.
    let image = match nifti::read(path) {
        Ok((_, volume)) => nifti::encode_gz(&volume),
        Err(nifti::NiftiError::Dimensions(_) | nifti::NiftiError::Datatype(_)) => {
            let bytes = nifti::rewrite(path).map_err(|e| (e.reason().to_owned(), e.to_string()))?;
            nifti::gzip(&bytes, 6)
        }
        Err(e) => return Err((e.reason().to_owned(), e.to_string())),
    }
    .map_err(|e| ("unwritable".to_owned(), e.to_string()))?;
    let subject = subjects.subject(rel);
    let identity = PatientIdentity::Id {
        id: subject.clone(),
        issuer: "fedcurate:nifti-subject".into(),
    };
    let patient = keys.pseudonym(&identity);
    let token = keys.path_token("nifti", &rel.to_string_lossy());
    let sidecar = sidecar_of(path).map(|text| {
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Object(Map::new()));
        serde_json::to_vec_pretty(&scrub_sidecar(&v, policy)).unwrap_or_default()
    });
    Ok(NiftiOutput {
        patient,
        token,
        image,
        sidecar,
        original: OriginalIdentity {
            patient_id: subject,
            issuer: "nifti subject".into(),
            ..OriginalIdentity::default()
        },
    })
}

/// The JSON sidecar of an image (`x.json` for `x.nii`, `x.nii.gz`, `x.hdr`).
pub fn sidecar_path(path: &Path) -> Option<std::path::PathBuf> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    let stem = ["nii.gz", "nii", "hdr.gz", "hdr"]
        .iter()
        .find_map(|ext| name.strip_suffix(&format!(".{ext}")))?;
    Some(path.with_file_name(format!("{stem}.json")))
}

fn sidecar_of(path: &Path) -> Option<String> {
    std::fs::read_to_string(sidecar_path(path)?).ok()
}

/// Whether `path` is consumed together with another input (an Analyze/NIfTI `.img` next to
/// its `.hdr`, a sidecar next to its image) and so is not an input of its own.
pub fn is_companion(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    let sibling = |ext: &str, strip: &str| {
        lower
            .strip_suffix(strip)
            .map(|stem| path.with_file_name(format!("{}{ext}", &name[..stem.len()])))
            .is_some_and(|p| p.exists())
    };
    if lower.ends_with(".img") || lower.ends_with(".img.gz") {
        let strip = if lower.ends_with(".gz") {
            ".img.gz"
        } else {
            ".img"
        };
        return sibling(".hdr", strip) || sibling(".hdr.gz", strip);
    }
    if lower.ends_with(".json") {
        return [".nii", ".nii.gz", ".hdr", ".hdr.gz"]
            .iter()
            .any(|e| sibling(e, ".json"));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_from_mapping_folders_or_files() {
        let mut rule = SubjectRule {
            mapping: SubjectRule::parse_mapping("path,subject\nsite/a,S1\nsite/b/x.nii.gz,S2\n")
                .expect("csv"),
            folder_depth: None,
        };
        assert_eq!(rule.subject(Path::new("site/a/t1.nii")), "S1");
        assert_eq!(rule.subject(Path::new("site/b/x.nii.gz")), "S2");
        assert_eq!(rule.subject(Path::new("site/c/y.nii")), "site/c/y.nii");
        rule.folder_depth = Some(1);
        assert_eq!(rule.subject(Path::new("sub-01/anat/t1.nii")), "sub-01");
        assert!(SubjectRule::parse_mapping("nocomma\n").is_err());
    }

    #[test]
    fn sidecars_lose_identifying_keys_and_keep_acquisition_parameters() {
        let v: Value = serde_json::json!({
            "PatientName": "Doe^Jane", "AcquisitionDateTime": "2019-03-12T10:00:00",
            "SeriesInstanceUID": "1.2.3", "DeviceSerialNumber": "SN1", "InstitutionName": "X",
            "RepetitionTime": 2.3, "EchoTime": 0.03, "FlipAngle": 9, "Modality": "MR",
            "SeriesDescription": "T1 MPRAGE", "PatientSex": "F", "AcquisitionTime": "10:00:00",
            "ConversionSoftware": "dcm2niix", "ImageComments": "seen by Dr Who",
            "ReferralNote": "MRN 00412345", "PatientWeightHistory": [71.5, 70.0],
            "Siemens_CSA_Header": {"tPatientName": "DOE"},
        });
        let basic = scrub_sidecar(&v, &DeidPolicy::default());
        let keys: Vec<&str> = basic
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "ConversionSoftware",
                "EchoTime",
                "FlipAngle",
                "Modality",
                "RepetitionTime"
            ]
        );
        let mut p = DeidPolicy::default();
        p.options.insert(DeidOption::RetainPatientCharacteristics);
        p.options.insert(DeidOption::CleanDescriptors);
        p.descriptor_allow_list = vec!["t1 mprage".into()];
        let kept = scrub_sidecar(&v, &p);
        assert_eq!(kept["PatientSex"], "F");
        assert_eq!(kept["SeriesDescription"], "T1 MPRAGE");
        assert!(kept.get("PatientName").is_none());
        // Keys not on the acquisition list go whatever they hold, unless the site keeps them.
        for k in ["ReferralNote", "PatientWeightHistory", "Siemens_CSA_Header"] {
            assert!(kept.get(k).is_none(), "{k}");
        }
        p.sidecar_keys = vec!["PatientWeightHistory".into()];
        assert!(scrub_sidecar(&v, &p).get("PatientWeightHistory").is_some());
    }
}
