//! The web annotator's server side: local accounts with roles, argon2id password hashes and
//! sessions that store only a hash of their token ([`accounts`]); the HTTP service with its
//! defences ([`server`]); the annotation routes on `fc-annotation` ([`api`]); the screens, the
//! viewer and the about page ([`web`]); the listener, plain on loopback or TLS ([`listen`]);
//! and the `[annotator]` settings ([`settings`]).

pub mod accounts;
pub mod api;
pub mod listen;
pub mod server;
pub mod settings;
pub mod web;
