//! Policy files written by people: any text either loads into a snapshot or fails with
//! errors, and every error that has a position points inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scopegate::policy::Snapshot;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("w.yaml"), text).expect("write");
    match Snapshot::load_dir(dir.path()) {
        Ok(snapshot) => assert!(!snapshot.workloads().is_empty()),
        Err(errors) => {
            assert!(errors.len() > 0);
            let lines = text.split('\n').count();
            for e in errors.iter() {
                if let Some((line, col)) = e.position() {
                    assert!(line >= 1 && line <= lines, "{e}: line {line} of {lines}");
                    let len = text
                        .split('\n')
                        .nth(line - 1)
                        .map_or(0, |l| l.chars().count());
                    assert!(col >= 1 && col <= len + 1, "{e}: col {col} of {len}");
                }
            }
        }
    }
});
