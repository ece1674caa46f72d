//! Harness body for fuzzing the wire decoder (the fuzz crate `node/fuzz` and a plain-test
//! replay of its regression inputs call it): any bytes decode or fail with a typed error, never
//! panic, and whatever decodes encodes back to a frame that decodes to the same message.

/// The frame decoder on arbitrary bytes.
pub fn decode_frame(data: &[u8]) {
    if let Ok((message, used)) = crate::decode_frame(data) {
        assert!(used <= data.len(), "a frame longer than its bytes");
        let frame = match crate::encode_frame(&message) {
            Ok(f) => f,
            Err(e) => panic!("a decoded message does not encode: {e}"),
        };
        match crate::decode_frame(&frame) {
            Ok((again, _)) => assert_eq!(again, message, "re-encoding changes the message"),
            Err(e) => panic!("a re-encoded frame does not decode: {e}"),
        }
    }
}
