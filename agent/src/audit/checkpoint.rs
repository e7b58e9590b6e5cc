//! Signed checkpoints: ed25519 signatures over a point of the chain.
//!
//! With `Sinks::signing_key` set, the writer appends a *checkpoint record* every
//! `CheckpointPolicy::every_records` records or `CheckpointPolicy::interval` (whichever
//! comes first, and only if something was recorded since the last one), and one at a clean
//! shutdown. A checkpoint record is an ordinary chained record with `proto: "audit"`,
//! `decision: "allow"`, `reason: "checkpoint"`, `origin: "agent"` and a
//! `"checkpoint": {"seq", "hash", "sig"}` object, where `seq`/`hash` are those of the record
//! just before it (so `checkpoint.seq == seq - 1` and `checkpoint.hash == prev`) and `sig`
//! is the standard base64 of the ed25519 signature over
//!
//! ```text
//! "scopegate-audit-checkpoint-v1" || seq as 8 bytes big-endian || the 32 hash bytes
//! ```
//!
//! A signature proves that the signer's chain contained that record, with everything
//! before it. Records after the last checkpoint are protected by the hash chain only: an
//! attacker who can write the file can cut them off. To detect that, the writer also keeps
//! an *anchor*: after a checkpoint record is fsynced, its line is written (atomically) to
//! `<audit file>.anchor`. `verify` uses the anchors it finds next to the files (and those
//! given with `--anchor`, e.g. an export of the journal, which also carries the
//! checkpoints when the stdout sink is on): a chain that ends before the newest anchored
//! checkpoint is reported as `truncated`. An anchor on the same disk only helps against
//! an attacker who cannot also roll it back; ship checkpoints off the host for more.
//!
//! At a clean stop (`Auditor::stop`) the writer checkpoints the `agent_stopping` record and
//! anchors that checkpoint; without a signing key it anchors the `agent_stopping` record
//! itself (an unsigned anchor: seq and hash, no signature), which `verify` uses the same way.
//!
//! Keys are PKCS#8 PEM files. A missing key file is generated (mode 0600) together with
//! `<key>.pub` (SubjectPublicKeyInfo PEM), which is what `verify --pubkey` wants.
#![forbid(unsafe_code)]

use std::{
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use base64::Engine as _;
use ed25519_dalek::{
    Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey,
    pkcs8::{
        DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _, EncodePublicKey as _,
        spki::der::pem::LineEnding,
    },
};
use serde::{Deserialize, Serialize};

use super::chain::ChainHash;

/// The signed point of a checkpoint record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The seq of the record the signature covers (the one before the checkpoint record).
    pub seq: u64,
    /// Its hash, hex.
    pub hash: String,
    /// ed25519 signature, standard base64.
    pub sig: String,
}

/// Domain separation prefix of the signed message.
const DOMAIN: &[u8] = b"scopegate-audit-checkpoint-v1";

/// Errors of key handling and signature checks.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A key file could not be read or written.
    #[error("key file {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// A key file is not a usable ed25519 key.
    #[error("key file {path}: {message}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The signed message for `(seq, hash)`.
pub fn message(seq: u64, hash: &ChainHash) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 8 + 32);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&hash.0);
    m
}

/// Signs `(seq, hash)`.
pub fn sign(key: &SigningKey, seq: u64, hash: &ChainHash) -> Checkpoint {
    let sig = key.sign(&message(seq, hash));
    Checkpoint {
        seq,
        hash: hash.to_hex(),
        sig: base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()),
    }
}

/// Whether `checkpoint` carries a valid signature by `key`.
pub fn signature_valid(key: &VerifyingKey, checkpoint: &Checkpoint) -> bool {
    let Some(hash) = ChainHash::from_hex(&checkpoint.hash) else {
        return false;
    };
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&checkpoint.sig) else {
        return false;
    };
    let Ok(bytes) = <[u8; 64]>::try_from(bytes.as_slice()) else {
        return false;
    };
    let sig = Signature::from_bytes(&bytes);
    key.verify(&message(checkpoint.seq, &hash), &sig).is_ok()
}

/// Loads the signing key at `path`, generating it (and `<path>.pub`) if it does not exist.
pub fn load_or_generate(path: &Path) -> Result<SigningKey, CheckpointError> {
    match fs::read_to_string(path) {
        Ok(pem) => SigningKey::from_pkcs8_pem(&pem).map_err(|e| CheckpointError::BadKey {
            path: path.into(),
            message: format!("not an ed25519 PKCS#8 PEM private key: {e}"),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = generate();
            write_key_pair(&key, path)?;
            tracing::info!(key = %path.display(), "generated an audit checkpoint signing key");
            Ok(key)
        }
        Err(source) => Err(CheckpointError::Io {
            path: path.into(),
            error: source,
        }),
    }
}

/// A fresh random signing key.
pub fn generate() -> SigningKey {
    SigningKey::from_bytes(&rand::random::<[u8; 32]>())
}

/// The path of the public key written next to a private key.
pub fn public_key_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Writes `key` to `path` (PKCS#8 PEM, mode 0600, must not exist) and its public key to
/// `<path>.pub` (SubjectPublicKeyInfo PEM, mode 0644).
pub fn write_key_pair(key: &SigningKey, path: &Path) -> Result<(), CheckpointError> {
    let bad = |message: String| CheckpointError::BadKey {
        path: path.into(),
        message,
    };
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| bad(format!("encoding: {e}")))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| bad(format!("encoding the public key: {e}")))?;
    write_new(path, pem.as_bytes(), 0o600)?;
    let pub_path = public_key_path(path);
    let tmp = {
        let mut s = pub_path.as_os_str().to_owned();
        s.push(".tmp");
        PathBuf::from(s)
    };
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, public.as_bytes(), 0o644)?;
    fs::rename(&tmp, &pub_path).map_err(|source| CheckpointError::Io {
        path: pub_path,
        error: source,
    })
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CheckpointError> {
    let io_err = |source| CheckpointError::Io {
        path: path.into(),
        error: source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err)?;
    f.write_all(bytes).map_err(io_err)?;
    f.sync_all().map_err(io_err)
}

/// Loads a verifying key: a public key PEM, or a private key PEM (its public half).
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, CheckpointError> {
    let pem = fs::read_to_string(path).map_err(|source| CheckpointError::Io {
        path: path.into(),
        error: source,
    })?;
    if let Ok(key) = VerifyingKey::from_public_key_pem(&pem) {
        return Ok(key);
    }
    SigningKey::from_pkcs8_pem(&pem)
        .map(|k| k.verifying_key())
        .map_err(|_| CheckpointError::BadKey {
            path: path.into(),
            message: "not an ed25519 public key PEM (or PKCS#8 private key PEM)".into(),
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn generated_key_round_trips_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        let key = load_or_generate(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_generate(&path).unwrap();
        assert_eq!(key.to_bytes(), again.to_bytes());
        let public = load_verifying_key(&public_key_path(&path)).unwrap();
        assert_eq!(public, key.verifying_key());
        assert_eq!(load_verifying_key(&path).unwrap(), public);

        let hash = ChainHash([7; 32]);
        let cp = sign(&key, 41, &hash);
        assert!(signature_valid(&public, &cp));
        let mut other = cp.clone();
        other.seq = 42;
        assert!(!signature_valid(&public, &other));
        let stranger = generate().verifying_key();
        assert!(!signature_valid(&stranger, &cp));
    }

    #[test]
    fn garbage_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        fs::write(&path, "not a key").unwrap();
        let err = load_or_generate(&path).unwrap_err();
        assert!(err.to_string().contains("audit.key"), "{err}");
    }
}
