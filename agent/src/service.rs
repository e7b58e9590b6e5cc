//! The systemd service manager protocol (`sd_notify`): `STATUS=` lines for each start-up
//! phase, `READY=1` once managed connects are decided, `RELOADING=1`/`READY=1` around a
//! reload, `STOPPING=1` at shutdown, and `WATCHDOG=1` pings when the unit sets
//! `WatchdogSec=`.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op. A notification that
//! cannot be sent is logged, never fatal: enforcement does not depend on the manager.
#![forbid(unsafe_code)]

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// `STATUS=<text>`: what the agent is doing now.
pub fn status(text: &str) {
    tracing::debug!(status = text, "service status");
    send(&[NotifyState::Status(text)]);
}

/// `READY=1` with a final `STATUS=`. Call only once managed connects are decided.
pub fn ready(text: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(text)]);
}

/// `RELOADING=1` (with the monotonic timestamp systemd requires for `Type=notify-reload`).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`.
pub fn stopping(text: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(text)]);
}

/// The watchdog interval the manager asked for (`WATCHDOG_USEC` for this process), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Sends `WATCHDOG=1`.
pub fn watchdog_ping() {
    send(&[NotifyState::Watchdog]);
}
