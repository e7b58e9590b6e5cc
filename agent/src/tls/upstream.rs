//! Verified TLS to upstreams.
//!
//! The server name sent (SNI) and verified is always the policy's host for the destination,
//! never what the client claimed. Verification is complete (chain to a trusted root, name,
//! validity, key usage) and cannot be turned off here. A certificate failure is its own
//! error variant, [`UpstreamTlsError::BadCertificate`], so the proxy can answer 502 with the
//! reason and never send the request (or an injected credential) to an unverified peer.
#![forbid(unsafe_code)]

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

/// ALPN identifier of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN identifier of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// Where rustls-native-certs looks on Linux when `SSL_CERT_FILE`/`SSL_CERT_DIR` are unset
/// (the openssl-probe candidates), for error messages.
const SYSTEM_LOCATIONS: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/ssl/cert.pem",
    "/opt/etc/ssl/certs/ca-certificates.crt",
    "/etc/ssl/certs",
    "/etc/pki/tls/certs",
];
/// How many loader errors an error message lists.
const SHOWN_ERRORS: usize = 5;

/// Errors of upstream TLS.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    /// No usable root certificate was found on the system.
    #[error("no trusted root certificates could be loaded; tried {tried}{errors}")]
    NoSystemRoots {
        /// The files and directories tried.
        tried: String,
        /// Loader errors, if any (prefixed with "; errors: ").
        errors: String,
    },
    /// The CA bundle could not be read.
    #[error("reading CA bundle {}: {source}", path.display())]
    BundleRead {
        /// The bundle.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The CA bundle is not valid PEM.
    #[error("CA bundle {} is not valid PEM: {reason}", path.display())]
    BundleParse {
        /// The bundle.
        path: PathBuf,
        /// The parser's complaint.
        reason: String,
    },
    /// The CA bundle holds no certificate.
    #[error("CA bundle {} contains no certificate", path.display())]
    EmptyBundle {
        /// The bundle.
        path: PathBuf,
    },
    /// A certificate in the bundle cannot be a trust anchor.
    #[error("CA bundle {} certificate #{index}: {reason}", path.display())]
    BundleCertificate {
        /// The bundle.
        path: PathBuf,
        /// Its position in the bundle, from 1.
        index: usize,
        /// Why it was refused.
        reason: String,
    },
    /// The TLS configuration could not be built.
    #[error("building the upstream TLS configuration: {source}")]
    Config {
        /// The error.
        source: rustls::Error,
    },
    /// The policy host is not a valid TLS server name.
    #[error("{host:?} is not a valid TLS server name")]
    InvalidServerName {
        /// The host.
        host: String,
    },
    /// The upstream's certificate did not verify for the host.
    #[error("upstream certificate for {host} rejected: {reason}")]
    BadCertificate {
        /// The host verified against.
        host: String,
        /// Why verification failed.
        reason: String,
    },
    /// The TLS handshake failed for another reason (protocol, alert, …).
    #[error("TLS handshake with {host} failed: {source}")]
    Handshake {
        /// The host.
        host: String,
        /// The error.
        source: rustls::Error,
    },
    /// The connection failed during the handshake.
    #[error("TLS connection to {host}: {source}")]
    Io {
        /// The host.
        host: String,
        /// The error.
        source: std::io::Error,
    },
}

/// A TLS client configuration with full verification, shared by all upstream connections.
#[derive(Clone)]
pub struct UpstreamTls {
    config: Arc<ClientConfig>,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("alpn", &self.config.alpn_protocols)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Trusts the system's roots (rustls-native-certs: `SSL_CERT_FILE`/`SSL_CERT_DIR`, or
    /// the distribution's bundle). Offers ALPN `http/1.1`; see [`UpstreamTls::with_alpn`].
    pub fn system() -> Result<Self, UpstreamTlsError> {
        let loaded = rustls_native_certs::load_native_certs();
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        let roots = system_roots(loaded.certs, &errors, tried_locations())?;
        if !errors.is_empty() {
            tracing::warn!(
                errors = %errors.join("; "),
                "some system root certificates could not be loaded"
            );
        }
        Self::from_roots(roots)
    }

    /// Trusts exactly the certificates of the PEM bundle at `path`. Offers ALPN `http/1.1`.
    pub fn with_bundle(path: &Path) -> Result<Self, UpstreamTlsError> {
        let bytes = std::fs::read(path).map_err(|source| UpstreamTlsError::BundleRead {
            path: path.to_owned(),
            source,
        })?;
        let mut roots = RootCertStore::empty();
        for (i, cert) in CertificateDer::pem_slice_iter(&bytes).enumerate() {
            let cert = cert.map_err(|e| UpstreamTlsError::BundleParse {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            roots
                .add(cert)
                .map_err(|e| UpstreamTlsError::BundleCertificate {
                    path: path.to_owned(),
                    index: i + 1,
                    reason: e.to_string(),
                })?;
        }
        if roots.is_empty() {
            return Err(UpstreamTlsError::EmptyBundle {
                path: path.to_owned(),
            });
        }
        Self::from_roots(roots)
    }

    /// Trusts exactly `roots`. Offers ALPN `http/1.1`. TLS 1.2 and 1.3.
    pub fn from_roots(roots: RootCertStore) -> Result<Self, UpstreamTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|source| UpstreamTlsError::Config { source })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// The same trust, offering `protocols` by ALPN in this order (e.g.
    /// `[ALPN_H2, ALPN_HTTP1]`; empty: no ALPN). Read the negotiated protocol from
    /// `stream.get_ref().1.alpn_protocol()` after [`UpstreamTls::connect`].
    pub fn with_alpn(&self, protocols: &[&[u8]]) -> Self {
        let mut config = (*self.config).clone();
        config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        Self {
            config: Arc::new(config),
        }
    }

    /// The rustls configuration (e.g. for a hyper connector).
    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// Runs a verified TLS handshake on `stream`, sending and verifying `server_name`: the
    /// policy's host for this destination, never the client's SNI or Host. There is no
    /// timeout here; wrap the call in `tokio::time::timeout`.
    pub async fn connect(
        &self,
        stream: TcpStream,
        server_name: &str,
    ) -> Result<TlsStream<TcpStream>, UpstreamTlsError> {
        let name = ServerName::try_from(server_name.to_owned()).map_err(|_| {
            UpstreamTlsError::InvalidServerName {
                host: server_name.chars().take(80).collect(),
            }
        })?;
        TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await
            .map_err(|e| classify(server_name, e))
    }
}

/// Maps a handshake failure: certificate problems are `BadCertificate`.
fn classify(host: &str, error: std::io::Error) -> UpstreamTlsError {
    let host = host.to_owned();
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(reason)) => UpstreamTlsError::BadCertificate {
            host,
            reason: reason.to_string(),
        },
        Some(rustls::Error::NoCertificatesPresented) => UpstreamTlsError::BadCertificate {
            host,
            reason: "the server presented no certificate".into(),
        },
        Some(other) => UpstreamTlsError::Handshake {
            host,
            source: other.clone(),
        },
        None => UpstreamTlsError::Io {
            host,
            source: error,
        },
    }
}

/// What the system loader tried, for the error message.
fn tried_locations() -> String {
    let mut tried = Vec::new();
    for var in ["SSL_CERT_FILE", "SSL_CERT_DIR"] {
        if let Some(value) = std::env::var_os(var) {
            tried.push(format!("{var}={}", value.to_string_lossy()));
        }
    }
    if tried.is_empty() {
        tried.extend(SYSTEM_LOCATIONS.iter().map(|p| (*p).to_owned()));
    }
    tried.join(", ")
}

/// A root store from the system loader's certificates; an error naming `tried` if none is
/// usable.
fn system_roots(
    certs: Vec<CertificateDer<'static>>,
    errors: &[String],
    tried: String,
) -> Result<RootCertStore, UpstreamTlsError> {
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        let mut shown: Vec<&str> = errors
            .iter()
            .take(SHOWN_ERRORS)
            .map(String::as_str)
            .collect();
        let ignored_note = format!("{ignored} certificate(s) found but unusable");
        if ignored > 0 {
            shown.push(&ignored_note);
        }
        let errors = if shown.is_empty() {
            String::new()
        } else {
            format!("; errors: {}", shown.join("; "))
        };
        return Err(UpstreamTlsError::NoSystemRoots { tried, errors });
    }
    if ignored > 0 {
        tracing::warn!(added, ignored, "some system root certificates are unusable");
    }
    Ok(roots)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn no_usable_system_roots_names_the_locations() {
        let e = system_roots(Vec::new(), &[], tried_locations()).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, UpstreamTlsError::NoSystemRoots { .. }));
        assert!(
            text.contains("/etc/ssl/certs") || text.contains("SSL_CERT_"),
            "{text}"
        );
        let e = system_roots(
            vec![CertificateDer::from(vec![0x30, 0x00])],
            &["failed to read PEM from file /x/y.pem".into()],
            "/x/y.pem".into(),
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("tried /x/y.pem"), "{text}");
        assert!(
            text.contains("1 certificate(s) found but unusable"),
            "{text}"
        );
    }

    #[test]
    fn system_roots_load_here() {
        // The build machine has a CA bundle; production hosts must too.
        let tls = UpstreamTls::system().unwrap();
        assert_eq!(tls.config().alpn_protocols, [ALPN_HTTP1.to_vec()]);
        let both = tls.with_alpn(&[ALPN_H2, ALPN_HTTP1]);
        assert_eq!(both.config().alpn_protocols.len(), 2);
    }

    #[test]
    fn bundle_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = UpstreamTls::with_bundle(&missing).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "# nothing here\n").unwrap();
        let e = UpstreamTls::with_bundle(&empty).unwrap_err();
        assert!(matches!(e, UpstreamTlsError::EmptyBundle { .. }), "{e:?}");
        assert!(e.to_string().contains("empty.pem"), "{e}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = UpstreamTls::with_bundle(&garbage).unwrap_err();
        assert!(
            matches!(e, UpstreamTlsError::BundleCertificate { index: 1, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("garbage.pem"), "{e}");
    }

    #[tokio::test]
    async fn invalid_server_name_is_refused_before_any_byte() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let tls = UpstreamTls::from_roots(RootCertStore::empty()).unwrap();
        let e = tls.connect(stream, "bad name").await.unwrap_err();
        assert!(
            matches!(e, UpstreamTlsError::InvalidServerName { .. }),
            "{e:?}"
        );
    }
}
