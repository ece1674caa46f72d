//! The fedcurate site node: ingest, de-identification, and (in later stages) curation,
//! harmonisation, statistics and export. See `ARCHITECTURE.md` for the codemap.

pub mod audit;
pub mod batch;
pub mod bench;
pub mod catalog;
pub mod config;
pub mod curate;
pub mod deid;
pub mod dimse;
pub mod export;
pub mod federation;
pub mod fuzzing;
pub mod harmonise;
pub mod health;
pub mod pki;
pub mod purge;
pub mod read;
pub mod sample;
pub mod vault;
pub mod volume;
