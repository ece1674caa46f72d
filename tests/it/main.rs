//! Whole-system tests: one binary, in process. De-identification end to end on generated
//! archives (options, determinism, references, anonymisation, IOD validity, pixel data, a
//! real third-party reader), the handshake across protocol and coordinator, and the
//! federation: three sites and a coordinator on loopback.

mod annotate;
mod codecs;
mod curate;
mod deid;
mod federation;
mod handshake;
mod harmonise;
mod layout;
mod messy;
mod pki;
mod quic;
mod secure;
mod volume;
