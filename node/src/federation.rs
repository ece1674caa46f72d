//! The federation as the node's callers name it: the client's transport and session
//! ([`fc_federation`]) beside the site's stages ([`crate::site`]).

pub use crate::site::{aggregate, approval, privacy};
pub use fc_federation::{
    ConnectError, Link, TcpLink, client_config, client_tls, connect, connect_tcp, request, secure,
};

/// The session, with the site that drives it.
pub mod session {
    pub use crate::site::Site;
    pub use fc_federation::session::{
        CONNECT_TIMEOUT, MODEL_MIN_SITES, REQUEST_TIMEOUT, SessionError, SessionState, SyncOutcome,
        backoff, model_refusal,
    };
}
