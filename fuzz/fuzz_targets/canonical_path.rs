//! Request-target canonicalisation: whatever a workload sends, an accepted target has one
//! canonical form that is a fixed point (normalising it again gives itself), never holds an
//! empty, `.` or `..` segment or an encoded `/` or `\`, and keeps its query verbatim.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scopegate::policy::canonical::{NormalizeOptions, normalize, normalize_with};

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    for options in [
        NormalizeOptions::default(),
        NormalizeOptions {
            allow_semicolon: true,
        },
    ] {
        let Ok(canon) = normalize_with(target, options) else {
            continue;
        };
        let path = canon.path();
        assert!(path.starts_with('/'), "{target:?} → {path:?}");
        assert!(!path.contains("//"), "{target:?} → {path:?}");
        for segment in path.split('/').skip(1) {
            assert!(segment != "." && segment != "..", "{target:?} → {path:?}");
        }
        let upper = path.to_ascii_uppercase();
        assert!(
            !upper.contains("%2F") && !upper.contains("%5C") && !path.contains('\\'),
            "{target:?} → {path:?}"
        );
        assert!(
            !upper.contains("%2E"),
            "dot-segments are decoded: {target:?} → {path:?}"
        );
        let again = normalize_with(&canon.as_request_target(), options)
            .unwrap_or_else(|e| panic!("{target:?} → {canon:?} is not accepted again: {e}"));
        assert_eq!(again, canon, "not a fixed point: {target:?}");
        // The query is kept verbatim.
        assert_eq!(canon.query(), target.split_once('?').map(|(_, q)| q));
        if !options.allow_semicolon {
            assert!(!path.contains(';'));
        }
    }
    // The default is the strict options.
    assert_eq!(
        normalize(target).ok(),
        normalize_with(target, NormalizeOptions::default()).ok()
    );
});
