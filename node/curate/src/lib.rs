//! Curation: every problem a consortium would otherwise discover months later, found at the
//! site on the day the data arrives. Each check is a pure function over de-identified objects,
//! volumes and the consortium schema; findings carry a stable code, a severity, the
//! pseudonymous key of the series and a sentence that names no identifying value.

pub mod conformance;
pub mod quality;
pub mod report;

use dicom_core::Tag;
use serde::Serialize;

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    /// Stable machine-readable code.
    pub code: &'static str,
    pub severity: Severity,
    /// The attribute concerned, as `(GGGG,EEEE)`.
    pub tag: Option<String>,
    /// A sentence for people; names tags and numbers, never an identifying value.
    pub message: String,
}

impl Finding {
    pub fn new(code: &'static str, severity: Severity, tag: Option<Tag>, message: &str) -> Self {
        Finding {
            code,
            severity,
            tag: tag.map(|t| format!("({:04X},{:04X})", t.group(), t.element())),
            message: message.to_owned(),
        }
    }
}
