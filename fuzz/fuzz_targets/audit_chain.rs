//! The audit chain verifier never accepts an edited chain: a chain of sealed records is
//! edited as the input says (bytes overwritten, inserted or removed at chosen places); if
//! `verify` then reports no damage, every record reads exactly as sealed.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use scopegate::audit::{
    Decision, Record,
    chain::{self, GENESIS},
    verify::{VerifyOptions, verify},
};

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

fuzz_target!(|data: &[u8]| {
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
});
