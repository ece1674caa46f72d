//! The fedcurate coordinator. It never sees an image or an identifier: only the protocol's
//! schemas, aggregates and model updates.
//!
//! `registry` admits sites (the handshake, sans IO); `hub` is the rest of the coordinator's
//! logic (schema publication, acknowledgements, aggregate checks, federated fits), also sans
//! IO, over the SQLite `store`; `net` is the QUIC edge; `report` the consortium report; `pki`
//! the consortium CA.

pub mod config;
pub mod hub;
pub mod net;
pub mod pki;
pub mod registry;
pub mod report;
pub mod store;
pub mod training;

pub use hub::Hub;
pub use registry::{Action, Registry};
