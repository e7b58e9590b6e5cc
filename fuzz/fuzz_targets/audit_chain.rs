//! The audit chain verifier never accepts an edited chain: a chain of sealed records is
//! edited as the input says (bytes overwritten, inserted or removed at chosen places); if
//! `verify` then reports no damage, every record reads exactly as sealed.
//! The property is `scopegate::fuzzing::audit_chain`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| scopegate::fuzzing::audit_chain(data));
