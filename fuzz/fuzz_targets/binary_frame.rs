//! The binary frame decoders (`publish` from clients, `message` to them): any bytes decode or
//! are refused; what decodes encodes back to the same bytes.
#![no_main]

use duplex_proto::binary::{decode_message, decode_publish, encode_publish, write_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(publish) = decode_publish(data) {
        assert_eq!(
            encode_publish(publish.id, publish.channel, publish.payload),
            data,
            "a publish frame reads back as itself"
        );
    }
    if let Ok(message) = decode_message(data) {
        let mut again = Vec::new();
        write_message(&mut again, message.channel, message.offset, message.payload);
        assert_eq!(again, data, "a message frame reads back as itself");
    }
});
