//! The fedcurate site node: ingest, de-identification, and (in later stages) curation,
//! harmonisation, statistics and export. See `ARCHITECTURE.md` for the codemap.

pub mod annotation;
pub mod batch;
pub mod config;
pub use fc_annotate;
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
