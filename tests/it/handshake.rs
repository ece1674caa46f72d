//! A node's hello, framed by `protocol`, handled by the coordinator's registry, answered
//! through the same framing.

use coordinator::{Action, Registry};
use protocol::{Hello, Message, MessageId, PROTOCOL_VERSION, SiteId, decode_frame, encode_frame};

#[test]
fn a_framed_hello_is_welcomed_and_a_stranger_is_refused() {
    let a = SiteId::new("site-a").expect("valid");
    let mut registry = Registry::new([a.clone()], None);
    let hello = Message::Hello(Hello {
        id: MessageId(42),
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        site: a.clone(),
        schema: None,
    });
    let frame = encode_frame(&hello).expect("encode");
    let (received, _) = decode_frame(&frame).expect("decode");
    let actions = registry.handle(&a, received, 1);
    let Some(Action::Reply(reply)) = actions.first() else {
        panic!("no reply: {actions:?}");
    };
    let (back, _) = decode_frame(&encode_frame(reply).expect("encode")).expect("decode");
    assert!(matches!(back, Message::Welcome(w) if w.reply_to == MessageId(42)));

    let b = SiteId::new("site-b").expect("valid");
    let actions = registry.handle(
        &b,
        Message::Hello(Hello {
            id: MessageId(1),
            min_version: 1,
            max_version: 1,
            site: b.clone(),
            schema: None,
        }),
        2,
    );
    assert!(actions.contains(&Action::Close));
}
