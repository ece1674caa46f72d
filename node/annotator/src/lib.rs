//! The web annotator's server side. So far: local accounts with roles, argon2id password
//! hashes, and sessions that store only a hash of their token, with idle and absolute
//! timeouts ([`accounts`]); the HTTP service's skeleton: login, logout, the session cookie,
//! CSRF and security headers ([`server`]). The annotation routes (issue 20) are built on these
//! and on `fc-annotation`.

pub mod accounts;
pub mod server;
