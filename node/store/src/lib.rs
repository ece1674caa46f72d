//! The node's store: the catalog (`catalog.sqlite`: inputs, runs, quarantine, the
//! re-identification map, the audit chain, harmonised provenance, the egress log and the
//! privacy ledger), the vault's sealing of original identities, and the audit chain's MACs.
//! All SQL of the node is here.

pub mod audit;
pub mod catalog;
pub mod vault;
