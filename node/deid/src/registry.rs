//! The standard's UID registry (PS3.6 Annex A, `node/data/standard/uid-registry.tsv`): SOP
//! classes, transfer syntaxes, well-known SOP instances and frames of reference, coding
//! schemes, LDAP OIDs. A UID listed there names a thing the standard defines, never a patient's
//! object, so it is kept; any other UID under the registry root `1.2.840.10008.` is an
//! instance UID misusing the root and is remapped like any other.

use std::collections::HashSet;
use std::sync::OnceLock;

const REGISTRY_TSV: &str = include_str!("../../data/standard/uid-registry.tsv");

/// Context group and template UIDs (PS3.16, registered in PS3.6 Table A-3): whole sub-roots
/// of the registry, listed as roots because the extracted table does not enumerate them.
const REGISTERED_SUB_ROOTS: [&str; 2] = ["1.2.840.10008.6.1.", "1.2.840.10008.8.1."];

/// The registered UIDs.
#[derive(Debug, Default)]
pub struct UidRegistry {
    uids: HashSet<&'static str>,
}

impl UidRegistry {
    /// The embedded edition.
    pub fn standard() -> &'static UidRegistry {
        static R: OnceLock<UidRegistry> = OnceLock::new();
        R.get_or_init(|| UidRegistry {
            uids: REGISTRY_TSV
                .lines()
                .skip(1)
                .filter_map(|l| l.split('\t').next())
                .filter(|u| !u.is_empty())
                .collect(),
        })
    }

    /// Number of listed UIDs.
    pub fn len(&self) -> usize {
        self.uids.len()
    }

    /// Whether the registry is empty.
    pub fn is_empty(&self) -> bool {
        self.uids.is_empty()
    }

    /// Whether a UID is defined by the standard (kept as it is by de-identification).
    pub fn is_registered(&self, uid: &str) -> bool {
        let uid = uid.trim_end_matches([' ', '\0']);
        self.uids.contains(uid)
            || REGISTERED_SUB_ROOTS.iter().any(|root| {
                uid.strip_prefix(root).is_some_and(|rest| {
                    !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_uids_are_registered_and_misused_roots_are_not() {
        let r = UidRegistry::standard();
        assert_eq!(r.len(), 482);
        for kept in [
            "1.2.840.10008.5.1.4.1.1.2", // CT Image Storage
            "1.2.840.10008.1.2.4.50",    // JPEG baseline
            "1.2.840.10008.1.5.1",       // Hot Iron palette (well-known SOP instance)
            "1.2.840.10008.2.16.4",      // DICOM coding scheme
            "1.2.840.10008.1.2.1\0",     // padded
            "1.2.840.10008.6.1.308",     // a context group
        ] {
            assert!(r.is_registered(kept), "{kept}");
        }
        for remapped in [
            "1.2.840.10008.5.1.4.1.1.2.123456789", // an instance UID under a class UID
            "1.2.840.10008.99.1",
            "1.2.840.10008.6.1.",
            "1.2.826.0.1.3680043.10.543.1",
        ] {
            assert!(!r.is_registered(remapped), "{remapped}");
        }
    }
}
