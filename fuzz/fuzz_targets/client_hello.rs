//! The TLS ClientHello parser the SNI decision rests on: no panic on any input, a request
//! for more bytes only within the bound, and an accepted SNI is already a valid, lowercased
//! DNS name (normalising it again gives itself), never an IP literal.
//! The property is `scopegate::fuzzing::client_hello`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| scopegate::fuzzing::client_hello(data));
