//! scopegate: host-level least-privilege enforcement for workloads' outbound API calls.
//!
//! The kernel programs (crate `scopegate-ebpf`) pin every managed workload's TCP connects
//! to this agent's proxy. The path of one connection, composed in [`pipeline`]:
//!
//! ```text
//! accept → identify → detect → decide → forward → audit
//! ```
//!
//! Control-plane parts: [`policy`] (pure: files → one immutable snapshot → decisions),
//! [`workloads`] (cgroup paths ↔ ids), [`bpf`] (load, attach, pin, map sync).
#![deny(unsafe_code)]

pub mod policy;

pub mod accept;
pub mod admin;
pub mod audit;
pub mod bpf;
pub mod decide;
pub mod detect;
pub mod exec;
pub mod forward;
pub mod identify;
pub mod pipeline;
pub mod reflect;
pub mod run;
pub mod secrets;
pub mod sys;
pub mod tls;
pub mod watch;
pub mod workloads;
