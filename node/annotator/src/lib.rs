//! The web annotator's server side. So far: local accounts with roles, argon2id password
//! hashes, and sessions that store only a hash of their token, with idle and absolute
//! timeouts ([`accounts`]). The HTTP service (issue 20) is built on these and on
//! `fc-annotation`.

pub mod accounts;
