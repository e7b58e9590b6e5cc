//! The fuzzing properties: one function per parser, each panicking when a property fails.
//! The cargo-fuzz targets in `fuzz/` call them with libFuzzer's inputs (`cargo xtask
//! fuzz`); the unit test below replays every committed corpus and regression input through
//! them on every `cargo test`, so an input that once crashed stays fixed without a
//! sanitizer build in CI.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a property that fails panics: that is what the fuzzer and the replay look for"
)]

use std::sync::OnceLock;

use serde_json::Value;

use crate::audit::{
    Decision, Record,
    chain::{self, GENESIS},
    verify::{VerifyOptions, verify},
};
use crate::policy::{
    Snapshot,
    canonical::{NormalizeOptions, normalize, normalize_with},
    parse_json_body,
};
use crate::tls::client_hello::{MAX_HELLO_BYTES, Parse, normalize_dns_name, parse};

/// A property: panics when `data` breaks it.
pub type Property = fn(&[u8]);

/// The targets: name (the fuzz target and its corpus directory) and property.
pub const TARGETS: [(&str, Property); 5] = [
    ("canonical_path", canonical_path),
    ("client_hello", client_hello),
    ("json_body", json_body),
    ("policy_load", policy_load),
    ("audit_chain", audit_chain),
];

/// Request-target canonicalisation: whatever a workload sends, an accepted target has one
/// canonical form that is a fixed point (normalising it again gives itself), never holds an
/// empty, `.` or `..` segment or an encoded `/` or `\`, and keeps its query verbatim.
pub fn canonical_path(data: &[u8]) {
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
}

/// The TLS ClientHello parser the SNI decision rests on: no panic on any input, a request
/// for more bytes only within the bound, and an accepted SNI is already a valid, lowercased
/// DNS name (normalising it again gives itself), never an IP literal.
pub fn client_hello(data: &[u8]) {
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
}

/// JSON bodies, two views: what the strict parser accepts, serde_json accepts too, with the
/// same value, and the exact number text the constraints read (a walk over the original
/// bytes) is the number the value holds.
pub fn json_body(data: &[u8]) {
    let Ok(body) = parse_json_body(data, Some("application/json")) else {
        return;
    };
    assert_eq!(body.raw(), data);
    let value: Value =
        serde_json::from_slice(data).expect("accepted by the strict parser, refused by serde");
    assert_eq!(&value, body.value());
    if let Value::Object(map) = body.value() {
        for (key, v) in map {
            let text = body.number_text(&[key.as_str()]);
            match v {
                Value::Number(n) => {
                    let text = text.unwrap_or_else(|| panic!("no number text at {key:?}"));
                    let parsed: Value = serde_json::from_str(text).expect("number text");
                    assert_eq!(parsed.as_f64(), n.as_f64(), "{key:?}: {text}");
                }
                _ => assert_eq!(text, None, "number text for a non-number at {key:?}"),
            }
        }
    }
}

/// Policy files written by people: any text either loads into a snapshot or fails with
/// errors, and every error that has a position points inside the file.
pub fn policy_load(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("w.yaml"), text).expect("write");
    match Snapshot::load_dir(dir.path()) {
        Ok(snapshot) => assert!(!snapshot.workloads().is_empty()),
        Err(errors) => {
            assert!(!errors.is_empty());
            // Lines as YAML counts them: `\r\n`, `\n` and a lone `\r` end a line.
            let yaml_lines: Vec<&str> = text
                .split('\n')
                .flat_map(|l| l.strip_suffix('\r').unwrap_or(l).split('\r'))
                .collect();
            let lines = yaml_lines.len();
            for e in errors.iter() {
                if let Some((line, col)) = e.position() {
                    assert!(line >= 1 && line <= lines, "{e}: line {line} of {lines}");
                    let len = yaml_lines[line - 1].chars().count();
                    assert!(col >= 1 && col <= len + 1, "{e}: col {col} of {len}");
                }
            }
        }
    }
}

/// The audit chain verifier never accepts an edited chain: a chain of sealed records is
/// edited as the input says (bytes overwritten, inserted or removed at chosen places); if
/// `verify` then reports no damage, every record reads exactly as sealed.
pub fn audit_chain(data: &[u8]) {
    let original = chain_text();
    let mut edited = original.to_vec();
    // Each 4 bytes of input: an operation, a position (2 bytes) and a byte.
    for op in data.chunks_exact(4).take(16) {
        let at = usize::from(u16::from_le_bytes([op[1], op[2]])) % (edited.len() + 1);
        match op[0] % 3 {
            0 if at < edited.len() => edited[at] = op[3],
            1 => edited.insert(at, op[3]),
            _ if at < edited.len() => {
                edited.remove(at);
            }
            _ => {}
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("audit.jsonl");
    std::fs::write(&file, &edited).expect("write");
    let report = verify(&VerifyOptions {
        files: vec![file],
        pubkey: None,
        anchors: Vec::new(),
    })
    .expect("verify runs");
    if report.ok() {
        let (before, after) = (records(original), records(&edited));
        // An intact verdict on fewer records is a truncation the file alone cannot show
        // (that is what anchors are for); what it did read must be what was sealed.
        assert!(after.len() <= before.len());
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            assert_eq!(a, b, "record {i} edited but the chain verified");
        }
    }
}

/// Five sealed records, one line each.
fn chain_text() -> &'static [u8] {
    static TEXT: OnceLock<Vec<u8>> = OnceLock::new();
    TEXT.get_or_init(|| {
        let mut out = Vec::new();
        let mut prev = GENESIS;
        for seq in 1..=5u64 {
            let mut r = Record::new("http");
            r.ts = format!("2026-12-01T10:00:0{seq}.000000Z");
            r.workload = Some(format!("w{seq}"));
            r.method = Some("GET".into());
            r.path = Some(format!("/p/{seq}"));
            r.decision = if seq % 2 == 0 {
                Decision::Deny
            } else {
                Decision::Allow
            };
            let mut line = Vec::new();
            prev = chain::seal(&mut r, seq, &prev, &mut line);
            out.extend_from_slice(&line);
        }
        out
    })
}

fn records(text: &[u8]) -> Vec<Option<chain::StoredRecord>> {
    text.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| chain::parse_line(l).ok().map(|p| p.record))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed input (`fuzz/corpus/T` and `fuzz/regressions/T`) holds its
    /// target's property.
    #[test]
    fn the_committed_corpus_and_regressions_hold() {
        let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut replayed = 0;
        for (target, property) in TARGETS {
            for kind in ["corpus", "regressions"] {
                let dir = fuzz.join(kind).join(target);
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    assert_eq!(kind, "regressions", "{}: no corpus", dir.display());
                    continue;
                };
                for entry in entries {
                    let path = entry.unwrap().path();
                    let data = std::fs::read(&path).unwrap();
                    let outcome = std::panic::catch_unwind(|| property(&data));
                    assert!(outcome.is_ok(), "{target}: {} fails", path.display());
                    replayed += 1;
                }
            }
        }
        assert!(replayed >= TARGETS.len(), "only {replayed} inputs replayed");
    }

    #[test]
    fn an_edited_chain_is_caught() {
        // Flip one byte inside the first record's path: verify must see it (the property
        // would panic if verify called the chain intact with a changed record).
        let at = chain_text().windows(3).position(|w| w == b"/p/").unwrap() + 3;
        audit_chain(&[0, (at & 0xff) as u8, (at >> 8) as u8, b'9']);
    }
}
