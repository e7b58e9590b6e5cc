//! The hash chain: canonical bytes, sealing a record into a line, and parsing a line back.
//!
//! # Canonical bytes and the line format
//!
//! A record's *canonical bytes* are the compact `serde_json` serialisation of the record
//! **without** its `hash` field: one JSON object, no whitespace, fields in the fixed order
//! of [`super::Record`] (`seq, ts, host, workload, cgroup, pid, uid, exe, dst{host,
//! ip, port}, proto, method, path, rule, decision, reason, origin, status, bytes_up,
//! bytes_down, latency_us, request_id`, then the optional `checkpoint`, `count`,
//! `truncated_bytes`, `error_kind`, `version`, `clean`, `policy_hash`, `trigger`, `errors`,
//! `clock_step_us`, `outcome_of`, `cgroup_id` and `dns` only when present, then `prev`). Absent optional values of the core
//! fields are written as `null`; strings use serde_json's escaping (UTF-8, only `"`, `\`
//! and control characters escaped).
//!
//! The record's hash is
//!
//! ```text
//! hash = SHA-256( prev_bytes || canonical_bytes )
//! ```
//!
//! where `prev_bytes` are the 32 raw bytes of the previous record's hash (the hex string in
//! `prev`, decoded). The first record of a brand-new chain has `prev` = 64 `0` characters.
//! `hash` and `prev` are lowercase hex.
//!
//! The stored line is the canonical bytes with the closing `}` replaced by
//! `,"hash":"<64 hex>"}`, followed by `\n`. So a verifier never has to re-serialise: the
//! canonical bytes of a stored line are the line minus its last 75 bytes
//! (`,"hash":"` + 64 hex + `"}`) plus `}`. Any change to any byte of a line changes either
//! the canonical bytes or the stated hash, and so breaks the check.
//!
//! The chain continues across agent restarts and file rotation: each record's `prev` is
//! the hash of the record written just before it, wherever that one is stored, and `seq`
//! increases by exactly one per record.
#![forbid(unsafe_code)]

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Checkpoint, Decision, Dst, Fault, Record};

/// A SHA-256 chain hash (serialised as 64 lowercase hex characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChainHash(pub [u8; 32]);

/// The `prev` of the first record of a brand-new chain.
pub const GENESIS: ChainHash = ChainHash([0; 32]);

/// Length of the stored suffix `,"hash":"<64 hex>"}`.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;
const HASH_SUFFIX_HEAD: &[u8] = b",\"hash\":\"";

impl ChainHash {
    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }

    fn hex_bytes(&self) -> [u8; 64] {
        let mut buf = [0u8; 64];
        // Cannot fail: the buffer is exactly twice the input.
        let _ = hex::encode_to_slice(self.0, &mut buf);
        buf
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

impl Serialize for ChainHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let buf = self.hex_bytes();
        // Hex digits are ASCII.
        serializer.serialize_str(std::str::from_utf8(&buf).unwrap_or_default())
    }
}

impl<'de> Deserialize<'de> for ChainHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(serde::de::Error::custom(
                "expected 64 lowercase hex characters",
            ));
        }
        Self::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("expected 64 lowercase hex characters"))
    }
}

/// Appends the canonical bytes of `record` (as it is: `seq` and `prev` included, no
/// `hash`) to `out`.
pub fn canonical_bytes(record: &Record, out: &mut Vec<u8>) {
    // Serialising a struct of strings, numbers and options into a Vec cannot fail.
    if let Err(e) = serde_json::to_writer(&mut *out, record) {
        tracing::error!(error = %e, "serialising an audit record failed");
    }
}

/// The hash of a record whose canonical bytes are `canonical`, following `prev`.
pub fn chain_hash(prev: &ChainHash, canonical: &[u8]) -> ChainHash {
    let mut hasher = Sha256::new();
    hasher.update(prev.0);
    hasher.update(canonical);
    ChainHash(hasher.finalize().into())
}

/// Seals `record` as number `seq` after `prev`: sets its `seq` and `prev`, appends its
/// stored line (with `hash` and the trailing newline) to `out`, and returns its hash.
pub fn seal(record: &mut Record, seq: u64, prev: &ChainHash, out: &mut Vec<u8>) -> ChainHash {
    record.seq = seq;
    record.prev = *prev;
    let start = out.len();
    canonical_bytes(record, out);
    let hash = chain_hash(prev, &out[start..]);
    // Replace the closing brace by `,"hash":"…"}`.
    out.pop();
    out.extend_from_slice(HASH_SUFFIX_HEAD);
    out.extend_from_slice(&hash.hex_bytes());
    out.extend_from_slice(b"\"}\n");
    hash
}

/// A record as stored (owned; what `verify`, `query` and `tail` read).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// Sequence number.
    pub seq: u64,
    /// Timestamp, RFC 3339 UTC.
    pub ts: String,
    /// Host name.
    pub host: String,
    /// Workload.
    pub workload: Option<String>,
    /// cgroup path.
    pub cgroup: Option<String>,
    /// Process id.
    pub pid: Option<u32>,
    /// uid.
    pub uid: Option<u32>,
    /// Executable path.
    #[serde(default)]
    pub exe: Option<String>,
    /// Destination.
    pub dst: Dst,
    /// Protocol.
    pub proto: String,
    /// HTTP method.
    pub method: Option<String>,
    /// Path.
    pub path: Option<String>,
    /// Rule id.
    pub rule: Option<String>,
    /// Decision.
    pub decision: Decision,
    /// Reason code.
    pub reason: Option<String>,
    /// Fault origin.
    pub origin: Option<Fault>,
    /// HTTP status.
    pub status: Option<u16>,
    /// Bytes sent upstream.
    pub bytes_up: Option<u64>,
    /// Bytes returned.
    pub bytes_down: Option<u64>,
    /// Latency, µs.
    pub latency_us: Option<u64>,
    /// Request id.
    pub request_id: Option<String>,
    /// Signed checkpoint, on checkpoint records.
    #[serde(default)]
    pub checkpoint: Option<Checkpoint>,
    /// Number of decisions a summary record stands for.
    #[serde(default)]
    pub count: Option<u64>,
    /// Bytes removed by torn-tail recovery.
    #[serde(default)]
    pub truncated_bytes: Option<u64>,
    /// The parser's error kind, on `malformed_request` records.
    #[serde(default)]
    pub error_kind: Option<String>,
    /// Agent version, on `agent_started` records.
    #[serde(default)]
    pub version: Option<String>,
    /// Whether the previous run ended cleanly, on `agent_started` records.
    #[serde(default)]
    pub clean: Option<bool>,
    /// Policy hash, on `agent_started`, `policy_reloaded` and `policy_rejected` records.
    #[serde(default)]
    pub policy_hash: Option<String>,
    /// What caused a lifecycle record.
    #[serde(default)]
    pub trigger: Option<String>,
    /// Policy errors, on `policy_rejected` records.
    #[serde(default)]
    pub errors: Option<Vec<String>>,
    /// Wall-clock step beyond the monotonic clock, µs, on `clock_step` records.
    #[serde(default)]
    pub clock_step_us: Option<i64>,
    /// On outcome records: the `seq` of the decision record they complete.
    #[serde(default)]
    pub outcome_of: Option<u64>,
    /// cgroup id, on `cgroup_held` and `cgroup_released` records.
    #[serde(default)]
    pub cgroup_id: Option<u64>,
    /// The DNS question and answer, on `proto: "dns"` records.
    #[serde(default)]
    pub dns: Option<super::DnsQuery>,
    /// The nearest rule, on denials by a rule's check.
    #[serde(default)]
    pub nearest_rule: Option<String>,
    /// The query's parameter names, on HTTP decision records of a request with a query.
    #[serde(default)]
    pub query_names: Option<Vec<String>>,
    /// Whether `query_names` is incomplete.
    #[serde(default)]
    pub query_names_clipped: Option<bool>,
    /// Hash of the previous record.
    pub prev: ChainHash,
    /// Hash of this record.
    pub hash: ChainHash,
}

impl StoredRecord {
    /// Whether this record is a decision (every record but the outcome records, which
    /// complete a decision recorded before: see [`super::Record::outcome_of`]).
    pub fn is_decision(&self) -> bool {
        self.outcome_of.is_none()
    }

    /// Whether this is a `recovered_truncation` record written at agent start.
    pub fn is_recovered_truncation(&self) -> bool {
        self.is_audit(RECOVERED_TRUNCATION)
    }

    /// Whether this is a record of the audit subsystem (`proto: "audit"`) with this reason.
    pub fn is_audit(&self, reason: &str) -> bool {
        self.proto == "audit" && self.reason.as_deref() == Some(reason)
    }
}

/// Reason code of the record written after a torn tail was cut away at start.
pub const RECOVERED_TRUNCATION: &str = "recovered_truncation";

/// One parsed line.
#[derive(Clone, Debug)]
pub struct ParsedLine {
    /// The record.
    pub record: StoredRecord,
    /// The hash recomputed from the line's canonical bytes and its `prev`.
    pub computed: ChainHash,
}

impl ParsedLine {
    /// Whether the stated hash matches the content.
    pub fn intact(&self) -> bool {
        self.computed == self.record.hash
    }
}

/// Why a line is not a record.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// Not JSON, or not a record.
    #[error("not a valid audit record: {0}")]
    Json(#[from] serde_json::Error),
    /// Valid JSON, but the line does not end in the sealed `"hash"` field.
    #[error("the line does not end with a \"hash\" field")]
    NoHashSuffix,
}

/// Parses one stored line (without its trailing newline) and recomputes its hash.
pub fn parse_line(line: &[u8]) -> Result<ParsedLine, LineError> {
    let record: StoredRecord = serde_json::from_slice(line)?;
    let n = line.len();
    if n < HASH_SUFFIX_LEN + 1
        || !line[n - HASH_SUFFIX_LEN..].starts_with(HASH_SUFFIX_HEAD)
        || !line.ends_with(b"\"}")
    {
        return Err(LineError::NoHashSuffix);
    }
    let mut hasher = Sha256::new();
    hasher.update(record.prev.0);
    hasher.update(&line[..n - HASH_SUFFIX_LEN]);
    hasher.update(b"}");
    let computed = ChainHash(hasher.finalize().into());
    Ok(ParsedLine { record, computed })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn sealed_line_parses_back_and_hash_covers_prefix() {
        let mut r = Record::new("http");
        r.workload = Some("billing \"quoted\" ünïcode".into());
        let mut out = Vec::new();
        let h1 = seal(&mut r, 1, &GENESIS, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let line = &out[..out.len() - 1];
        let parsed = parse_line(line).unwrap();
        assert!(parsed.intact());
        assert_eq!(parsed.record.hash, h1);
        assert_eq!(parsed.record.prev, GENESIS);
        assert_eq!(parsed.record.seq, 1);
        // The canonical bytes are exactly the serialisation without `hash`.
        let mut canon = Vec::new();
        canonical_bytes(&r, &mut canon);
        assert_eq!(chain_hash(&GENESIS, &canon), h1);
        assert!(line.starts_with(&canon[..canon.len() - 1]));
        // Chained: the next record's prev is h1.
        let mut r2 = Record::new("tcp");
        let mut out2 = Vec::new();
        let h2 = seal(&mut r2, 2, &h1, &mut out2);
        let p2 = parse_line(&out2[..out2.len() - 1]).unwrap();
        assert_eq!(p2.record.prev, h1);
        assert_eq!(p2.record.hash, h2);
        assert!(p2.intact());
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let mut r = Record::new("http");
        r.path = Some("/v1/charges".into());
        let mut out = Vec::new();
        seal(&mut r, 7, &GENESIS, &mut out);
        let line = &out[..out.len() - 1];
        for i in 0..line.len() {
            let mut bad = line.to_vec();
            bad[i] ^= 0x01;
            if let Ok(p) = parse_line(&bad) {
                assert!(
                    !p.intact(),
                    "flip at {i} undetected: {}",
                    String::from_utf8_lossy(&bad)
                );
            }
        }
    }

    #[test]
    fn field_order_is_fixed() {
        let mut r = Record::new("http");
        let mut out = Vec::new();
        seal(&mut r, 1, &GENESIS, &mut out);
        let s = String::from_utf8(out).unwrap();
        let keys = [
            "\"seq\"",
            "\"ts\"",
            "\"host\"",
            "\"workload\"",
            "\"cgroup\"",
            "\"pid\"",
            "\"uid\"",
            "\"exe\"",
            "\"dst\"",
            "\"proto\"",
            "\"method\"",
            "\"path\"",
            "\"rule\"",
            "\"decision\"",
            "\"reason\"",
            "\"origin\"",
            "\"status\"",
            "\"bytes_up\"",
            "\"bytes_down\"",
            "\"latency_us\"",
            "\"request_id\"",
            "\"prev\"",
            "\"hash\"",
        ];
        let mut last = 0;
        for k in keys {
            let at = s.find(k).unwrap();
            assert!(at >= last, "{k} out of order in {s}");
            last = at;
        }
        assert!(!s.contains("\"checkpoint\""));
    }
}
