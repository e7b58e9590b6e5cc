//! The host CA for TLS interception, and the leaf certificates it mints.
//!
//! [`HostCa::load_or_create`] keeps one ECDSA P-256 CA per host in the agent's state
//! directory: `ca.crt` (PEM, 0644: distribute it to the workloads' trust stores with
//! `scopegate ca export`) and `ca.key` (PEM PKCS#8, 0600, owned by the agent's user, written
//! atomically). The CA is `CA:true, pathlen:0` with key usages keyCertSign and cRLSign only,
//! so it cannot be used to sign intermediates or anything but leaves.
//!
//! # Name constraints (`--ca-name-constraints`)
//!
//! Optionally the CA is created with an X.509 name-constraints extension (critical,
//! permitted DNS subtrees only): clients that honour RFC 5280 (OpenSSL, rustls/webpki,
//! Go, browsers) then reject any leaf it signs for a name outside those suffixes, so a
//! leaked CA key cannot impersonate other sites to the workloads that trust it. The cost:
//! interception works only for destinations under those suffixes (the agent refuses to
//! mint outside them, [`CaError::OutsideConstraints`]), and changing the list means a new
//! CA that every workload must trust again. The constraints are fixed when the CA is
//! created: at load, the CA on disk must carry exactly the configured list, otherwise the
//! agent refuses to start ([`CaError::ConstraintsDiffer`], naming the file and both lists)
//! rather than rotate the CA behind the operator's back.
//!
//! [`LeafCache`] mints short-lived leaves (7 days, ECDSA P-256, SAN = the one DNS name, EKU
//! serverAuth) and, per name, a ready [`ServerConfig`] whose certificate resolver serves that
//! name only.
//!
//! # Contract: only allowed names reach the cache
//!
//! The caller asks for a leaf only after policy has allowed the SNI for this workload and
//! destination ([`LeafCache::server_config`] is called *after* the decision, never before).
//! The cache therefore never holds a name that no policy allows, and a client cannot make
//! the agent mint certificates for arbitrary names. The capacity is bounded regardless
//! (least-recently-used eviction), so a caller bug costs CPU for minting, never memory.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    fmt,
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints, PKCS_ECDSA_P256_SHA256,
};
use rustls::{
    RootCertStore, ServerConfig,
    client::{WebPkiServerVerifier, danger::ServerCertVerifier},
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions},
    sign::CertifiedKey,
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime, pem::PemObject,
};

use super::client_hello::normalize_dns_name;

/// The CA certificate's file name in the state directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA key's file name in the state directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// How long a new CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a leaf is valid (never beyond the CA).
pub const LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// A cached leaf older than this is replaced by a fresh one.
pub const LEAF_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// The default number of names the leaf cache holds.
pub const DEFAULT_LEAF_CAPACITY: usize = 1024;
/// Validity starts this far in the past, for clients with slightly slow clocks.
const BACKDATE: Duration = Duration::from_secs(3600);
/// Files larger than this are not a CA certificate or key.
const MAX_FILE: u64 = 64 * 1024;
/// X.520 upper bound for a CommonName.
const MAX_COMMON_NAME: usize = 64;
/// TLS 1.3 session tickets kept for resumption, shared by every minted server config.
const SESSION_CACHE: usize = 4096;
/// The name a freshly loaded CA must be able to issue for (its self-check).
const SELF_CHECK_NAME: &str = "self-check.scopegate.invalid";

/// Errors of the host CA and leaf minting.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The state directory could not be created or inspected.
    #[error("CA state directory {}: {source}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The state directory path exists but is not a directory.
    #[error("CA state directory {} is not a directory", path.display())]
    StateDirNotDir {
        /// The path.
        path: PathBuf,
    },
    /// Others could replace the CA files.
    #[error(
        "CA state directory {} has mode {mode:04o}; it must not be writable by group or others",
        path.display()
    )]
    StateDirPermissions {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The state directory or the key belongs to another user.
    #[error("{} is owned by uid {uid}; expected uid {expected} (the agent's)", path.display())]
    Owner {
        /// The directory or file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// The agent's effective uid.
        expected: u32,
    },
    /// Only one of the two CA files exists.
    #[error(
        "{} exists but {} is missing; restore it, or remove both to create a new CA \
         (which every workload must then trust again)",
        present.display(),
        missing.display()
    )]
    Incomplete {
        /// The file that exists.
        present: PathBuf,
        /// The file that does not.
        missing: PathBuf,
    },
    /// The CA key is readable or writable by group or others.
    #[error(
        "CA key {} has mode {mode:04o}; it must be accessible by its owner only (chmod 600)",
        path.display()
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A CA file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A CA file could not be written.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A CA file's contents are not usable.
    #[error("{} is not a usable scopegate CA file: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA certificate has expired.
    #[error(
        "CA certificate {} expired at {not_after}; remove {} and {} to create a new CA",
        path.display(), path.display(), key.display()
    )]
    Expired {
        /// The certificate file.
        path: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Its notAfter, as written in the certificate.
        not_after: String,
    },
    /// The key does not belong to the certificate, or leaves it signs do not verify.
    #[error("CA key {} does not match certificate {}: {reason}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The verification failure.
        reason: String,
    },
    /// Key or certificate generation failed.
    #[error("generating the {what}: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// The error.
        source: rcgen::Error,
    },
    /// A leaf was requested for something that is not a DNS name.
    #[error("cannot mint a leaf for {name:?}: {reason}")]
    InvalidName {
        /// The requested name (truncated).
        name: String,
        /// Why it is refused.
        reason: String,
    },
    /// A `--ca-name-constraints` entry is not a DNS suffix.
    #[error("--ca-name-constraints {value:?}: {reason}")]
    InvalidConstraint {
        /// The entry given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// The CA on disk was created with other name constraints than configured.
    #[error(
        "CA certificate {} has name constraints [{on_disk}] but [{configured}] is configured; \
         keep the configured list as it was, or remove {} and {} to create a new CA with the \
         new constraints (which every workload must then trust again)",
        path.display(), path.display(), key.display()
    )]
    ConstraintsDiffer {
        /// The certificate file.
        path: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The permitted DNS subtrees of the CA on disk (comma-separated; empty: none).
        on_disk: String,
        /// The configured ones.
        configured: String,
    },
    /// A leaf was requested for a name the CA's name constraints do not permit.
    #[error("cannot mint a leaf for {name:?}: outside the CA's name constraints [{permitted}]")]
    OutsideConstraints {
        /// The requested name.
        name: String,
        /// The permitted suffixes, comma-separated.
        permitted: String,
    },
    /// rustls refused a key or configuration.
    #[error("{what}: {source}")]
    Rustls {
        /// What was being set up.
        what: &'static str,
        /// The error.
        source: rustls::Error,
    },
}

/// The host's interception CA.
pub struct HostCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// The issuer as rcgen needs it: same subject and key-identifier method as `ca.crt`.
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// notAfter of the CA, seconds since the epoch; leaves never outlive it.
    not_after: i64,
    cert_path: PathBuf,
    /// Permitted DNS subtrees (sorted, deduplicated); empty: unconstrained.
    name_constraints: Vec<String>,
}

impl fmt::Debug for HostCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostCa")
            .field("cert_path", &self.cert_path)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl HostCa {
    /// Loads the CA from `state_dir`, or creates it there at first start.
    ///
    /// The directory is created with mode 0700 (parents too, if missing). An existing
    /// directory must belong to the agent's user and not be writable by group or others.
    /// The key must be a regular file (no symlink), owned by the agent's user, mode 0600 or
    /// stricter. A loaded CA is checked by minting and verifying a leaf, so a key that does
    /// not match the certificate fails here and not at the first intercepted connection.
    ///
    /// `name_constraints`: the DNS suffixes a new CA is constrained to (empty: none), which
    /// an existing CA must carry exactly; `None` creates an unconstrained CA and accepts
    /// an existing one as it is (`scopegate ca export` without the flag).
    pub fn load_or_create(
        state_dir: &Path,
        name_constraints: Option<&[String]>,
    ) -> Result<Self, CaError> {
        let wanted = name_constraints.map(validate_constraints).transpose()?;
        ensure_state_dir(state_dir)?;
        let cert_path = state_dir.join(CA_CERT_FILE);
        let key_path = state_dir.join(CA_KEY_FILE);
        match (exists(&cert_path)?, exists(&key_path)?) {
            (false, false) => Self::create(cert_path, &key_path, wanted.unwrap_or_default()),
            (true, true) => {
                let ca = Self::load(cert_path, &key_path)?;
                match wanted {
                    Some(wanted) if wanted != ca.name_constraints => {
                        Err(CaError::ConstraintsDiffer {
                            path: ca.cert_path,
                            key: key_path,
                            on_disk: ca.name_constraints.join(","),
                            configured: wanted.join(","),
                        })
                    }
                    _ => Ok(ca),
                }
            }
            (true, false) => Err(CaError::Incomplete {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(CaError::Incomplete {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    /// The CA certificate, PEM (for `scopegate ca export`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Where the CA certificate is stored.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The permitted DNS subtrees of the CA's name constraints (empty: unconstrained).
    pub fn name_constraints(&self) -> &[String] {
        &self.name_constraints
    }

    /// Whether the name constraints permit `name` (RFC 5280: the suffix itself or any
    /// name below it).
    pub fn permits(&self, name: &str) -> bool {
        self.name_constraints.is_empty()
            || self.name_constraints.iter().any(|suffix| {
                name == suffix
                    || name
                        .strip_suffix(suffix.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            })
    }

    fn create(
        cert_path: PathBuf,
        key_path: &Path,
        name_constraints: Vec<String>,
    ) -> Result<Self, CaError> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CaError::Generate {
                what: "CA key",
                source,
            })?;
        let now = unix_now();
        let not_after = now.saturating_add(secs(CA_VALIDITY));
        let issuer = ca_params(&default_common_name(), now, not_after, &name_constraints)
            .self_signed(&key)
            .map_err(|source| CaError::Generate {
                what: "CA certificate",
                source,
            })?;
        let cert_pem = issuer.pem();
        // Key first: a crash in between leaves a key without a certificate, which
        // load_or_create reports instead of silently replacing.
        write_atomic(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&cert_path, cert_pem.as_bytes(), 0o644)?;
        tracing::info!(cert = %cert_path.display(), "created the host CA for TLS interception");
        Ok(Self {
            cert_pem,
            cert_der: issuer.der().clone(),
            issuer,
            key,
            not_after,
            cert_path,
            name_constraints,
        })
    }

    fn load(cert_path: PathBuf, key_path: &Path) -> Result<Self, CaError> {
        let key_bytes = read_private(key_path)?;
        let corrupt = |path: &Path, reason: String| CaError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let key_pem = std::str::from_utf8(&key_bytes)
            .map_err(|_| corrupt(key_path, "not PEM text".into()))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| corrupt(key_path, e.to_string()))?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(corrupt(key_path, "not an ECDSA P-256 key".into()));
        }

        let cert_bytes = read_public(&cert_path)?;
        // `cert_pem` is exported as is, so the file must hold nothing but the certificate
        // (never, say, a key pasted into it).
        let text = std::str::from_utf8(&cert_bytes)
            .map_err(|_| corrupt(&cert_path, "not PEM text".into()))?
            .trim();
        if !text.starts_with("-----BEGIN CERTIFICATE-----")
            || !text.ends_with("-----END CERTIFICATE-----")
            || text.matches("-----BEGIN ").count() != 1
        {
            return Err(corrupt(
                &cert_path,
                "expected exactly one PEM CERTIFICATE block and nothing else".into(),
            ));
        }
        let mut certs = CertificateDer::pem_slice_iter(&cert_bytes);
        let cert_der = match (certs.next(), certs.next()) {
            (Some(Ok(cert)), None) => cert,
            (None, _) => return Err(corrupt(&cert_path, "no PEM certificate".into())),
            (Some(Err(e)), _) => return Err(corrupt(&cert_path, e.to_string())),
            (Some(Ok(_)), Some(_)) => {
                return Err(corrupt(&cert_path, "more than one certificate".into()));
            }
        };
        let fields = ca_fields(&cert_der).ok_or_else(|| {
            corrupt(
                &cert_path,
                "not a certificate made by scopegate (expected a subject of one UTF-8 \
                 CommonName)"
                    .into(),
            )
        })?;
        let now = unix_now();
        if fields.not_after <= now {
            return Err(CaError::Expired {
                path: cert_path,
                key: key_path.to_owned(),
                not_after: fields.not_after_text,
            });
        }
        if fields.not_after - now < 30 * 24 * 3600 {
            tracing::warn!(
                cert = %cert_path.display(),
                not_after = %fields.not_after_text,
                "the host CA expires within 30 days; plan its rotation"
            );
        }
        // rcgen signs with the issuer's subject and key identifier; rebuild those from the
        // stored subject and the key (the throwaway self-signature is never used).
        let name_constraints =
            permitted_dns_subtrees(&cert_der).map_err(|reason| corrupt(&cert_path, reason))?;
        let issuer = ca_params(
            &fields.common_name,
            now,
            fields.not_after,
            &name_constraints,
        )
        .self_signed(&key)
        .map_err(|source| CaError::Generate {
            what: "CA issuer",
            source,
        })?;
        let cert_pem = format!("{text}\n");
        let ca = Self {
            cert_pem,
            cert_der,
            issuer,
            key,
            not_after: fields.not_after,
            cert_path,
            name_constraints,
        };
        ca.self_check().map_err(|reason| CaError::Mismatch {
            cert: ca.cert_path.clone(),
            key: key_path.to_owned(),
            reason,
        })?;
        Ok(ca)
    }

    /// Mints a leaf for a test name and verifies it against the stored certificate.
    fn self_check(&self) -> Result<(), String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let check_name = match self.name_constraints.first() {
            None => SELF_CHECK_NAME.to_owned(),
            Some(suffix) => format!("self-check.{suffix}"),
        };
        let leaf = self.mint(&check_name).map_err(|e| e.to_string())?;
        let mut roots = RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .map_err(|e| e.to_string())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
        let end_entity = leaf.cert.first().ok_or("no leaf certificate")?;
        let name = ServerName::try_from(check_name).map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(end_entity, &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())?;
        leaf.keys_match().map_err(|e| e.to_string())
    }

    /// Mints a leaf for `name` (already validated by the caller); refused outside the name
    /// constraints (clients would reject the leaf anyway).
    fn mint(&self, name: &str) -> Result<CertifiedKey, CaError> {
        if !self.permits(name) {
            return Err(CaError::OutsideConstraints {
                name: name.to_owned(),
                permitted: self.name_constraints.join(","),
            });
        }
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CaError::Generate {
                what: "leaf key",
                source,
            })?;
        let now = unix_now();
        let mut params =
            CertificateParams::new(vec![name.to_owned()]).map_err(|source| CaError::Generate {
                what: "leaf parameters",
                source,
            })?;
        let mut subject = DistinguishedName::new();
        if name.len() <= MAX_COMMON_NAME {
            subject.push(DnType::CommonName, name);
        } else {
            subject.push(DnType::CommonName, "scopegate leaf");
        }
        params.distinguished_name = subject;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(
            &mut params,
            now.saturating_sub(secs(BACKDATE)),
            now.saturating_add(secs(LEAF_VALIDITY)).min(self.not_after),
        );
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(|source| CaError::Generate {
                what: "leaf certificate",
                source,
            })?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key =
            rustls::crypto::ring::sign::any_ecdsa_type(&der).map_err(|source| CaError::Rustls {
                what: "loading the leaf key",
                source,
            })?;
        Ok(CertifiedKey::new(vec![cert.der().clone()], signing_key))
    }
}

/// Leaves and server configurations per allowed name, bounded, least recently used out.
///
/// See the module docs for the contract: call this only for names policy allows.
pub struct LeafCache {
    ca: Arc<HostCa>,
    provider: Arc<CryptoProvider>,
    alpn: Vec<Vec<u8>>,
    sessions: Arc<dyn StoresServerSessions>,
    capacity: usize,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<String, Slot>,
    tick: u64,
}

struct Slot {
    minted: Arc<Minted>,
    used: u64,
}

struct Minted {
    leaf: Arc<CertifiedKey>,
    config: Arc<ServerConfig>,
    at: Instant,
}

impl fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafCache")
            .field("ca", &self.ca)
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl LeafCache {
    /// A cache of at most `capacity` names (at least 1) whose server configurations offer
    /// `alpn` (e.g. `[b"h2", b"http/1.1"]`; offer `h2` only if the proxy serves it).
    pub fn new(ca: Arc<HostCa>, capacity: usize, alpn: &[&[u8]]) -> Self {
        Self {
            ca,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
            sessions: ServerSessionMemoryCache::new(SESSION_CACHE),
            capacity: capacity.max(1),
            state: Mutex::new(CacheState::default()),
        }
    }

    /// The leaf for `sni` (a DNS name the policy allows), minted on first use.
    pub fn leaf_for(&self, sni: &str) -> Result<Arc<CertifiedKey>, CaError> {
        Ok(self.entry(sni)?.leaf.clone())
    }

    /// A TLS 1.2/1.3 server configuration for terminating a client that asked for `sni`
    /// (a DNS name the policy allows). Its certificate resolver answers only that name: a
    /// handshake whose SNI differs, or has none, fails. Configurations are cached with the
    /// leaf and share one session cache, so clients can resume.
    pub fn server_config(&self, sni: &str) -> Result<Arc<ServerConfig>, CaError> {
        Ok(self.entry(sni)?.config.clone())
    }

    /// How many names are cached.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no name is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most names the cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        // The state is consistent after every statement; a panic elsewhere cannot leave it
        // half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn entry(&self, sni: &str) -> Result<Arc<Minted>, CaError> {
        let name = normalize_dns_name(sni).map_err(|e| CaError::InvalidName {
            name: sni.chars().take(80).collect(),
            reason: e.to_string(),
        })?;
        if let Some(hit) = self.fresh(&name) {
            return Ok(hit);
        }
        // Mint without holding the lock; if another task raced us, keep theirs.
        let minted = Arc::new(self.mint(&name)?);
        let mut state = self.lock();
        state.tick += 1;
        let tick = state.tick;
        if let Some(slot) = state.entries.get_mut(&name)
            && slot.minted.at.elapsed() < LEAF_REFRESH
        {
            slot.used = tick;
            return Ok(slot.minted.clone());
        }
        if !state.entries.contains_key(&name) && state.entries.len() >= self.capacity {
            let oldest = state
                .entries
                .iter()
                .min_by_key(|(_, slot)| slot.used)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                state.entries.remove(&oldest);
            }
        }
        state.entries.insert(
            name,
            Slot {
                minted: minted.clone(),
                used: tick,
            },
        );
        Ok(minted)
    }

    fn fresh(&self, name: &str) -> Option<Arc<Minted>> {
        let mut state = self.lock();
        state.tick += 1;
        let tick = state.tick;
        let slot = state.entries.get_mut(name)?;
        if slot.minted.at.elapsed() >= LEAF_REFRESH {
            return None;
        }
        slot.used = tick;
        Some(slot.minted.clone())
    }

    fn mint(&self, name: &str) -> Result<Minted, CaError> {
        let leaf = Arc::new(self.ca.mint(name)?);
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|source| CaError::Rustls {
                what: "building the interception server configuration",
                source,
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(OnlyName {
                name: name.to_owned(),
                leaf: leaf.clone(),
            }));
        config.alpn_protocols = self.alpn.clone();
        config.session_storage = self.sessions.clone();
        Ok(Minted {
            leaf,
            config: Arc::new(config),
            at: Instant::now(),
        })
    }
}

/// Serves one leaf, and only to a client whose SNI is its name.
#[derive(Debug)]
struct OnlyName {
    name: String,
    leaf: Arc<CertifiedKey>,
}

impl ResolvesServerCert for OnlyName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(sni) if sni.eq_ignore_ascii_case(&self.name) => Some(self.leaf.clone()),
            other => {
                tracing::debug!(
                    sni = ?other,
                    name = %self.name,
                    "refusing a TLS handshake whose SNI differs from the allowed name"
                );
                None
            }
        }
    }
}

fn ca_params(
    common_name: &str,
    now: i64,
    not_after: i64,
    name_constraints: &[String],
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, common_name);
    params.distinguished_name = subject;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if !name_constraints.is_empty() {
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: name_constraints
                .iter()
                .map(|s| GeneralSubtree::DnsName(s.clone()))
                .collect(),
            excluded_subtrees: Vec::new(),
        });
    }
    set_validity(&mut params, now.saturating_sub(secs(BACKDATE)), not_after);
    params
}

/// Validates `--ca-name-constraints`: each entry a DNS name (normalised: lowercase, no
/// trailing dot; no wildcard, no IP literal); sorted and deduplicated.
fn validate_constraints(list: &[String]) -> Result<Vec<String>, CaError> {
    let mut out = Vec::with_capacity(list.len());
    for value in list {
        let trimmed = value.trim();
        let name =
            normalize_dns_name(trimmed.strip_suffix('.').unwrap_or(trimmed)).map_err(|e| {
                CaError::InvalidConstraint {
                    value: value.clone(),
                    reason: e.to_string(),
                }
            })?;
        out.push(name);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The permitted DNS subtrees of a CA certificate's name constraints (sorted); anything
/// but permitted DNS names in the extension is refused (scopegate writes nothing else).
fn permitted_dns_subtrees(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let Some(ext) = cert.name_constraints().map_err(|e| e.to_string())? else {
        return Ok(Vec::new());
    };
    if ext.value.excluded_subtrees.is_some() {
        return Err("name constraints with excluded subtrees (not made by scopegate)".into());
    }
    let mut out = Vec::new();
    for subtree in ext.value.permitted_subtrees.iter().flatten() {
        match subtree.base {
            GeneralName::DNSName(name) => out.push(name.to_ascii_lowercase()),
            ref other => {
                return Err(format!(
                    "a name constraint that is not a DNS name ({other:?}; not made by scopegate)"
                ));
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// "scopegate host CA <hostname>", within the CommonName bound.
fn default_common_name() -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown-host".into());
    let mut name = format!("scopegate host CA {host}");
    while name.len() > MAX_COMMON_NAME {
        name.pop();
    }
    name
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Sets the validity of `params` (without naming rcgen's `time` type). Clamped to what
/// X.509 can express (up to year 9999), so the date arithmetic cannot overflow.
fn set_validity(params: &mut CertificateParams, not_before: i64, not_after: i64) {
    let at = |unix: i64| {
        let unix = u64::try_from(unix.clamp(0, 253_402_300_799)).unwrap_or(0);
        rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(unix)
    };
    params.not_before = at(not_before);
    params.not_after = at(not_after);
}

fn ensure_state_dir(dir: &Path) -> Result<(), CaError> {
    let state_dir = |source| CaError::StateDir {
        path: dir.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(state_dir)?;
    let meta = fs::metadata(dir).map_err(state_dir)?;
    if !meta.is_dir() {
        return Err(CaError::StateDirNotDir {
            path: dir.to_owned(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(CaError::StateDirPermissions {
            path: dir.to_owned(),
            mode,
        });
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(CaError::Owner {
            path: dir.to_owned(),
            uid: meta.uid(),
            expected: euid,
        });
    }
    Ok(())
}

fn exists(path: &Path) -> Result<bool, CaError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CaError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads the key: a regular file, not a symlink, owned by us, no group/other access.
fn read_private(path: &Path) -> Result<Vec<u8>, CaError> {
    let file = open_nofollow(path)?;
    let meta = file.metadata().map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(CaError::Owner {
            path: path.to_owned(),
            uid: meta.uid(),
            expected: euid,
        });
    }
    read_file(path, file, &meta)
}

/// Reads the (public) certificate; a symlink is followed.
fn read_public(path: &Path) -> Result<Vec<u8>, CaError> {
    let file = File::open(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })?;
    read_file(path, file, &meta)
}

fn open_nofollow(path: &Path) -> Result<File, CaError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| CaError::Read {
            path: path.to_owned(),
            source,
        })
}

fn read_file(path: &Path, file: File, meta: &fs::Metadata) -> Result<Vec<u8>, CaError> {
    if !meta.is_file() {
        return Err(CaError::Corrupt {
            path: path.to_owned(),
            reason: "not a regular file".into(),
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| CaError::Read {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(CaError::Corrupt {
            path: path.to_owned(),
            reason: format!("larger than {MAX_FILE} bytes"),
        });
    }
    Ok(bytes)
}

/// Writes `contents` to `path` atomically: a temporary file created with `mode` (never
/// more permissive, whatever the umask), fsynced, renamed over `path`, directory fsynced.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let write = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    // A leftover from a crashed run with the same pid: ours to remove (the directory is
    // private to the agent's user).
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(write(e)),
        _ => {}
    }
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(write)
}

/// What `load` needs from the stored CA certificate.
struct CaFields {
    common_name: String,
    not_after: i64,
    not_after_text: String,
}

/// Reads the subject CommonName and notAfter of a certificate made by [`ca_params`]:
/// `Certificate ::= SEQ { tbs SEQ { [0] version, serial, sigAlg, issuer, validity,
/// subject, … } … }`. Anything else is `None`.
fn ca_fields(der: &[u8]) -> Option<CaFields> {
    let (cert, _) = tlv(der, 0x30)?;
    let (tbs, _) = tlv(cert, 0x30)?;
    let rest = match tlv(tbs, 0xa0) {
        Some((_, rest)) => rest,
        None => tbs,
    };
    let (_serial, rest) = tlv(rest, 0x02)?;
    let (_sig_alg, rest) = tlv(rest, 0x30)?;
    let (_issuer, rest) = tlv(rest, 0x30)?;
    let (validity, rest) = tlv(rest, 0x30)?;
    let (subject, _) = tlv(rest, 0x30)?;

    let (_not_before_tag, _not_before, after) = any_tlv(validity)?;
    let (tag, not_after, _) = any_tlv(after)?;
    let not_after_text = std::str::from_utf8(not_after).ok()?.to_owned();
    let not_after = parse_time(tag, &not_after_text)?;

    let (rdn, end) = tlv(subject, 0x31)?;
    let (attribute, more) = tlv(rdn, 0x30)?;
    if !end.is_empty() || !more.is_empty() {
        return None;
    }
    let (oid, value) = tlv(attribute, 0x06)?;
    if oid != [0x55, 0x04, 0x03] {
        return None;
    }
    let (cn, end) = tlv(value, 0x0c)?;
    if !end.is_empty() {
        return None;
    }
    let common_name = std::str::from_utf8(cn).ok()?.to_owned();
    Some(CaFields {
        common_name,
        not_after,
        not_after_text,
    })
}

/// One DER element with the expected tag: (contents, rest).
fn tlv(buf: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (got, contents, rest) = any_tlv(buf)?;
    (got == tag).then_some((contents, rest))
}

/// One DER element: (tag, contents, rest). Single-byte tags, definite lengths.
fn any_tlv(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = buf.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) → seconds since epoch.
fn parse_time(tag: u8, text: &str) -> Option<i64> {
    let digits = text.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |s: &str| s.parse::<i64>().ok();
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy = num(digits.get(..2)?)?;
            (
                if yy >= 50 { 1900 + yy } else { 2000 + yy },
                digits.get(2..)?,
            )
        }
        (0x18, 14) => (num(digits.get(..4)?)?, digits.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| num(rest.get(i..i + 2)?);
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn verify(ca_der: &CertificateDer<'static>, leaf: &CertifiedKey, name: &str) {
        let mut roots = RootCertStore::empty();
        roots.add(ca_der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(&leaf.cert[0], &[], &name, &[], UnixTime::now())
            .unwrap();
    }

    #[test]
    fn creates_then_loads_the_same_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state/scopegate");
        let ca = HostCa::load_or_create(&dir, None).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(CA_CERT_FILE)), 0o644);
        assert_eq!(
            fs::metadata(dir.join(CA_KEY_FILE)).unwrap().uid(),
            nix::unistd::geteuid().as_raw()
        );
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(
            fs::read_to_string(dir.join(CA_KEY_FILE))
                .unwrap()
                .contains("PRIVATE KEY")
        );
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // The certificate: our subject, ~10 years, CA:true pathlen 0, certSign|cRLSign.
        let fields = ca_fields(ca.cert_der()).unwrap();
        assert!(fields.common_name.starts_with("scopegate host CA "));
        assert!(fields.common_name.len() <= MAX_COMMON_NAME);
        let years = (fields.not_after - unix_now()) as f64 / (365.0 * 86_400.0);
        assert!((9.9..=10.1).contains(&years), "{years}");
        // BasicConstraints { cA TRUE, pathLen 0 }
        assert!(contains(
            ca.cert_der(),
            &[0x30, 0x06, 0x01, 0x01, 0xff, 0x02, 0x01, 0x00]
        ));
        // KeyUsage keyCertSign (bit 5) and cRLSign (bit 6) only, as rcgen encodes it.
        assert!(contains(ca.cert_der(), &[0x03, 0x03, 0x07, 0x06, 0x00]));

        let again = HostCa::load_or_create(&dir, None).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        // Leaves from the reloaded CA chain to the stored certificate.
        let leaf = again.mint("api.test.example").unwrap();
        verify(ca.cert_der(), &leaf, "api.test.example");
    }

    #[test]
    fn leaf_properties() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = HostCa::load_or_create(tmp.path(), None).unwrap();
        let leaf = ca.mint("api.test.example").unwrap();
        let der = &leaf.cert[0];
        let fields = ca_fields(der).unwrap();
        assert_eq!(fields.common_name, "api.test.example");
        let days = (fields.not_after - unix_now()) as f64 / 86_400.0;
        assert!((6.9..=7.01).contains(&days), "{days}");
        // EKU serverAuth (1.3.6.1.5.5.7.3.1)
        assert!(contains(
            der,
            &[0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01]
        ));
        // SAN dNSName [2] "api.test.example"
        let mut san = vec![0x82, 16];
        san.extend_from_slice(b"api.test.example");
        assert!(contains(der, &san));
        leaf.keys_match().unwrap();
        // A leaf does not verify for another name.
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let other = ServerName::try_from("other.example").unwrap();
        assert!(
            verifier
                .verify_server_cert(der, &[], &other, &[], UnixTime::now())
                .is_err()
        );
        // Long names get a SAN but no oversized CommonName.
        let long = format!("{}.example", "a".repeat(60));
        let leaf = ca.mint(&long).unwrap();
        verify(ca.cert_der(), &leaf, &long);
    }

    /// A leaf for `name` signed with the CA's key directly, bypassing [`HostCa::mint`]'s
    /// own check: what a thief holding `ca.key` could make.
    fn forged_leaf_pem(ca: &HostCa, name: &str) -> String {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = unix_now();
        set_validity(&mut params, now - 3600, now + 3600);
        params.signed_by(&key, &ca.issuer, &ca.key).unwrap().pem()
    }

    /// `openssl verify -CAfile CA -verify_hostname NAME LEAF`: (success, output).
    fn openssl_verify(ca: &HostCa, leaf_pem: &str, name: &str) -> (bool, String) {
        let dir = tempfile::tempdir().unwrap();
        let (ca_file, leaf_file) = (dir.path().join("ca.pem"), dir.path().join("leaf.pem"));
        fs::write(&ca_file, ca.cert_pem()).unwrap();
        fs::write(&leaf_file, leaf_pem).unwrap();
        let out = std::process::Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&ca_file)
            .args(["-purpose", "sslserver", "-verify_hostname", name])
            .arg(&leaf_file)
            .output()
            .expect("run openssl (installed by `cargo xtask setup`)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// A DER certificate as PEM.
    fn pem(der: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn name_constraints_bind_the_ca_to_its_suffixes() {
        let tmp = tempfile::tempdir().unwrap();
        let wanted = vec!["Internal.Test.".to_owned(), "api.example".to_owned()];
        let ca = HostCa::load_or_create(tmp.path(), Some(&wanted)).unwrap();
        assert_eq!(ca.name_constraints(), ["api.example", "internal.test"]);
        // The extension is in the certificate itself (critical, permitted DNS subtrees).
        let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        let ext = cert.name_constraints().unwrap().expect("name constraints");
        assert!(ext.critical);
        assert_eq!(
            permitted_dns_subtrees(ca.cert_der()).unwrap(),
            ["api.example", "internal.test"]
        );
        // Names inside mint and verify; the suffix itself and names below it are inside.
        for name in ["api.example", "v1.api.example", "db.internal.test"] {
            assert!(ca.permits(name), "{name}");
            let leaf = ca.mint(name).unwrap();
            verify(ca.cert_der(), &leaf, name);
            let (ok, text) = openssl_verify(&ca, &pem(&leaf.cert[0]), name);
            assert!(ok, "openssl refused {name}: {text}");
        }
        // Outside: the agent refuses to mint, and a leaf forged with the key is rejected
        // by a real client.
        for name in [
            "evil.example",
            "xapi.example",
            "api.example.evil.test",
            "test",
        ] {
            assert!(!ca.permits(name), "{name}");
            let e = ca.mint(name).unwrap_err();
            assert!(
                matches!(&e, CaError::OutsideConstraints { permitted, .. } if permitted == "api.example,internal.test"),
                "{e:?}"
            );
            let (ok, text) = openssl_verify(&ca, &forged_leaf_pem(&ca, name), name);
            assert!(!ok, "openssl accepted a forged leaf for {name}: {text}");
            assert!(
                text.contains("permitted subtree violation"),
                "{name}: {text}"
            );
        }
        // The same forgery inside the constraints does verify: the test can fail.
        let (ok, text) =
            openssl_verify(&ca, &forged_leaf_pem(&ca, "x.api.example"), "x.api.example");
        assert!(ok, "{text}");
        // An unconstrained CA accepts the outside name (the trade-off the option closes).
        let open = tempfile::tempdir().unwrap();
        let open = HostCa::load_or_create(open.path(), Some(&[])).unwrap();
        assert!(permitted_dns_subtrees(open.cert_der()).unwrap().is_empty());
        let (ok, text) = openssl_verify(
            &open,
            &forged_leaf_pem(&open, "evil.example"),
            "evil.example",
        );
        assert!(ok, "{text}");

        // Reloading: the same list (any order or case) loads; None accepts what is there.
        let again = vec!["api.example".to_owned(), "internal.test".to_owned()];
        let reloaded = HostCa::load_or_create(tmp.path(), Some(&again)).unwrap();
        assert_eq!(reloaded.cert_pem(), ca.cert_pem());
        assert_eq!(reloaded.name_constraints(), ca.name_constraints());
        assert!(reloaded.mint("db.internal.test").is_ok());
        let exported = HostCa::load_or_create(tmp.path(), None).unwrap();
        assert_eq!(exported.cert_pem(), ca.cert_pem());
        // Other constraints (or none) are refused, naming the file and both lists.
        for (configured, shown) in [
            (vec!["api.example".to_owned()], "api.example"),
            (Vec::new(), ""),
        ] {
            let e = HostCa::load_or_create(tmp.path(), Some(&configured)).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, CaError::ConstraintsDiffer { .. }), "{e:?}");
            assert!(
                text.starts_with(&format!(
                    "CA certificate {} has name constraints [api.example,internal.test] but [{shown}] is configured",
                    tmp.path().join(CA_CERT_FILE).display()
                )),
                "{text}"
            );
        }
        // An unconstrained CA on disk is refused when constraints are configured.
        let open_dir = tempfile::tempdir().unwrap();
        HostCa::load_or_create(open_dir.path(), None).unwrap();
        let e = HostCa::load_or_create(open_dir.path(), Some(&again)).unwrap_err();
        assert!(
            e.to_string()
                .contains("has name constraints [] but [api.example,internal.test]"),
            "{e}"
        );
    }

    #[test]
    fn hostile_name_constraints_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in [
            "",
            "*.example",
            "10.0.0.1",
            "exa mple.test",
            "-x.test",
            "a..b",
            "::1",
        ] {
            let e = HostCa::load_or_create(tmp.path(), Some(&[bad.to_owned()])).unwrap_err();
            assert!(
                matches!(&e, CaError::InvalidConstraint { value, .. } if value == bad),
                "{bad:?}: {e:?}"
            );
            assert!(
                e.to_string()
                    .starts_with(&format!("--ca-name-constraints {bad:?}: "))
            );
        }
        // Nothing was created by a refused configuration.
        assert!(!tmp.path().join(CA_CERT_FILE).exists());
    }

    #[test]
    fn refuses_a_key_readable_by_others() {
        let tmp = tempfile::tempdir().unwrap();
        HostCa::load_or_create(tmp.path(), None).unwrap();
        let key = tmp.path().join(CA_KEY_FILE);
        for bad in [0o644, 0o640, 0o604, 0o610] {
            fs::set_permissions(&key, fs::Permissions::from_mode(bad)).unwrap();
            let e = HostCa::load_or_create(tmp.path(), None).unwrap_err();
            assert!(
                matches!(&e, CaError::KeyPermissions { path, mode } if *path == key && *mode == bad),
                "{e:?}"
            );
            let text = e.to_string();
            assert!(text.contains(&key.display().to_string()), "{text}");
            assert!(text.contains(&format!("{bad:04o}")), "{text}");
        }
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
        HostCa::load_or_create(tmp.path(), None).unwrap();
    }

    #[test]
    fn refuses_unsafe_or_broken_state() {
        // Key as a symlink.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        HostCa::load_or_create(&dir, None).unwrap();
        let key = dir.join(CA_KEY_FILE);
        fs::rename(&key, tmp.path().join("elsewhere.key")).unwrap();
        symlink(tmp.path().join("elsewhere.key"), &key).unwrap();
        let e = HostCa::load_or_create(&dir, None).unwrap_err();
        assert!(
            matches!(&e, CaError::Read { path, .. } if *path == key),
            "{e:?}"
        );

        // Only one of the two files.
        let tmp = tempfile::tempdir().unwrap();
        HostCa::load_or_create(tmp.path(), None).unwrap();
        fs::remove_file(tmp.path().join(CA_CERT_FILE)).unwrap();
        let e = HostCa::load_or_create(tmp.path(), None).unwrap_err();
        assert!(matches!(e, CaError::Incomplete { .. }), "{e:?}");
        assert!(e.to_string().contains(CA_CERT_FILE), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        HostCa::load_or_create(tmp.path(), None).unwrap();
        fs::remove_file(tmp.path().join(CA_KEY_FILE)).unwrap();
        let e = HostCa::load_or_create(tmp.path(), None).unwrap_err();
        assert!(matches!(e, CaError::Incomplete { .. }), "{e:?}");

        // Corrupt key, corrupt certificate: the error names the file.
        let tmp = tempfile::tempdir().unwrap();
        HostCa::load_or_create(tmp.path(), None).unwrap();
        let key = tmp.path().join(CA_KEY_FILE);
        let good_key = fs::read(&key).unwrap();
        fs::write(
            &key,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = HostCa::load_or_create(tmp.path(), None).unwrap_err();
        assert!(
            matches!(&e, CaError::Corrupt { path, .. } if *path == key),
            "{e:?}"
        );
        fs::write(&key, &good_key).unwrap();
        let cert = tmp.path().join(CA_CERT_FILE);
        let good_cert = fs::read_to_string(&cert).unwrap();
        fs::write(&cert, b"not a certificate").unwrap();
        let e = HostCa::load_or_create(tmp.path(), None).unwrap_err();
        assert!(
            matches!(&e, CaError::Corrupt { path, .. } if *path == cert),
            "{e:?}"
        );
        // Anything next to the certificate (it is exported verbatim) is refused.
        let with_key = format!("{good_cert}{}", String::from_utf8_lossy(&good_key));
        fs::write(&cert, with_key).unwrap();
        let e = HostCa::load_or_create(tmp.path(), None).unwrap_err();
        assert!(
            matches!(&e, CaError::Corrupt { path, .. } if *path == cert),
            "{e:?}"
        );
        fs::write(&cert, format!("\n{good_cert}\n\n")).unwrap();
        let reloaded = HostCa::load_or_create(tmp.path(), None).unwrap();
        assert_eq!(reloaded.cert_pem(), good_cert);

        // A key from another CA.
        let other = tempfile::tempdir().unwrap();
        HostCa::load_or_create(other.path(), None).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        HostCa::load_or_create(tmp.path(), None).unwrap();
        fs::write(
            tmp.path().join(CA_KEY_FILE),
            fs::read(other.path().join(CA_KEY_FILE)).unwrap(),
        )
        .unwrap();
        let e = HostCa::load_or_create(tmp.path(), None).unwrap_err();
        assert!(matches!(e, CaError::Mismatch { .. }), "{e:?}");

        // A state directory others can write to.
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let e = HostCa::load_or_create(tmp.path(), None).unwrap_err();
        assert!(
            matches!(e, CaError::StateDirPermissions { mode: 0o777, .. }),
            "{e:?}"
        );
        // A file where the directory should be.
        let file = tmp.path().join("file");
        fs::write(&file, b"").unwrap();
        let e = HostCa::load_or_create(&file, None).unwrap_err();
        assert!(matches!(e, CaError::StateDir { .. }), "{e:?}");
    }

    #[test]
    fn leaf_cache_is_bounded_and_validates_names() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Arc::new(HostCa::load_or_create(tmp.path(), None).unwrap());
        let cache = LeafCache::new(ca.clone(), 2, &[b"h2", b"http/1.1"]);
        let a = cache.leaf_for("a.example").unwrap();
        assert!(Arc::ptr_eq(&a, &cache.leaf_for("A.Example").unwrap()));
        let config = cache.server_config("a.example").unwrap();
        assert!(Arc::ptr_eq(
            &config,
            &cache.server_config("a.example").unwrap()
        ));
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        cache.leaf_for("b.example").unwrap();
        cache.leaf_for("a.example").unwrap(); // a is now more recent than b
        cache.leaf_for("c.example").unwrap();
        assert_eq!(cache.len(), 2);
        assert!(
            Arc::ptr_eq(&a, &cache.leaf_for("a.example").unwrap()),
            "a kept"
        );
        assert_eq!(cache.len(), 2);
        for bad in [
            "",
            "10.0.0.1",
            "*.example.com",
            "a..b",
            "x/y",
            "example.com.",
        ] {
            let e = cache.leaf_for(bad).unwrap_err();
            assert!(matches!(e, CaError::InvalidName { .. }), "{bad:?}: {e:?}");
        }
        assert_eq!(cache.len(), 2);
        assert_eq!(LeafCache::new(ca, 0, &[]).capacity(), 1);
    }

    #[test]
    fn der_times() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(parse_time(0x17, "700101000000Z"), Some(0));
        assert_eq!(parse_time(0x17, "491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_time(0x17, "500101000000Z"), Some(-631_152_000));
        assert_eq!(parse_time(0x18, "20500101000000Z"), Some(2_524_608_000));
        for bad in ["", "Z", "7001010000Z", "701301000000Z", "70010100000aZ"] {
            assert_eq!(parse_time(0x17, bad), None, "{bad}");
        }
        assert_eq!(any_tlv(&[0x30, 0x85, 0, 0, 0, 0, 0]), None);
        assert_eq!(any_tlv(&[0x30, 0x82, 0xff]), None);
        assert_eq!(any_tlv(&[0x30, 0x03, 1]), None);
    }
}
