//! TLS: ClientHello parsing, the host CA for interception, verified upstream TLS.
//!
//! These are the self-contained building blocks; the pipeline composes them. For a
//! connection that [`crate::detect`] classified as TLS:
//!
//! ```text
//! detect: Tls
//!   └─ client_hello::read_client_hello   peek (never consume) until the hello is parsed;
//!        │                               invalid, stalled or too large → deny
//!        │  sni: None → deny (no SNI, no decision)
//!        │  sni ≠ the policy host of the original destination → deny
//!        ├─ passthrough (tls: passthrough)
//!        │     the SNI is the decision; splice the untouched bytes to the upstream
//!        └─ intercept (tls: intercept)
//!              ca::LeafCache::server_config(sni)   only for an SNI policy allows
//!              terminate with tokio-rustls (ALPN: h2 and/or http/1.1, as the proxy serves)
//!              serve HTTP/1.1 or h2 (hyper-util auto), decide every request
//!              upstream::UpstreamTls::connect(tcp, policy_host)   full verification;
//!                  BadCertificate → 502 with the reason, nothing (no credential) sent
//! ```
//!
//! - [`client_hello`]: a parser for attacker-controlled bytes, robust to a hello split
//!   across TCP segments and across TLS records, capped at 64 KiB.
//! - [`ca`]: the host CA (`ca.crt` 0644, `ca.key` 0600 in the state directory, created at
//!   first start) and a bounded cache of short-lived leaves with a per-name server
//!   configuration that serves only that name.
//! - [`upstream`]: a verifying TLS client (system roots or a PEM bundle) whose SNI is the
//!   policy's host, never the client's.
#![forbid(unsafe_code)]

pub mod ca;
pub mod client_hello;
pub mod upstream;

pub use ca::{CaError, HostCa, LeafCache};
pub use client_hello::{ClientHello, HelloError, Parse, parse, read_client_hello};
pub use upstream::{UpstreamTls, UpstreamTlsError};
