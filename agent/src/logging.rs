//! Where the agent's logs go: the journal, natively, when stderr is the journal; stderr
//! otherwise.
//!
//! systemd sets `JOURNAL_STREAM=DEV:INODE` for a service whose stderr is connected to the
//! journal. When stderr is that stream (compared with `fstat(2)`, as systemd.exec(5)
//! advises, so `scopegate … 2>file` from a unit still logs to the file), events are sent
//! with the journal's native protocol (tracing-journald): one entry each, `PRIORITY` from
//! the level (error 3, warn 4, info 5, debug 6, trace 7), the event's fields as
//! `F_<NAME>` fields, `SYSLOG_IDENTIFIER=scopegate`, and no timestamp in `MESSAGE` (the
//! journal has its own). Otherwise lines go to stderr as before (with timestamps).
//!
//! `SCOPEGATE_LOG` sets the filter (default `info`).
#![forbid(unsafe_code)]

use std::os::fd::AsFd as _;

use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

/// Installs the global subscriber (journal or stderr); returns whether it is the journal.
pub fn init() -> bool {
    let filter =
        || EnvFilter::try_from_env("SCOPEGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let mut fallback = None;
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layer.with_syslog_identifier("scopegate".into()))
                    .init();
                return true;
            }
            Err(e) => fallback = Some(e),
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter())
        .init();
    if let Some(e) = fallback {
        tracing::warn!(error = %e, "JOURNAL_STREAM is set but the journal socket cannot be used; logging to stderr");
    }
    false
}

/// Whether `JOURNAL_STREAM` names the file stderr is.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(parse_journal_stream) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr().as_fd())
        .is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// Parses `JOURNAL_STREAM`: `DEV:INODE`, both decimal.
pub fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.split_once(':')?;
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    Some((number(dev)?, number(ino)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_dev_colon_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("0:0"), Some((0, 0)));
        for bad in [
            "",
            ":",
            "8:",
            ":5",
            "8",
            "8:5:1",
            "a:5",
            "8:-5",
            "+8:5",
            " 8:5",
            "8:5 ",
            "99999999999999999999:1",
        ] {
            assert_eq!(parse_journal_stream(bad), None, "{bad:?}");
        }
    }
}
