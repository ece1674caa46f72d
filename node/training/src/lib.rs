//! Federated training at the site.
//!
//! A training job (PyTorch, MONAI, nnU-Net, or the numpy example) runs next to the node and
//! talks only to it, over a Unix-domain socket whose callers are authorised by their peer
//! credentials ([`api`]): it waits for the round's global model, downloads it, and uploads its
//! update with its sample count. The trainer never holds the site's certificate, its secret or
//! a path to the coordinator.
//!
//! The node ([`agent`]) fetches the job the coordinator publishes, holds it for hospital IT's
//! approval ([`approval`]), checks each update against the job's layout and bounds, clips and
//! noises it under differential privacy (spending the site's budget in the privacy ledger,
//! [`accountant`]), encodes it in fixed point and masks it under secure aggregation
//! ([`encode`]), and sends it as content-hashed chunks that resume after a restart of either
//! side.

pub mod accountant;
pub mod agent;
pub mod api;
pub mod approval;
pub mod client;
pub mod encode;
pub mod settings;

pub use settings::TrainingSettings;
