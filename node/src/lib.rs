//! The fedcurate site node: ingest, de-identification, and (in later stages) curation,
//! harmonisation, statistics and export. See `ARCHITECTURE.md` for the codemap.

pub mod batch;
pub mod config;
pub use fc_annotate;
/// The site's annotation workflow, and how the node opens it from its configuration.
pub mod annotation {
    pub use fc_annotation::*;

    /// Open the annotation workspace of the node configured by `config`, reading cases from
    /// `deid_dir`.
    pub fn open(
        config: &crate::config::NodeConfig,
        deid_dir: std::path::PathBuf,
    ) -> Result<Annotations, AnnotationError> {
        let audit_key = config
            .audit_key()
            .map_err(|e| AnnotationError::Config(e.to_string()))?;
        let secret = config
            .deid
            .secret(&config.data_dir, false)
            .map_err(|e| AnnotationError::Config(e.to_string()))?;
        Annotations::open(
            &config.data_dir,
            deid_dir,
            audit_key,
            fc_deid::keys::Keys::derive(&secret).tokens(),
        )
    }
}
pub use fc_curate as curate;
pub use fc_deid as deid;
pub use fc_dimse as dimse;
pub use fc_export as export;
pub mod federation;
pub use fc_harmonise as harmonise;
pub mod health;
pub mod pki;
pub mod purge;
pub mod site;
pub use fc_fixtures as sample;
pub use fc_read as read;
pub use fc_store::{audit, catalog, vault};
pub use fc_volume as volume;
