//! scopegate: host-level least-privilege enforcement for workloads' outbound API calls.
//!
//! The kernel programs (crate `scopegate-ebpf`) pin every managed workload's TCP connects
//! to this agent's proxy. The path of one connection, composed in [`pipeline`]:
//!
//! ```text
//! accept → identify → detect → framing → outbound → enforce → forward → respond
//! ```
//!
//! Each request stage imports only downward: [`state`] (the shared snapshot and types),
//! [`policy`] (pure: files → one immutable snapshot → decisions), [`audit`],
//! [`workloads`] (cgroup paths ↔ ids), [`bpf`] (load, attach, pin, map sync).
#![deny(unsafe_code)]

// Below the stages: pure policy, shared state, audit, control-plane helpers.
pub mod audit;
pub mod bpf;
pub mod cut;
pub mod metrics;
pub mod policy;
pub mod resolve;
pub mod secrets;
pub mod state;
pub mod sys;
pub mod workloads;

// The request stages (their order is composed in `pipeline`).
pub mod accept;
pub mod detect;
pub mod dns;
pub mod enforce;
pub mod forward;
pub mod framing;
pub mod identify;
pub mod outbound;
pub mod reflect;
pub mod respond;
pub mod tls;

// Composition and the control plane around it.
pub mod admin;
pub mod config;
pub mod control;
pub mod exec;
pub mod exit;
#[doc(hidden)]
pub mod fuzzing;
pub mod logging;
pub mod pipeline;
pub mod release;
pub mod review;
pub mod run;
pub mod service;
pub mod watch;
