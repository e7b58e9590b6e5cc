//! Policy files written by people: any text either loads into a snapshot or fails with
//! errors, and every error that has a position points inside the file.
//! The property is `scopegate::fuzzing::policy_load`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| scopegate::fuzzing::policy_load(data));
