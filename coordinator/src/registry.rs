//! Site registry: which sites belong to the consortium, which are connected, and the
//! handshake that admits them.

use std::collections::BTreeMap;

use protocol::{
    HandshakeReject, Hello, Message, MessageId, PROTOCOL_VERSION, SchemaHash, SiteId, Welcome,
};

/// What the caller (the network edge) must do after a message was handled.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send this message back on the connection it came from.
    Reply(Message),
    /// Close the connection after the reply.
    Close,
}

/// State of one registered site.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteState {
    /// Connections of this site currently welcomed (a reconnecting site is welcomed before its
    /// old connection has timed out, so there can briefly be two).
    pub connections: u32,
    /// Seconds since the epoch of the last message from the site.
    pub last_contact: Option<u64>,
    /// Schema the site reported following.
    pub schema: Option<SchemaHash>,
}

/// The registry.
#[derive(Debug)]
pub struct Registry {
    sites: BTreeMap<SiteId, SiteState>,
    schema: Option<SchemaHash>,
    next_id: u64,
}

impl Registry {
    /// A registry of the given sites, publishing `schema`.
    pub fn new(sites: impl IntoIterator<Item = SiteId>, schema: Option<SchemaHash>) -> Self {
        Registry {
            sites: sites
                .into_iter()
                .map(|s| (s, SiteState::default()))
                .collect(),
            schema,
            next_id: 1,
        }
    }

    /// The state of a site, if registered.
    pub fn site(&self, site: &SiteId) -> Option<&SiteState> {
        self.sites.get(site)
    }

    fn id(&mut self) -> MessageId {
        let id = MessageId(self.next_id);
        self.next_id += 1;
        id
    }

    fn reject(&mut self, reply_to: MessageId, reason: HandshakeReject) -> Vec<Action> {
        let id = self.id();
        vec![
            Action::Reply(Message::Reject {
                id,
                reply_to,
                reason,
            }),
            Action::Close,
        ]
    }

    /// Handle a message from the connection authenticated as `peer` (the site named in its
    /// certificate) at time `now`.
    pub fn handle(&mut self, peer: &SiteId, message: Message, now: u64) -> Vec<Action> {
        match message {
            Message::Hello(hello) => self.hello(peer, hello, now),
            // A coordinator never receives its own kinds of message; refuse and close.
            _ => vec![Action::Close],
        }
    }

    fn hello(&mut self, peer: &SiteId, hello: Hello, now: u64) -> Vec<Action> {
        // The site named inside the message must be the authenticated one.
        if &hello.site != peer || !self.sites.contains_key(peer) {
            return self.reject(hello.id, HandshakeReject::UnknownSite);
        }
        if hello.min_version > PROTOCOL_VERSION || hello.max_version < PROTOCOL_VERSION {
            return self.reject(
                hello.id,
                HandshakeReject::UnsupportedVersion {
                    min_version: PROTOCOL_VERSION,
                    max_version: PROTOCOL_VERSION,
                },
            );
        }
        // A site whose certificate proves it is welcomed again on a new connection (its old
        // one may not have timed out yet), so a reconnect never waits for the coordinator.
        let state = self.sites.entry(peer.clone()).or_default();
        state.last_contact = Some(now);
        state.schema = hello.schema;
        let id = self.id();
        vec![Action::Reply(Message::Welcome(Welcome {
            id,
            reply_to: hello.id,
            version: PROTOCOL_VERSION,
            schema: self.schema,
            round: 0,
            model: 0,
        }))]
    }

    /// A connection of `peer` was welcomed.
    pub fn connected(&mut self, peer: &SiteId) {
        if let Some(s) = self.sites.get_mut(peer) {
            s.connections += 1;
        }
    }

    /// A welcomed connection of `peer` ended.
    pub fn disconnected(&mut self, peer: &SiteId) {
        if let Some(s) = self.sites.get_mut(peer) {
            s.connections = s.connections.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(s: &str) -> SiteId {
        SiteId::new(s).expect("valid")
    }

    fn hello(id: u64, s: &str, min: u16, max: u16) -> Message {
        Message::Hello(Hello {
            id: MessageId(id),
            min_version: min,
            max_version: max,
            site: site(s),
            schema: None,
        })
    }

    fn check(reg: &mut Registry, peer: &str, msg: Message, expect: &str) {
        let actions = reg.handle(&site(peer), msg, 100);
        let got = match actions.first() {
            Some(Action::Reply(Message::Welcome(_))) => "welcome".to_owned(),
            Some(Action::Reply(Message::Reject { reason, .. })) => format!("{reason:?}"),
            Some(Action::Close) => "close".to_owned(),
            other => format!("{other:?}"),
        };
        assert!(
            got.starts_with(expect),
            "{peer}: got {got}, expected {expect}"
        );
    }

    #[test]
    fn handshake_cases() {
        let schema = Some(SchemaHash([7; 32]));
        let mut reg = Registry::new([site("site-a"), site("site-b")], schema);
        check(&mut reg, "site-a", hello(1, "site-a", 1, 1), "welcome");
        reg.connected(&site("site-a"));
        assert!(
            reg.site(&site("site-a"))
                .is_some_and(|s| s.connections == 1 && s.last_contact == Some(100))
        );
        // A reconnecting site is welcomed while its old connection lingers.
        check(&mut reg, "site-a", hello(2, "site-a", 1, 1), "welcome");
        reg.connected(&site("site-a"));
        reg.disconnected(&site("site-a"));
        assert!(
            reg.site(&site("site-a"))
                .is_some_and(|s| s.connections == 1)
        );
        // Unknown, impersonating and version-incompatible sites are refused.
        check(&mut reg, "site-z", hello(1, "site-z", 1, 1), "UnknownSite");
        check(&mut reg, "site-b", hello(1, "site-a", 1, 1), "UnknownSite");
        check(
            &mut reg,
            "site-b",
            hello(1, "site-b", 2, 3),
            "UnsupportedVersion",
        );
        // A node never sends Welcome.
        let w = Message::Welcome(Welcome {
            id: MessageId(1),
            reply_to: MessageId(1),
            version: 1,
            schema: None,
            round: 0,
            model: 0,
        });
        check(&mut reg, "site-b", w, "close");
    }
}
