//! Configuration reload, on SIGHUP or `POST /reload` (admin listener).
//!
//! The file, the environment and the flags the process started with are read again and validated as a whole. An
//! invalid result is refused with a log line naming the bad key, and the running configuration stays. A valid one
//! applies its [`RELOADABLE`] keys to the requests that start from then on (the engine's policy is swapped in one
//! atomic store; connections, keys in flight and the store stay as they are). Any other key that changed is
//! named in a "needs restart" log line and left as it was.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::config::{ConfigError, Flags, Settings, KEYS};
use crate::metrics::{self, ReloadResult};
use crate::proxy::Proxy;

/// The keys a reload applies: what the engine decides with. Everything else (listeners, store, upstreams,
/// limits the listeners were built with, …) needs a restart.
pub const RELOADABLE: &[&str] = &[
    "routes",
    "window",
    "idempotency_key_window",
    "wait_timeout",
    "after_delivery",
    "on_store_error",
    "keep_business_errors",
    "resolve_after",
];

/// Where the settings came from, to read them again.
#[derive(Clone, Debug, Default)]
pub struct Source {
    pub file: Option<PathBuf>,
    pub flags: Flags,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Reloadable keys with a new value, now in effect.
    pub changed: Vec<&'static str>,
    /// Keys with a new value that only a restart applies; left as they were.
    pub needs_restart: Vec<&'static str>,
}

/// Reloads the running configuration.
pub struct Reloader {
    source: Source,
    /// The settings in effect; a lock also keeps two reloads from interleaving.
    current: Mutex<Settings>,
    proxy: Arc<Proxy>,
}

impl Reloader {
    pub fn new(source: Source, current: Settings, proxy: Arc<Proxy>) -> Reloader {
        Reloader {
            source,
            current: Mutex::new(current),
            proxy,
        }
    }

    /// Reads and applies the configuration again; logs what happened either way.
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
        let loaded = Settings::load(
            self.source.file.as_deref(),
            |key| std::env::var(key).ok(),
            &self.source.flags,
        );
        let new = match loaded {
            Ok(new) => new,
            Err(err) => {
                metrics::get().reload(ReloadResult::refused);
                tracing::error!(%err, "configuration reload refused: the running configuration stays");
                return Err(err);
            }
        };
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let (next, reloaded) = merge(&current, &new);
        self.proxy.guard().reload(&next);
        *current = next;
        metrics::get().reload(ReloadResult::applied);
        tracing::info!(changed = ?reloaded.changed, "configuration reloaded");
        if !reloaded.needs_restart.is_empty() {
            tracing::warn!(
                keys = ?reloaded.needs_restart,
                "configuration reload: needs restart to apply these changed settings; left as they were"
            );
        }
        Ok(reloaded)
    }
}

/// `current` with the reloadable keys of `new`, and which keys differ.
fn merge(current: &Settings, new: &Settings) -> (Settings, Reloaded) {
    let (before, after) = (as_table(current), as_table(new));
    let mut reloaded = Reloaded::default();
    for key in KEYS {
        if before.get(*key) != after.get(*key) {
            if RELOADABLE.contains(key) {
                reloaded.changed.push(key);
            } else {
                reloaded.needs_restart.push(key);
            }
        }
    }
    let next = Settings {
        routes: new.routes.clone(),
        window: new.window,
        idempotency_key_window: new.idempotency_key_window,
        wait_timeout: new.wait_timeout,
        after_delivery: new.after_delivery,
        on_store_error: new.on_store_error,
        keep_business_errors: new.keep_business_errors,
        resolve_after: new.resolve_after,
        ..current.clone()
    };
    (next, reloaded)
}

fn as_table(settings: &Settings) -> toml::Table {
    toml::Table::try_from(settings).unwrap_or_default()
}

/// A future that reloads on every SIGHUP. The handler is installed when this is called, not when the future is
/// first polled, so a SIGHUP once serving started cannot take the default action (ending the process).
#[cfg(unix)]
pub fn hangups(reloader: Arc<Reloader>) -> Option<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(err) => {
            tracing::warn!(%err, "cannot listen for SIGHUP; reload with POST /reload on the admin listener");
            return None;
        }
    };
    Some(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            let _ = reloader.reload();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;
    use std::time::Duration;

    #[test]
    fn reloadable_keys_apply_and_the_others_are_named_and_kept() {
        let current = Settings {
            upstreams: vec!["http://a:1".parse().unwrap()],
            ..Settings::default()
        };
        let mut new = current.clone();
        new.window = Dur(Duration::from_secs(5));
        new.listen = "127.0.0.1:1".parse().unwrap();
        new.upstreams = vec!["http://b:1".parse().unwrap()];
        let (next, reloaded) = merge(&current, &new);
        assert_eq!(next.window, new.window);
        assert_eq!(next.listen, current.listen);
        assert_eq!(next.upstreams, current.upstreams);
        assert_eq!(reloaded.changed, vec!["window"]);
        assert_eq!(reloaded.needs_restart, vec!["listen", "upstreams"]);
    }
}
