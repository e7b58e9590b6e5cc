//! Request-target canonicalisation: whatever a workload sends, an accepted target has one
//! canonical form that is a fixed point (normalising it again gives itself), never holds an
//! empty, `.` or `..` segment or an encoded `/` or `\`, and keeps its query verbatim.
//! The property is `scopegate::fuzzing::canonical_path`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| scopegate::fuzzing::canonical_path(data));
