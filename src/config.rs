//! Settings: defaults < `config/runonce.toml`-style file < `RUNONCE_*` environment < command-line flags.
//!
//! Every key is declared once, in the `settings!` table below, which gives it its type, default, flag and
//! `RUNONCE_<KEY>` variable. Each layer is read on its own so that an error names where the bad value came
//! from (the file's key and line, the variable, or the flag); the merged result is validated once, before
//! anything binds. A bad setting is a [`ConfigError`], and the binary exits with 64 (`EX_USAGE`).
//!
//! The environment is passed in as a lookup function so tests never touch the process environment.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Exit status for a refused configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// A setting that cannot be used: which one, what it was, and why.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {key} = {value:?}: {reason}")]
pub struct ConfigError {
    /// The key as the user wrote it: `body_limit`, `RUNONCE_BODY_LIMIT` or `--body-limit`.
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(
        key: impl Into<String>,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            key: key.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Declares every key once: doc, name, type, default, and the long flag that sets it. Keys in the second
/// group are tables, set in the file only.
macro_rules! settings {
    (
        $( $(#[doc = $doc:literal])* $key:ident : $ty:ty = $default:expr, flag $flag:literal; )*
        ; file only:
        $( $(#[doc = $tdoc:literal])* $tkey:ident : $tty:ty = $tdefault:expr; )*
    ) => {
        /// One layer of settings (the file, the environment or the flags): every key optional.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Layer { $( $key: Option<$ty>, )* $( $tkey: Option<$tty>, )* }

        impl Layer {
            /// `self` wins over `lower` key by key.
            fn over(self, lower: Layer) -> Layer {
                Layer { $( $key: self.$key.or(lower.$key), )* $( $tkey: self.$tkey.or(lower.$tkey), )* }
            }
        }

        /// The effective settings, after layering and validation.
        #[derive(Clone, Debug, Serialize)]
        pub struct Settings {
            $( $(#[doc = $doc])* pub $key: $ty, )*
            $( $(#[doc = $tdoc])* pub $tkey: $tty, )*
        }

        impl Settings {
            fn from_layer(layer: Layer) -> Settings {
                Settings {
                    $( $key: layer.$key.unwrap_or_else(|| $default), )*
                    $( $tkey: layer.$tkey.unwrap_or_else(|| $tdefault), )*
                }
            }
        }

        /// Flags that override a setting (`runonce serve --help` lists them).
        #[derive(Clone, Debug, Default, clap::Args)]
        pub struct Flags {
            $( $(#[doc = $doc])* #[arg(long = $flag, value_name = "VALUE")] $key: Vec<String>, )*
        }

        impl Flags {
            /// `(key, "--flag", values)` for every flag given.
            fn entries(&self) -> Vec<(&'static str, String, Vec<String>)> {
                let mut out = Vec::new();
                $( if !self.$key.is_empty() {
                    out.push((stringify!($key), concat!("--", $flag).to_string(), self.$key.clone()));
                } )*
                out
            }
        }

        /// Every key, in table order.
        pub const KEYS: &[&str] = &[$( stringify!($key), )* $( stringify!($tkey), )*];

        /// The keys that have a flag and a `RUNONCE_*` variable.
        const SCALAR_KEYS: &[&str] = &[$( stringify!($key), )*];
    };
}

settings! {
    /// Address the proxy listens on (HTTP/1.1).
    listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7700)), flag "listen";
    /// Address of the admin listener (/healthz, /readyz, /metrics, /keys, /reload). Loopback by default.
    admin_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 9700)), flag "admin-listen";
    /// PowerJob servers, tried in order when one cannot be reached (http://host:port[/prefix]).
    upstreams: Vec<UpstreamUrl> = Vec::new(), flag "upstream";
    /// `repair`: every 200 answer to /openApi/** carries `X-POWERJOB-AUTH-PASSED: true` in exact case unless the
    /// server said false. `preserve`: headers pass as the server sent them.
    auth_header: AuthHeader = AuthHeader::Repair, flag "auth-header";
    /// Largest request body (413 above it), checked while streaming.
    body_limit: ByteSize = ByteSize::mib(4), flag "body-limit";
    /// Largest request head: request line and headers (431 above it).
    max_header_bytes: ByteSize = ByteSize::kib(32), flag "max-header-bytes";
    /// Most request headers (431 above it).
    max_headers: Count = Count(50), flag "max-headers";
    /// Time a client has to send a whole request head; then the connection is closed.
    header_read_timeout: Dur = Dur::secs(10), flag "header-read-timeout";
    /// Most client connections at once; further ones wait in the listen backlog.
    max_connections: Count = Count(10_000), flag "max-connections";
    /// Threads serving client connections, each with its own upstream connections (thread-per-core); 0: one per
    /// CPU core.
    workers: Count = Count(0), flag "workers";
    /// Run the worker threads under Linux's `SCHED_BATCH` policy: a worker woken by a socket waits for the
    /// thread on its CPU to end its turn instead of preempting it (their fair share of CPU is unchanged). false:
    /// the normal policy.
    batch_scheduling: Switch = Switch(true), flag "batch-scheduling";
    /// Forward plain pass-through requests with runonce's own HTTP/1.1 code (the fast lane) instead of hyper's;
    /// anything else on the connection still goes through hyper. Only without TLS and access rules.
    fast_lane: Switch = Switch(true), flag "fast-lane";
    /// Time to open a connection to one upstream before trying the next.
    connect_timeout: Dur = Dur::secs(1), flag "connect-timeout";
    /// Time an upstream has to answer (response head) once the request was sent: 504 after it, never re-sent.
    upstream_timeout: Dur = Dur::secs(30), flag "upstream-timeout";
    /// Idle keep-alive connections kept per upstream and worker thread.
    upstream_max_idle: Count = Count(256), flag "upstream-max-idle";
    /// An idle upstream connection older than this is not reused.
    upstream_idle_timeout: Dur = Dur::secs(30), flag "upstream-idle-timeout";
    /// Log output: `text` or `json`. The filter comes from RUNONCE_LOG or RUST_LOG (default `info`).
    log_format: LogFormat = LogFormat::Text, flag "log-format";
    /// Where guarded keys live: `memory` (this process), `redis://host:port/db`, `rediss://…`, or
    /// `redis+cluster://host:port,host:port` (shared by every replica).
    store: StoreUrl = StoreUrl::Memory, flag "store";
    /// Longest a single store operation (one Redis round trip) may take before it counts as a store error.
    store_timeout: Dur = Dur::secs(1), flag "store-timeout";
    /// Most records the memory store holds; settled ones closest to expiry make room.
    memory_max_keys: Count = Count(6_000), flag "memory-max-keys";
    /// When the store fails on a guarded route: `fail-closed` (503, nothing forwarded) or `fail-open` (forward,
    /// de-duplicating within this process only). Routes may override it.
    on_store_error: OnStoreError = OnStoreError::FailClosed, flag "on-store-error";
    /// How long a fingerprinted answer is kept (duplicates within it are retries). Routes may override it.
    window: Dur = Dur::secs(60), flag "window";
    /// How long an answer keyed by an `Idempotency-Key` header is kept.
    idempotency_key_window: Dur = Dur::secs(24 * 3600), flag "idempotency-key-window";
    /// How long a duplicate waits for the first request's answer; then 409 with Retry-After.
    wait_timeout: Dur = Dur::secs(30), flag "wait-timeout";
    /// A leader's lease on its key, renewed every third of it while the upstream call runs. A lease that runs
    /// out (runonce died mid-call) leaves the key `unknown`: never re-run automatically.
    lease: Dur = Dur::secs(10), flag "lease";
    /// How long a leader's answer waits for the client's connection to confirm it took it (the next request,
    /// or a close without a reset); a connection that stays open without a reset this long took it. Until
    /// then identical calls wait; an answer the client did not take is replayed to its retry.
    delivery_grace: Dur = Dur::millis(250), flag "delivery-grace";
    /// How long after a `runJob` turned unknown runonce asks PowerJob (`queryInstance`, 5.1.1+) whether it
    /// created an instance: longer than the server's worst creation path (a 5 s forward, a dispatch).
    resolve_after: Dur = Dur::secs(15), flag "resolve-after";
    /// After the store lost its records (Redis flushed, restarted or failed over; a memory store that just
    /// started), for the route's `window` a new `runJob` leader first asks PowerJob (`queryInstance`) for
    /// the instance a forgotten earlier copy of its call created, and answers with it instead of sending.
    quarantine: Switch = Switch(true), flag "quarantine";
    /// An identical call after a client received the answer: `new-call` (runs again) or `replay`. Routes may
    /// override it.
    after_delivery: AfterDelivery = AfterDelivery::NewCall, flag "after-delivery";
    /// Whether a `success:false` answer is kept (replayed to duplicates) instead of released.
    keep_business_errors: Switch = Switch(false), flag "keep-business-errors";
    // ---- Operations: admin key API and /reload access, graceful shutdown (README "Operations") ----
    /// Bearer token that /keys and /reload on the admin listener require (`Authorization: Bearer TOKEN`). Empty:
    /// none, and then those endpoints answer only while admin_listen is a loopback address. Prefer
    /// RUNONCE_ADMIN_TOKEN to the flag (flags show in `ps`).
    admin_token: Secret = Secret::default(), flag "admin-token";
    /// On SIGTERM/SIGINT: /readyz turns 503 and no new connection is taken; in-flight requests (leaders' upstream
    /// calls included) get this long to finish. A leader still waiting then is cut off: its key turns unknown.
    drain_timeout: Dur = Dur::secs(30), flag "drain-timeout";
    // ---- Security: access control and TLS toward clients (see README "Security") ----
    /// Source networks allowed on the proxy listener (CIDRs or addresses); empty: any. Every request.
    allow_networks: Vec<Network> = Vec::new(), flag "allow-network";
    /// App ids allowed on /openApi/** (the X-POWERJOB-APP-ID header and every appId the request names); empty:
    /// any.
    allow_apps: Vec<AppId> = Vec::new(), flag "allow-app";
    /// A header every /openApi/** request must carry with `shared_secret` as its value; empty: off.
    shared_secret_header: String = String::new(), flag "shared-secret-header";
    /// The shared secret (at least 16 characters); never logged or printed.
    shared_secret: Secret = Secret::default(), flag "shared-secret";
    /// TLS toward clients: the certificate chain (PEM file); with `tls_key`. Empty: plain HTTP.
    tls_cert: String = String::new(), flag "tls-cert";
    /// TLS toward clients: the certificate's private key (PEM file).
    tls_key: String = String::new(), flag "tls-key";
    // ---- Hostile input (reliability issue) ----
    /// Time a client has to send the whole body of a guarded call once its head arrived (the slowloris guard
    /// for bodies runonce reads whole); then 408 and the connection is closed. Other bodies stream, bounded by
    /// `upstream_timeout`.
    body_read_timeout: Dur = Dur::secs(30), flag "body-read-timeout";
    ; file only:
    /// Per-route overrides, `[routes.runJob]` etc.: `enabled`, `window`, `fields`, `after_delivery`,
    /// `on_store_error`. Routes not named keep their defaults; see `config/runonce.toml`.
    routes: std::collections::BTreeMap<String, RouteSettings> = Default::default();
}

/// Keys whose value is a list: several flags, or a comma-separated variable.
const LIST_KEYS: &[&str] = &["upstreams", "allow_networks", "allow_apps"];

/// Every key at its default (no upstream: not valid for `serve` as it is; a base for tests and the demo).
impl Default for Settings {
    fn default() -> Settings {
        Settings::from_layer(Layer::default())
    }
}

impl Settings {
    /// Layers the file (if any), the environment (through `env`) and the flags over the defaults, then validates.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        flags: &Flags,
    ) -> Result<Settings, ConfigError> {
        let file_layer = match file {
            Some(path) => read_file(path)?,
            None => Layer::default(),
        };
        let env_layer = from_entries(SCALAR_KEYS.iter().filter_map(|key| {
            let var = env_var(key);
            let raw = env(&var)?;
            let values = if LIST_KEYS.contains(key) {
                raw.split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(String::from)
                    .collect()
            } else {
                vec![raw]
            };
            Some((*key, var, values))
        }))?;
        let flag_layer = from_entries(flags.entries())?;
        let settings = Settings::from_layer(flag_layer.over(env_layer).over(file_layer));
        settings.validate()?;
        Ok(settings)
    }

    /// The settings of a config file's text alone (no environment, no flags), validated: what
    /// `runonce check-config` does with a file, and the entry point of the config fuzz target.
    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        let layer = parse_file("(text)", text)?;
        let settings = Settings::from_layer(layer);
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.upstreams.is_empty() {
            return Err(ConfigError::new(
                "upstreams",
                "[]",
                "at least one upstream is required (--upstream URL)",
            ));
        }
        // Port 0 asks the system for a free port, so two port-0 addresses do not clash.
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return Err(ConfigError::new(
                "admin_listen",
                self.admin_listen,
                "must differ from listen",
            ));
        }
        let positive: [(&str, u64); 18] = [
            ("resolve_after", self.resolve_after.0.as_millis() as u64),
            ("delivery_grace", self.delivery_grace.0.as_millis() as u64),
            ("memory_max_keys", self.memory_max_keys.0 as u64),
            ("store_timeout", self.store_timeout.0.as_millis() as u64),
            ("window", self.window.0.as_millis() as u64),
            (
                "idempotency_key_window",
                self.idempotency_key_window.0.as_millis() as u64,
            ),
            ("wait_timeout", self.wait_timeout.0.as_millis() as u64),
            ("lease", self.lease.0.as_millis() as u64),
            ("body_limit", self.body_limit.as_u64()),
            ("max_header_bytes", self.max_header_bytes.as_u64()),
            ("max_headers", self.max_headers.0 as u64),
            ("max_connections", self.max_connections.0 as u64),
            (
                "header_read_timeout",
                self.header_read_timeout.0.as_millis() as u64,
            ),
            ("connect_timeout", self.connect_timeout.0.as_millis() as u64),
            (
                "upstream_timeout",
                self.upstream_timeout.0.as_millis() as u64,
            ),
            (
                "upstream_idle_timeout",
                self.upstream_idle_timeout.0.as_millis() as u64,
            ),
            ("drain_timeout", self.drain_timeout.0.as_millis() as u64),
            (
                "body_read_timeout",
                self.body_read_timeout.0.as_millis() as u64,
            ),
        ];
        if let Some((key, value)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::new(*key, value, "must be greater than zero"));
        }
        // A leader's whole call is bounded by upstream_timeout; a duplicate waiting for it must see its end,
        // or it is told 409 while the call may still succeed.
        if self.wait_timeout.0 < self.upstream_timeout.0 {
            return Err(ConfigError::new(
                "wait_timeout",
                self.wait_timeout,
                format!(
                    "must be at least upstream_timeout ({}): a duplicate waits for the whole leader call",
                    self.upstream_timeout
                ),
            ));
        }
        // The key stays in flight while the answer's delivery is confirmed, after the last renewal.
        if self.delivery_grace.0 * 3 > self.lease.0 {
            return Err(ConfigError::new(
                "delivery_grace",
                self.delivery_grace,
                format!("must be at most a third of lease ({})", self.lease),
            ));
        }
        // The leader renews every third of its lease, and a renewal may take up to store_timeout.
        if self.lease.0 < self.store_timeout.0 * 2 {
            return Err(ConfigError::new(
                "lease",
                self.lease,
                format!(
                    "must be at least twice store_timeout ({})",
                    self.store_timeout
                ),
            ));
        }
        // hyper's own backstop is twice these (see server.rs); keep it within what hyper accepts.
        if self.max_header_bytes.as_u64() > 1024 * 1024 {
            return Err(ConfigError::new(
                "max_header_bytes",
                self.max_header_bytes,
                "must be at most 1 MiB",
            ));
        }
        for (name, route) in &self.routes {
            let key = format!("routes.{name}");
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(ConfigError::new(
                    key,
                    name,
                    "a route is an OpenAPI endpoint name such as runJob",
                ));
            }
            if route.resolve == Some(true) && name != "runJob" {
                return Err(ConfigError::new(
                    format!("{key}.resolve"),
                    "true",
                    "PowerJob's OpenAPI can look up runJob's instances only (queryInstance)",
                ));
            }
            if route.window.is_some_and(|w| w.0.is_zero()) {
                return Err(ConfigError::new(
                    format!("{key}.window"),
                    "0s",
                    "must be greater than zero",
                ));
            }
            if route
                .fields
                .as_ref()
                .is_some_and(|f| f.iter().any(String::is_empty))
            {
                return Err(ConfigError::new(
                    format!("{key}.fields"),
                    "\"\"",
                    "field names must not be empty",
                ));
            }
        }
        if self.max_headers.0 > 1000 {
            return Err(ConfigError::new(
                "max_headers",
                self.max_headers.0,
                "must be at most 1000",
            ));
        }
        self.validate_security()
    }

    /// The access-control and TLS keys. The TLS files are read and checked here, so `check-config` and a
    /// refused start name the key of a file that will not do.
    fn validate_security(&self) -> Result<(), ConfigError> {
        let (header, secret) = (self.shared_secret_header.trim(), &self.shared_secret.0);
        match (header.is_empty(), secret.is_empty()) {
            (true, true) => {}
            (false, true) => {
                return Err(ConfigError::new(
                    "shared_secret",
                    "",
                    "shared_secret_header is set, so shared_secret is required",
                ))
            }
            (true, false) => {
                return Err(ConfigError::new(
                    "shared_secret_header",
                    "",
                    "shared_secret is set, so the header that carries it is required",
                ))
            }
            (false, false) => {
                let reserved = header.to_ascii_lowercase().starts_with("x-powerjob-")
                    || RESERVED_HEADERS.contains(&header.to_ascii_lowercase().as_str());
                if http::HeaderName::from_bytes(header.as_bytes()).is_err() || reserved {
                    return Err(ConfigError::new(
                        "shared_secret_header",
                        header,
                        "must be a header name of its own, such as X-Runonce-Secret",
                    ));
                }
                // The value is never shown, only why it will not do.
                if secret.chars().count() < 16
                    || http::HeaderValue::from_str(secret).is_err()
                    || secret.trim() != secret
                {
                    return Err(ConfigError::new(
                        "shared_secret",
                        Secret::REDACTED,
                        "must be at least 16 visible ASCII characters, without leading or trailing spaces",
                    ));
                }
            }
        }
        crate::tls::server_config(self).map(|_| ())
    }

    /// The settings as TOML, for `runonce check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|err| format!("# cannot render settings: {err}\n"))
    }
}

/// `body_limit` → `RUNONCE_BODY_LIMIT`.
pub fn env_var(key: &str) -> String {
    format!("RUNONCE_{}", key.to_ascii_uppercase())
}

/// Every `RUNONCE_<KEY>` variable a setting is read from (deployment files are checked against this list).
pub fn env_vars() -> Vec<String> {
    SCALAR_KEYS.iter().map(|key| env_var(key)).collect()
}

/// The `RUNONCE_*` names among `names` that runonce does not read: a typo or a renamed setting, which would
/// otherwise be ignored without a word. `RUNONCE_CONFIG` (the file) and `RUNONCE_LOG` (the filter) are read too.
pub fn unknown_env_vars(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let known = env_vars();
    names
        .into_iter()
        .filter(|name| name.starts_with("RUNONCE_"))
        .filter(|name| name != "RUNONCE_CONFIG" && name != "RUNONCE_LOG" && !known.contains(name))
        .collect()
}

fn read_file(path: &Path) -> Result<Layer, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|err| ConfigError::new("config", &name, err.to_string()))?;
    parse_file(&name, &text)
}

fn parse_file(name: &str, text: &str) -> Result<Layer, ConfigError> {
    // toml's message names the key and shows the line.
    toml::from_str(text).map_err(|err| ConfigError::new(name, "(file)", err.to_string().trim()))
}

/// Builds a layer from `(key, source, values)`, one key at a time so an error names its source.
fn from_entries(
    entries: impl IntoIterator<Item = (&'static str, String, Vec<String>)>,
) -> Result<Layer, ConfigError> {
    let mut layer = Layer::default();
    for (key, source, mut values) in entries {
        let shown = values.join(",");
        let value = if LIST_KEYS.contains(&key) {
            toml::Value::Array(values.into_iter().map(toml::Value::String).collect())
        } else {
            // A repeated scalar flag: the last one wins, as with most CLIs.
            toml::Value::String(values.pop().unwrap_or_default())
        };
        let mut table = toml::Table::new();
        table.insert(key.to_string(), value);
        let one: Layer = toml::Value::Table(table)
            .try_into()
            .map_err(|err: toml::de::Error| {
                ConfigError::new(source, shown, err.message().trim())
            })?;
        layer = one.over(layer);
    }
    Ok(layer)
}

/// Header names `shared_secret_header` must not take: the protocol's own.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "content-type",
    "transfer-encoding",
    "te",
    "upgrade",
    "authorization",
    "idempotency-key",
];

/// A source network in `allow_networks`: a CIDR (`10.0.0.0/8`, `fd00::/8`) or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network(pub ipnet::IpNet);

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            // `10.1.2.3/8` means 10.0.0.0/8; say it as such when printed.
            return Ok(Network(net.trunc()));
        }
        s.parse::<std::net::IpAddr>()
            .map(|ip| Network(ip.into()))
            .map_err(|_| {
                format!("{s:?} is not a network: write a CIDR such as 10.0.0.0/8 or an address")
            })
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Network {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A PowerJob app id in `allow_apps`: a decimal number (PowerJob's ids are `Long`s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct AppId(pub u64);

impl<'de> Deserialize<'de> for AppId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumOrText::deserialize(d)? {
            NumOrText::Num(n) => Ok(AppId(n)),
            NumOrText::Text(text) => {
                let text = text.trim();
                text.bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| text.parse().ok())
                    .flatten()
                    .map(AppId)
                    .ok_or_else(|| {
                        serde::de::Error::custom(format!(
                            "{text:?} is not an app id (a decimal number)"
                        ))
                    })
            }
        }
    }
}

/// A secret setting (the admin token, the shared secret): shown as `(redacted)` wherever settings are printed
/// or logged, so it cannot reach a log line or `check-config` output by accident.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub const REDACTED: &'static str = "(redacted)";

    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }

    /// SHA-256 of the secret: what runonce keeps to compare against, with [`Secret::matches`].
    pub fn digest(&self) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(self.0.as_bytes()).into()
    }

    /// Whether `given` is the secret whose digest is `expected`: digests compare in constant time, whatever the
    /// lengths.
    pub fn matches(expected: &[u8; 32], given: &[u8]) -> bool {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        let digest: [u8; 32] = sha2::Sha256::digest(given).into();
        digest.ct_eq(expected).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            ""
        } else {
            Self::REDACTED
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() {
            ""
        } else {
            Self::REDACTED
        })
    }
}

/// An upstream PowerJob server: `http://host:port` with an optional path prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `host:port`, as dialled and as the `Host` of requests that carry none.
    pub authority: String,
    /// Path prefix put before every forwarded path, without a trailing slash (often empty).
    pub base: String,
}

impl std::str::FromStr for UpstreamUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s.parse().map_err(|err| format!("not a URL: {err}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => return Err(format!("scheme {other} is not supported; use http://")),
            None => return Err("needs a scheme: http://host:port".into()),
        }
        let authority = uri.authority().ok_or("needs a host: http://host:port")?;
        if uri.query().is_some() {
            return Err("must not have a query".into());
        }
        let port = authority.port_u16().unwrap_or(80);
        Ok(UpstreamUrl {
            authority: format!("{}:{port}", authority.host()),
            base: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.base)
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for UpstreamUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where guarded keys live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    Memory,
    /// `redis://`, `rediss://`, `redis+cluster://` or `rediss+cluster://`, as given.
    Redis(String),
}

impl std::str::FromStr for StoreUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "memory" {
            return Ok(StoreUrl::Memory);
        }
        const SCHEMES: [&str; 4] = [
            "redis://",
            "rediss://",
            "redis+cluster://",
            "rediss+cluster://",
        ];
        if SCHEMES
            .iter()
            .any(|scheme| s.starts_with(scheme) && s.len() > scheme.len())
        {
            return Ok(StoreUrl::Redis(s.to_string()));
        }
        Err("expected `memory`, redis://host:port/db, rediss://…, or redis+cluster://host:port,host:port".into())
    }
}

impl StoreUrl {
    /// The URL with any password replaced by `***`, for logs and error messages.
    pub fn redacted(&self) -> String {
        let StoreUrl::Redis(url) = self else {
            return self.to_string();
        };
        // `scheme://[user[:password]@]host…`: the userinfo ends at the last `@` before the path.
        let Some((scheme, rest)) = url.split_once("://") else {
            return url.clone();
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        match rest[..authority_end].rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                let secret = if userinfo.contains(':') || !user.is_empty() {
                    ":***"
                } else {
                    ""
                };
                format!(
                    "{scheme}://{user}{secret}@{hosts}{}",
                    &rest[authority_end..]
                )
            }
            None => url.clone(),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Memory => f.write_str("memory"),
            StoreUrl::Redis(url) => f.write_str(url),
        }
    }
}

impl<'de> Deserialize<'de> for StoreUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for StoreUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What a guarded route does when the store fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnStoreError {
    FailClosed,
    FailOpen,
}

/// An identical call after a client received the answer in full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterDelivery {
    /// A deliberate repeat: forwarded, and it creates another instance.
    NewCall,
    /// Treated as a retry: the stored answer is replayed for the whole window.
    Replay,
}

/// Overrides for one guarded route (`[routes.runJob]`); unset keys take the global value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// `false` passes the route through unguarded; `true` guards a route runonce does not guard by default.
    pub enabled: Option<bool>,
    pub window: Option<Dur>,
    /// The body fields that make the fingerprint (default: all of them). The app id is always part of it.
    pub fields: Option<Vec<String>>,
    pub after_delivery: Option<AfterDelivery>,
    pub on_store_error: Option<OnStoreError>,
    /// Ask PowerJob what an unknown call created (`queryInstance`, 5.1.1+); only `runJob` has a lookup, and
    /// it is on by default there.
    pub resolve: Option<bool>,
}

/// What happens to `X-POWERJOB-AUTH-PASSED` on the way back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthHeader {
    Repair,
    Preserve,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

/// A duration written as `500ms`, `10s`, `2m` (or a whole number of seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }

    const fn millis(ms: u64) -> Dur {
        Dur(Duration::from_millis(ms))
    }
}

/// The longest duration any setting takes. Durations are added to clock readings: a year is more than any of
/// them needs, and cannot overflow one. Bounded here, where every duration is parsed.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let duration = match NumOrText::deserialize(d)? {
            NumOrText::Num(secs) => Duration::from_secs(secs),
            NumOrText::Text(text) => humantime::parse_duration(text.trim()).map_err(|err| {
                serde::de::Error::custom(format!("{err} (write e.g. 500ms, 10s, 2m)"))
            })?,
        };
        if duration > MAX_DURATION {
            return Err(serde::de::Error::custom("must be at most 365 days"));
        }
        Ok(Dur(duration))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

/// A count, written as a number (or as text, as the environment and flags give it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Count(pub usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumOrText::deserialize(d)? {
            NumOrText::Num(n) => usize::try_from(n)
                .map(Count)
                .map_err(serde::de::Error::custom),
            NumOrText::Text(text) => text.trim().parse().map(Count).map_err(|_| {
                serde::de::Error::custom(format!("expected a whole number, got {text:?}"))
            }),
        }
    }
}

/// A yes/no setting, written `true`/`false` (or as text, as the environment and flags give it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Switch(pub bool);

impl<'de> Deserialize<'de> for Switch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum BoolOrText {
            Bool(bool),
            Text(String),
        }
        match BoolOrText::deserialize(d)? {
            BoolOrText::Bool(b) => Ok(Switch(b)),
            BoolOrText::Text(text) => match text.trim() {
                "true" => Ok(Switch(true)),
                "false" => Ok(Switch(false)),
                other => Err(serde::de::Error::custom(format!(
                    "expected true or false, got {other:?}"
                ))),
            },
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(u64),
    Text(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn flags(args: &[&str]) -> Flags {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            flags: Flags,
        }
        let mut argv = vec!["runonce"];
        argv.extend_from_slice(args);
        <Cli as clap::Parser>::parse_from(argv).flags
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn file(text: &str) -> tempfile_path::TempToml {
        tempfile_path::TempToml::new(text)
    }

    /// A TOML file in the system temp dir, removed on drop.
    mod tempfile_path {
        pub struct TempToml(pub std::path::PathBuf);
        impl TempToml {
            pub fn new(text: &str) -> Self {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let name = format!(
                    "runonce-cfg-{}-{}.toml",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                );
                let path = std::env::temp_dir().join(name);
                std::fs::write(&path, text).unwrap();
                TempToml(path)
            }
        }
        impl Drop for TempToml {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let f = file("upstreams = [\"http://a:7700\"]\nbody_limit = \"1MiB\"\nmax_headers = 10\nlisten = \"127.0.0.1:1\"\n");
        let s = Settings::load(
            Some(&f.0),
            env(&[
                ("RUNONCE_BODY_LIMIT", "2MiB"),
                ("RUNONCE_LISTEN", "127.0.0.1:2"),
            ]),
            &flags(&["--listen", "127.0.0.1:3"]),
        )
        .unwrap();
        assert_eq!(s.listen, "127.0.0.1:3".parse().unwrap());
        assert_eq!(s.body_limit, ByteSize::mib(2));
        assert_eq!(s.max_headers, Count(10));
        assert_eq!(s.upstream_timeout, Dur::secs(30));
        assert_eq!(s.upstreams, vec!["http://a:7700".parse().unwrap()]);
    }

    #[test]
    fn lists_come_from_repeated_flags_or_a_comma_separated_variable() {
        let s = Settings::load(
            None,
            env(&[("RUNONCE_UPSTREAMS", "http://a:1, http://b:2/pj/")]),
            &Flags::default(),
        )
        .unwrap();
        assert_eq!(s.upstreams.len(), 2);
        assert_eq!(s.upstreams[1].base, "/pj");
        let s = Settings::load(
            None,
            env(&[]),
            &flags(&["--upstream", "http://a:1", "--upstream", "http://c"]),
        )
        .unwrap();
        assert_eq!(s.upstreams[1].authority, "c:80");
    }

    #[test]
    fn errors_name_the_source_of_the_bad_value() {
        let e = Settings::load(
            None,
            env(&[
                ("RUNONCE_UPSTREAMS", "http://a:1"),
                ("RUNONCE_MAX_HEADERS", "many"),
            ]),
            &Flags::default(),
        )
        .unwrap_err();
        assert_eq!(e.key, "RUNONCE_MAX_HEADERS");
        assert!(e.reason.contains("whole number"), "{e}");

        let e = Settings::load(None, env(&[]), &flags(&["--upstream", "https://a:1"])).unwrap_err();
        assert_eq!(e.key, "--upstream");
        assert!(e.reason.contains("https"), "{e}");

        let e = Settings::load(
            None,
            env(&[]),
            &flags(&["--upstream", "http://a:1", "--auth-header", "fix"]),
        )
        .unwrap_err();
        assert_eq!(e.key, "--auth-header");

        let f = file("upstreams = [\"http://a:1\"]\nbody_limt = \"1MiB\"\n");
        let e = Settings::load(Some(&f.0), env(&[]), &Flags::default()).unwrap_err();
        assert!(e.reason.contains("body_limt"), "{e}");

        let e = Settings::load(None, env(&[]), &Flags::default()).unwrap_err();
        assert_eq!(e.key, "upstreams");

        let e = Settings::load(
            None,
            env(&[]),
            &flags(&["--upstream", "http://a:1", "--connect-timeout", "0s"]),
        )
        .unwrap_err();
        assert_eq!(e.key, "connect_timeout");
    }

    #[test]
    fn the_example_config_names_every_key_and_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/runonce.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = text.parse().unwrap();
        let mut in_file: Vec<&str> = table.keys().map(String::as_str).collect();
        in_file.sort_unstable();
        let mut keys = KEYS.to_vec();
        keys.sort_unstable();
        assert_eq!(in_file, keys, "config/runonce.toml must show every key");
        Settings::load(Some(&path), env(&[]), &Flags::default()).unwrap();
    }

    #[test]
    fn settings_render_back_to_toml_that_loads() {
        let s = Settings::load(
            None,
            env(&[]),
            &flags(&["--upstream", "http://a:1", "--drain-timeout", "1m 30s"]),
        )
        .unwrap();
        let f = file(&s.to_toml());
        let again = Settings::load(Some(&f.0), env(&[]), &Flags::default()).unwrap();
        assert_eq!(again.drain_timeout, Dur(Duration::from_secs(90)));
        assert_eq!(again.upstreams, s.upstreams);
    }

    #[test]
    fn store_urls_are_redacted_for_logs() {
        let url = |s: &str| s.parse::<StoreUrl>().unwrap().redacted();
        assert_eq!(url("redis://:s3cret@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(url("rediss://me:s3cret@h:6379"), "rediss://me:***@h:6379");
        assert_eq!(
            url("redis+cluster://u:p@a:1,b:2"),
            "redis+cluster://u:***@a:1,b:2"
        );
        assert_eq!(url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(url("memory"), "memory");
        assert_eq!(format!("{:?}", Secret("t0k".into())), Secret::REDACTED);
    }

    #[test]
    fn engine_durations_are_bounded_and_the_lease_outlasts_store_round_trips() {
        let load = |args: &[&str]| {
            let mut all = vec!["--upstream", "http://a:1"];
            all.extend_from_slice(args);
            Settings::load(None, env(&[]), &flags(&all))
        };
        let e = load(&["--lease", "1s", "--store-timeout", "600ms"]).unwrap_err();
        assert_eq!(e.key, "lease");
        assert!(e.reason.contains("twice store_timeout"), "{e}");
        assert!(load(&["--lease", "1s", "--store-timeout", "500ms"]).is_ok());
        let e = load(&["--window", "400days"]).unwrap_err();
        assert_eq!(e.key, "--window", "named as the user wrote it");
        assert!(load(&["--idempotency-key-window", "30days"]).is_ok());
    }

    /// Every duration is bounded where it is parsed: one that validated used to panic the first connection's
    /// worker when added to a clock reading.
    #[test]
    fn every_duration_is_bounded_where_it_is_parsed() {
        let load = |args: &[&str]| {
            let mut all = vec!["--upstream", "http://a:1"];
            all.extend_from_slice(args);
            Settings::load(None, env(&[]), &flags(&all))
        };
        for key in [
            "header-read-timeout",
            "connect-timeout",
            "upstream-idle-timeout",
            "body-read-timeout",
            "delivery-grace",
            "resolve-after",
        ] {
            let e = load(&[&format!("--{key}"), "300000000000years"]).unwrap_err();
            assert_eq!(e.key, format!("--{key}"), "{e}");
            assert!(e.reason.contains("365 days"), "{key}: {e}");
        }
        let text = "upstreams = [\"http://a:1\"]\n[routes.runJob]\nwindow = \"400days\"\n";
        let dir = std::env::temp_dir().join(format!("runonce-dur-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("runonce.toml");
        std::fs::write(&path, text).unwrap();
        let e = Settings::load(Some(&path), env(&[]), &Flags::default()).unwrap_err();
        assert!(e.to_string().contains("365 days"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn security_keys_are_checked_and_name_the_key() {
        let load = |args: &[&str], vars: &[(&str, &str)]| {
            let mut all = vec!["--upstream", "http://a:1"];
            all.extend_from_slice(args);
            Settings::load(None, env(vars), &flags(&all))
        };
        let s = load(
            &["--allow-network", "10.9.8.7/8", "--allow-network", "::1"],
            &[("RUNONCE_ALLOW_APPS", "1, 007")],
        )
        .unwrap();
        assert_eq!(s.allow_networks[0].to_string(), "10.0.0.0/8");
        assert_eq!(s.allow_networks[1].to_string(), "::1/128");
        assert_eq!(s.allow_apps, vec![AppId(1), AppId(7)]);
        assert_eq!(
            load(&["--allow-network", "10.0.0.0/33"], &[])
                .unwrap_err()
                .key,
            "--allow-network"
        );
        assert_eq!(
            load(&["--allow-app", "0x2"], &[]).unwrap_err().key,
            "--allow-app"
        );

        let secret = ("RUNONCE_SHARED_SECRET", "0123456789abcdef");
        assert!(load(&["--shared-secret-header", "X-Runonce-Secret"], &[secret]).is_ok());
        let e = load(&["--shared-secret-header", "X-Runonce-Secret"], &[]).unwrap_err();
        assert_eq!(e.key, "shared_secret");
        let e = load(&[], &[secret]).unwrap_err();
        assert_eq!(e.key, "shared_secret_header");
        for header in ["X-POWERJOB-ACCESS-TOKEN", "Host", "bad header"] {
            let e = load(&["--shared-secret-header", header], &[secret]).unwrap_err();
            assert_eq!(e.key, "shared_secret_header", "{header}");
        }
        let short = ("RUNONCE_SHARED_SECRET", "0123456789abcde");
        let e = load(&["--shared-secret-header", "X-S"], &[short]).unwrap_err();
        assert_eq!(e.key, "shared_secret");
        assert!(!e.to_string().contains("0123456789abcde"), "{e}");
        assert!(!format!(
            "{:?}",
            load(&["--shared-secret-header", "X-S"], &[secret]).unwrap()
        )
        .contains("0123456789abcdef"));
    }
}
