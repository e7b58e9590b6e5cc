//! The policy file format as written: serde types, no validation beyond YAML types.
//!
//! Every struct denies unknown fields, so a typo is an error, never a silently ignored
//! constraint. Validation and compilation live in `model`; the later language (mode,
//! tls, credential, rate, when, query, headers, json, ...) is added here as new optional
//! fields.

use serde::Deserialize;

/// One workload document.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Workload {
    /// The workload's name, unique across the directory.
    pub workload: String,
    /// How the kernel identifies the workload.
    pub select: Select,
    /// Allowed destinations; an empty list denies everything.
    pub egress: Vec<Destination>,
}

/// The workload's identity: exactly one of the fields must be set.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Select {
    /// A cgroup v2 path relative to the cgroup2 mount.
    pub cgroup: Option<String>,
    /// A systemd unit name.
    pub systemd_unit: Option<String>,
}

/// One allowed destination.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Destination {
    /// A DNS name or an IP literal.
    pub host: String,
    /// Kept wide so that an out-of-range port is reported by validation, with the value.
    pub port: i64,
    /// The L7 rules; a request passes if one of them allows it.
    pub rules: Vec<Rule>,
}

/// One L7 rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Rule {
    /// Rule id, unique within the workload; appears in audit records.
    pub id: String,
    /// Allowed methods, uppercase.
    pub methods: Vec<String>,
    /// Path pattern.
    pub path: String,
}
