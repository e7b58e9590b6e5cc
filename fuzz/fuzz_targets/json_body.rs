//! JSON bodies, two views: what the strict parser accepts, serde_json accepts too, with the
//! same value, and the exact number text the constraints read (a walk over the original
//! bytes) is the number the value holds.
//! The property is `scopegate::fuzzing::json_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| scopegate::fuzzing::json_body(data));
