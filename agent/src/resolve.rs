//! Name resolution for destination binding: which addresses a policy's host name stands
//! for right now. Shared by every request, below the request stages.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::identify::normalize;

/// A small DNS cache for confirming destination names.
#[derive(Debug, Default)]
pub struct Resolver {
    cache: Mutex<HashMap<(String, u16), Resolved>>,
}

/// When a name was resolved, and to what.
type Resolved = (Instant, Vec<IpAddr>);

/// How long a resolution is trusted.
const DNS_TTL: Duration = Duration::from_secs(30);

impl Resolver {
    /// The addresses of `name` (cached for a short time).
    pub async fn resolve(&self, name: &str, port: u16) -> Result<Vec<IpAddr>, String> {
        let key = (name.to_owned(), port);
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .filter(|(at, _)| at.elapsed() < DNS_TTL)
            .map(|(_, ips)| ips.clone());
        if let Some(ips) = cached {
            return Ok(ips);
        }
        let ips: Vec<IpAddr> = tokio::net::lookup_host((name, port))
            .await
            .map_err(|e| format!("resolving {name}: {e}"))?
            .map(|a| normalize(a).ip())
            .collect();
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (Instant::now(), ips.clone()));
        Ok(ips)
    }
}
