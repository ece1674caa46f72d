//! The fedcurate coordinator. It never sees an image or an identifier: only the protocol's
//! schemas, aggregates and model updates.
//!
//! This first piece is the site registry's handshake as a sans-IO state machine,
//! `handle(state, site, message, now) -> actions`, tested without a network. The QUIC
//! service that drives it comes with the federation issue.

pub mod config;
pub mod net;
pub mod pki;
pub mod registry;

pub use registry::{Action, Registry};
