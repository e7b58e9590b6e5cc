//! TLS: ClientHello parsing, the host CA for interception, verified upstream TLS.
#![forbid(unsafe_code)]
