//! Fuzz the frame decoder: any bytes must decode or fail with a typed error, never panic, and
//! whatever decodes must encode back to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((message, used)) = protocol::decode_frame(data) {
        assert!(used <= data.len());
        let frame = protocol::encode_frame(&message).expect("a decoded message encodes");
        let (again, _) = protocol::decode_frame(&frame).expect("and decodes again");
        assert_eq!(again, message);
    }
});
