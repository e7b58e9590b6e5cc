//! The TLS ClientHello parser the SNI decision rests on: no panic on any input, a request
//! for more bytes only within the bound, and an accepted SNI is already a valid, lowercased
//! DNS name (normalising it again gives itself), never an IP literal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scopegate::tls::client_hello::{MAX_HELLO_BYTES, Parse, normalize_dns_name, parse};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Parse::NeedMore { at_least } => {
            assert!(at_least > data.len(), "asks for bytes it has: {at_least}");
            assert!(at_least <= MAX_HELLO_BYTES, "unbounded: {at_least}");
        }
        Parse::Invalid(_) => {}
        Parse::Hello(hello) => {
            assert!(hello.record_bytes <= data.len());
            if let Some(sni) = &hello.sni {
                assert_eq!(normalize_dns_name(sni).ok().as_deref(), Some(sni.as_str()));
                assert!(sni.parse::<std::net::IpAddr>().is_err(), "{sni}");
            }
            // Bytes after the hello's records do not change what was parsed.
            let prefix = &data[..hello.record_bytes];
            match parse(prefix) {
                Parse::Hello(again) => assert_eq!(again.sni, hello.sni),
                other => panic!("the hello's own records parse differently: {other:?}"),
            }
        }
    }
});
