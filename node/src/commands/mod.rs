//! The node's commands, one module per group. Each is a thin layer over the library: it reads
//! the configuration and arguments, calls the stages, and prints what happened.

pub(crate) mod annotate;
pub(crate) mod annotator;
pub(crate) mod bench;
pub(crate) mod consortium;
pub(crate) mod curate;
pub(crate) mod data;
pub(crate) mod deid;
pub(crate) mod demo;
pub(crate) mod export;
pub(crate) mod federation;
pub(crate) mod harmonise;
pub(crate) mod network;
pub(crate) mod operate;
pub(crate) mod records;
pub(crate) mod secrets;
pub(crate) mod train;
pub(crate) mod train_demo;
pub(crate) mod users;
