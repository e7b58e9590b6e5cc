//! Secrets for credential injection: read from a file or a systemd credential, cached and
//! re-read when the file changes, never logged. A value containing CR or LF is refused.
#![forbid(unsafe_code)]

use std::{collections::HashMap, path::PathBuf, sync::Mutex, time::SystemTime};

use crate::policy::SecretSource;

/// Errors of this module. They name the source, never the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The secret could not be read.
    #[error("secret {path}: {source}")]
    Read {
        /// Where it was read from.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The value contains CR or LF (it would split the header).
    #[error("secret {path}: contains CR or LF; refusing to inject it")]
    LineBreak {
        /// Where it was read from.
        path: PathBuf,
    },
    /// `systemd_credential` without `$CREDENTIALS_DIRECTORY`.
    #[error(
        "systemd credential {name}: $CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)"
    )]
    NoCredentialsDirectory {
        /// The credential name.
        name: String,
    },
}

/// A cache of secrets keyed by path, refreshed when the file's mtime, size or inode
/// changes (so an atomic rename of a new secret is picked up by the next request).
#[derive(Debug, Default)]
pub struct Secrets {
    cache: Mutex<HashMap<PathBuf, (FileStamp, String)>>,
}

type FileStamp = (Option<SystemTime>, u64, u64);

impl Secrets {
    /// The current value of a secret.
    pub fn get(&self, source: &SecretSource) -> Result<String, SecretError> {
        let path = match source {
            SecretSource::File(path) => path.clone(),
            SecretSource::Systemd(name) => std::env::var_os("CREDENTIALS_DIRECTORY")
                .map(|dir| PathBuf::from(dir).join(name))
                .ok_or_else(|| SecretError::NoCredentialsDirectory { name: name.clone() })?,
        };
        let meta = std::fs::metadata(&path).map_err(|source| SecretError::Read {
            path: path.clone(),
            source,
        })?;
        let stamp: FileStamp = (
            meta.modified().ok(),
            meta.len(),
            std::os::unix::fs::MetadataExt::ino(&meta),
        );
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, value)) = cache.get(&path)
            && *seen == stamp
        {
            return Ok(value.clone());
        }
        let raw = std::fs::read_to_string(&path).map_err(|source| SecretError::Read {
            path: path.clone(),
            source,
        })?;
        // One trailing newline (as editors and `echo` write) is not part of the secret.
        let value = raw.strip_suffix('\n').unwrap_or(&raw);
        let value = value.strip_suffix('\r').unwrap_or(value);
        if value.contains(['\r', '\n']) {
            return Err(SecretError::LineBreak { path });
        }
        cache.insert(path, (stamp, value.to_owned()));
        Ok(value.to_owned())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn reads_rotates_and_refuses_line_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "first\n").unwrap();
        let secrets = Secrets::default();
        let source = SecretSource::File(path.clone());
        assert_eq!(secrets.get(&source).unwrap(), "first");
        // Rotation by atomic rename: a new inode.
        let tmp = dir.path().join("key.tmp");
        std::fs::write(&tmp, "second").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(secrets.get(&source).unwrap(), "second");
        std::fs::write(&path, "bad\r\nX-Injected: 1").unwrap();
        let err = secrets.get(&source).unwrap_err();
        assert!(matches!(err, SecretError::LineBreak { .. }));
        assert!(
            !err.to_string().contains("bad"),
            "the value never appears in errors"
        );
        let missing = SecretSource::File(dir.path().join("missing"));
        assert!(secrets.get(&missing).is_err());
    }
}
