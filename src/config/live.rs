//! The configuration in force. A reload (SIGHUP) replaces it whole: requests and new runs read
//! the snapshot current when they start, and keep it to their end.

use std::sync::{Arc, OnceLock, RwLock};

use super::Config;
use crate::auth::Auth;

/// What a reload replaces, as one value.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated configuration (module catalog, limits, timeouts).
    pub config: Arc<Config>,
    /// Its API tokens and the anonymous policy.
    pub auth: Arc<Auth>,
    /// The parent environment variables a child may inherit (`runner.env_allow`), read once
    /// per snapshot.
    pub base_env: Arc<Vec<(String, String)>>,
}

/// The snapshot in force.
#[derive(Debug)]
pub struct Live {
    /// A std `RwLock`: readers only clone the `Arc` (never held across `.await`), a reload
    /// swaps it; neither waits for anything else under it.
    current: RwLock<Arc<Snapshot>>,
    /// The address the server listens on, once bound (the anonymous policy depends on it).
    bound: OnceLock<std::net::IpAddr>,
}

impl Live {
    /// Start with `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            current: RwLock::new(Arc::new(snapshot)),
            bound: OnceLock::new(),
        }
    }

    /// The snapshot in force now.
    pub fn get(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Put `next` in force; returns the one it replaces.
    pub fn replace(&self, next: Snapshot) -> Arc<Snapshot> {
        let next = Arc::new(next);
        std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            next,
        )
    }

    /// Record the address the server listens on (the first one counts).
    pub fn set_bound(&self, ip: std::net::IpAddr) {
        let _ = self.bound.set(ip);
    }

    /// The address the server listens on, once known.
    pub fn bound(&self) -> Option<std::net::IpAddr> {
        self.bound.get().copied()
    }
}
