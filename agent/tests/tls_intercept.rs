//! In-process TLS interception and upstream verification, on 127.0.0.1 without root.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::panic, missing_docs, reason = "tests")]

use std::{
    convert::Infallible, os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore, ServerConfig, pki_types::ServerName};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use scopegate::tls::{
    CaError, HostCa, LeafCache, UpstreamTls, UpstreamTlsError, read_client_hello,
    upstream::{ALPN_H2, ALPN_HTTP1},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const ALLOWED: &str = "api.test.example";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(roots: RootCertStore, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn trusting(ca: &CertificateDer<'static>) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    roots
}

/// An interception server as the pipeline will run it: peek the hello, allow only
/// `ALLOWED`, take the server configuration for that name, terminate, serve HTTP/1.1.
async fn intercepting_server(cache: Arc<LeafCache>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let cache = cache.clone();
            tokio::spawn(async move {
                let Ok(hello) = read_client_hello(&stream, Duration::from_secs(5)).await else {
                    return;
                };
                // The policy decision, stubbed: only ALLOWED reaches the cache.
                let Some(sni) = hello.sni.filter(|s| s == ALLOWED) else {
                    return;
                };
                let config = cache.server_config(&sni).unwrap();
                let Ok(tls) = TlsAcceptor::from(config).accept(stream).await else {
                    return;
                };
                let service = service_fn(move |req: Request<Incoming>| {
                    let sni = sni.clone();
                    async move {
                        let body = format!("{} {} via {sni}", req.method(), req.uri().path());
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// A server that always uses the configuration minted for `ALLOWED`, whatever the SNI:
/// its certificate resolver must refuse other names by itself.
async fn fixed_config_server(config: Arc<ServerConfig>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = TlsAcceptor::from(config.clone());
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(stream).await {
                    let _ = tls.write_all(b"hello\n").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn intercepts_an_allowed_name_with_a_leaf_from_the_host_ca() {
    let state = tempfile::tempdir().unwrap();
    let ca = Arc::new(HostCa::load_or_create(state.path(), None).unwrap());
    let cache = Arc::new(LeafCache::new(ca.clone(), 16, &[ALPN_H2, ALPN_HTTP1]));
    let addr = intercepting_server(cache.clone()).await;

    // A workload trusting only the host CA, speaking HTTP/1.1.
    let connector = TlsConnector::from(client_config(trusting(ca.cert_der()), &[ALPN_HTTP1]));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from(ALLOWED).unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_HTTP1));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            Request::get("/v1/customers/42")
                .header("host", ALLOWED)
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"GET /v1/customers/42 via api.test.example");

    // A client offering h2 gets h2 (the cache was built to offer it).
    let connector = TlsConnector::from(client_config(
        trusting(ca.cert_der()),
        &[ALPN_H2, ALPN_HTTP1],
    ));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from(ALLOWED).unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));

    // A client that trusts another host's CA refuses the leaf.
    let elsewhere = tempfile::tempdir().unwrap();
    let other_ca = HostCa::load_or_create(elsewhere.path(), None).unwrap();
    let stranger = TlsConnector::from(client_config(trusting(other_ca.cert_der()), &[ALPN_HTTP1]));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let e = stranger
        .connect(ServerName::try_from(ALLOWED).unwrap(), tcp)
        .await
        .unwrap_err();
    // (Same subject, other key: BadSignature; it would be UnknownIssuer for another name.)
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");

    // A name policy does not allow never reaches the cache.
    let connector = TlsConnector::from(client_config(trusting(ca.cert_der()), &[ALPN_HTTP1]));
    let tcp = TcpStream::connect(addr).await.unwrap();
    assert!(
        connector
            .connect(ServerName::try_from("other.example").unwrap(), tcp)
            .await
            .is_err()
    );
    assert_eq!(cache.len(), 1);
}

#[tokio::test]
async fn the_resolver_refuses_any_other_sni() {
    let state = tempfile::tempdir().unwrap();
    let ca = Arc::new(HostCa::load_or_create(state.path(), None).unwrap());
    let cache = LeafCache::new(ca.clone(), 16, &[ALPN_HTTP1]);
    let addr = fixed_config_server(cache.server_config(ALLOWED).unwrap()).await;
    let connector = TlsConnector::from(client_config(trusting(ca.cert_der()), &[ALPN_HTTP1]));

    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut ok = connector
        .connect(ServerName::try_from(ALLOWED).unwrap(), tcp)
        .await
        .unwrap();
    let mut line = String::new();
    ok.read_to_string(&mut line).await.unwrap();
    assert_eq!(line, "hello\n");

    let tcp = TcpStream::connect(addr).await.unwrap();
    let e = connector
        .connect(ServerName::try_from("other.example").unwrap(), tcp)
        .await
        .unwrap_err();
    // The server found no certificate for the name and aborted the handshake.
    assert!(e.to_string().contains("alert"), "{e}");

    // No SNI at all (an IP as the server name sends none): refused as well.
    let tcp = TcpStream::connect(addr).await.unwrap();
    assert!(
        connector
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .is_err()
    );
}

/// A separate test CA and a TLS server for "upstream.test" signed by it.
struct TestUpstream {
    ca_pem: String,
    addr: std::net::SocketAddr,
}

async fn test_upstream() -> TestUpstream {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test upstream CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["upstream.test".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .unwrap();
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    let addr = fixed_config_server(Arc::new(config)).await;
    TestUpstream {
        ca_pem: ca_cert.pem(),
        addr,
    }
}

#[tokio::test]
async fn upstream_tls_verifies_against_the_bundle() {
    let upstream = test_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("upstream-ca.pem");
    std::fs::write(&bundle, &upstream.ca_pem).unwrap();
    let tls = UpstreamTls::with_bundle(&bundle).unwrap();

    let tcp = TcpStream::connect(upstream.addr).await.unwrap();
    let mut stream = tls.connect(tcp, "upstream.test").await.unwrap();
    let mut line = String::new();
    stream.read_to_string(&mut line).await.unwrap();
    assert_eq!(line, "hello\n");

    // Right CA, wrong name (the policy host is what gets verified).
    let tcp = TcpStream::connect(upstream.addr).await.unwrap();
    let e = tls.connect(tcp, "other.test").await.unwrap_err();
    match &e {
        UpstreamTlsError::BadCertificate { host, reason } => {
            assert_eq!(host, "other.test");
            assert!(reason.contains("upstream.test"), "{reason}");
        }
        other => panic!("{other:?}"),
    }

    // The wrong bundle (the host CA, which did not sign the upstream).
    let state = tempfile::tempdir().unwrap();
    let host_ca = HostCa::load_or_create(state.path(), None).unwrap();
    let wrong = UpstreamTls::with_bundle(host_ca.cert_path()).unwrap();
    let tcp = TcpStream::connect(upstream.addr).await.unwrap();
    let e = wrong.connect(tcp, "upstream.test").await.unwrap_err();
    match &e {
        UpstreamTlsError::BadCertificate { host, reason } => {
            assert_eq!(host, "upstream.test");
            assert!(reason.contains("UnknownIssuer"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("upstream.test"), "{e}");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn the_ca_key_is_private_and_a_readable_key_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("scopegate");
    HostCa::load_or_create(&dir, None).unwrap();
    let key = dir.join("ca.key");
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&dir.join("ca.crt")), 0o644);
    assert_eq!(mode(&dir), 0o700);

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = HostCa::load_or_create(&dir, None).unwrap_err();
    assert!(
        matches!(&e, CaError::KeyPermissions { path, mode: 0o644 } if *path == key),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(text.contains("ca.key") && text.contains("0644"), "{text}");
}
