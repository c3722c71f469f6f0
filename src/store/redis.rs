//! The shared store: every replica of runonce sees the same records, kept in Redis (standalone, TLS or Cluster).
//!
//! **Layout.** One hash per key, `runonce:{<64-hex key>}`; the braces are a hash tag, so a record and all a
//! script touches live in one slot of a Redis Cluster. Fields: `state` (`inflight` | `done` | `unknown`), `owner`
//! (the leader's token), `fp`, `fields`, `cred` (the digest of the leader's access token, never the token),
//! `waiters` (how many times a waiter found it in flight; see below),
//! `created` and `lease_until` (milliseconds on Redis's clock), and once
//! done `status`, `head`, `body` (the bytes as they came) and `delivered` (`0`/`1`). The hash's time to live is
//! the record's expiry: max(window, lease) from the claim, raised to at least the lease by each renew, the window
//! again from completion or from turning unknown.
//!
//! **Scripts.** Every operation is one Lua script (`lua/*.lua`, each prefixed with `lua/lib.lua`): atomic, one
//! round trip. It is sent as `EVALSHA`, and on a `NOSCRIPT` answer (a new, restarted or flushed server) as `EVAL`
//! with its source, which caches it there; both name the record as their only key, so in a Cluster only the node
//! holding it has to answer. The scripts read the clock with `TIME`: leases and ages are measured on Redis's
//! clock, which all replicas share, never on theirs. The semantics are those of [`super::memory`], the reference.
//!
//! **Fencing.** A claim stores a fresh owner token (from [`super::new_token`]). Renew, complete, release and mark
//! unknown first check, inside the script, that the record is in flight, owned by that token, and that its lease
//! still holds at Redis's `TIME`; otherwise they change nothing and answer `0` (`Ok(false)`). A leader whose
//! lease ran out, or whose record was released, purged or taken over and claimed anew, can no longer write.
//!
//! **Waking waiters.** Every change a waiter may wait for is published on `runonce:{<key>}:changed`: a claim
//! that turns a record unknown, a purge, and, when a waiter counted itself in (below), complete, release and mark
//! unknown. A claim of a free key, a renew and mark delivered are not: waiters wait on in-flight records only,
//! and those change nothing they look at (in [`super::memory`] these wake nobody either). Each `RedisStore`
//! keeps ONE listener connection holding a single `PSUBSCRIBE runonce:{*}:changed`, and a registry
//! `channel → Notify` of the keys someone waits on.
//!
//! One pattern rather than a `SUBSCRIBE` per waited-on key: the subscription exists before any waiter
//! registers, so a waiter needs no subscribe round trip, cannot race its own subscription, and leaves nothing to
//! unsubscribe; the price is that each replica hears of every change someone waits for, a few bytes dropped
//! after one map look-up.
//! A waiter registers, then asks Redis once more whether the record is still in flight under a live lease (a
//! change between the caller's read and the registration was published before anyone listened); that script
//! also counts the waiter in the record's `waiters` field, and the leader's settling script publishes only when
//! the field is there (scripts run one at a time: a waiter counted in after the settling sees it settled), so
//! the usual call, which has no duplicate, publishes nothing. The waiter then sleeps until a message or until
//! `poll`, the fallback when a message is lost (listener down or reconnecting). A registry entry goes with its
//! last waiter, however that waiter ends (woken, polled out, or dropped). After every (re)subscription all
//! waiters are woken to look again: what changed while nobody listened is not known.
//!
//! The listener speaks RESP3 (Redis 6 or later): pushes arrive on an ordinary connection, which also answers the
//! `PING` (every [`LISTENER_PING_EVERY`]) that finds a connection gone silent. On any failure it connects anew,
//! with a back-off of at most a second. In Cluster mode a classic `PUBLISH` reaches every node, so the listener
//! uses any one seed node, and the next one when that one is down.
//!
//! **Connections and failures.** Operations on a worker thread ([`crate::workers`]) share that thread's
//! multiplexed connection, all others one shared connection: a reply then wakes a request on the thread its
//! connection's task runs on. Each is the redis crate's
//! `ConnectionManager` (standalone) or its async Cluster connection, made lazily, so an unreachable Redis at
//! start is not an error: operations fail until it answers, and the connection is made again by itself after
//! Redis restarts. Every operation is bounded by `op_timeout`; a time-out, an error or an unexpected answer is a
//! [`StoreError`], never a panic. After [`RECONNECT_AFTER_TIMEOUTS`] time-outs in a row the connection is
//! replaced: one whose peer vanished without a reset (host down, network cut) would never fail by itself, and the
//! redis crate does not count a time-out as a broken connection.
//!
//! **Retries.** A client library may send a script again after a connection broke (the Cluster connection does).
//! A claim or takeover that then finds its own token on an in-flight record knows its first attempt went through:
//! it leads.

use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, ErrorKind, IntoConnectionInfo,
    ProtocolVersion, PushKind, RedisError, ServerErrorKind, Value,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::workers;

use super::epoch::{self, Losses, Marks};
use super::{
    new_token, Claim, ClaimInfo, Key, Listing, Record, State, Store, StoreError, Stored, Turn,
};

/// Time-outs in a row on one connection after which it is replaced by a new one.
pub const RECONNECT_AFTER_TIMEOUTS: u32 = 3;
/// Between two tries to clean up a timed-out claim.
const CLEAN_UP_PAUSE: Duration = Duration::from_millis(100);

/// The pattern the listener subscribes to; every record's channel matches it.
const CHANNEL_PATTERN: &str = "runonce:{*}:changed";

/// How often the listener checks its connection with a `PING` (a dead one would never say so).
const LISTENER_PING_EVERY: Duration = Duration::from_secs(2);

/// How often the watcher compares Redis with what it showed before (see `store::epoch`).
const EPOCH_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Shortest and longest pause between the listener's connection attempts.
const LISTENER_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));

/// The store on Redis. Cheap to clone: clones share the connection, the listener and the waiters.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// This store among the process's stores: the key of its connections in [`WORKER_LINES`].
    id: u64,
    target: Target,
    /// The connection operations use outside the worker threads (admin listener, tests).
    shared: RwLock<Arc<Line>>,
    op_timeout: Duration,
    waiters: Arc<Registry>,
    /// When the watcher last found Redis to have lost its records.
    losses: Arc<Losses>,
    /// The listener task, stopped when the last clone of the store goes.
    _listener: AbortOnDrop,
    /// The watcher task (see `store::epoch`), likewise.
    _watcher: AbortOnDrop,
}

/// What the shared connection is made from.
#[allow(clippy::large_enum_variant)] // one per store, inside its `Arc`
enum Target {
    Standalone(Client),
    Cluster(ClusterClient),
}

#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A connection, and how many of its operations timed out in a row; replaced after
/// [`RECONNECT_AFTER_TIMEOUTS`], at most once per `op_timeout`.
struct Line {
    conn: Conn,
    timeouts_in_a_row: AtomicU32,
    opened: Instant,
}

impl Line {
    fn new(conn: Conn) -> Arc<Line> {
        Arc::new(Line {
            conn,
            timeouts_in_a_row: AtomicU32::new(0),
            opened: Instant::now(),
        })
    }
}

thread_local! {
    /// Each worker thread's own connection to each store (by [`Inner::id`]), made on its first operation there:
    /// its driver task then runs on that thread, next to the requests that use it (see [`crate::workers`]).
    /// Gone with the thread.
    static WORKER_LINES: RefCell<HashMap<u64, Arc<Line>>> = RefCell::new(HashMap::new());
}

/// Numbers the stores of this process.
static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(0);

impl RedisStore {
    /// A store on `url`: `redis://host:port/db`, `rediss://…` (TLS), or `redis+cluster://host:port,host:port`
    /// (also `rediss+cluster://`; user and password, if any, before the first host apply to all).
    ///
    /// Makes no connection before it returns: a malformed URL is an error at once, an unreachable Redis is not
    /// (operations fail with a [`StoreError`] until it answers). Every operation is bounded by `op_timeout`.
    /// Must be called within a Tokio runtime (it starts the listener task).
    pub async fn connect(url: &str, op_timeout: Duration) -> Result<RedisStore, StoreError> {
        let invalid = |cause: String| StoreError {
            op: "connect",
            cause,
        };
        let url = url.trim();
        if url.starts_with("rediss") {
            // rustls needs one process-wide crypto provider; an error only says one is installed already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let (target, nodes) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
            cluster_target("redis", rest, op_timeout).map_err(invalid)?
        } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
            cluster_target("rediss", rest, op_timeout).map_err(invalid)?
        } else if url.starts_with("redis://") || url.starts_with("rediss://") {
            let info = url
                .into_connection_info()
                .map_err(|e| invalid(format!("invalid Redis URL: {e}")))?;
            let client = Client::open(info.clone())
                .map_err(|e| invalid(format!("invalid Redis URL: {e}")))?;
            (Target::Standalone(client), vec![info])
        } else {
            return Err(invalid(
                "expected redis://, rediss://, redis+cluster:// or rediss+cluster://".into(),
            ));
        };
        let conn = target
            .open(op_timeout)
            .map_err(|e| invalid(e.to_string()))?;
        let waiters = Arc::new(Registry::default());
        let listener = tokio::spawn(listen(nodes, Arc::clone(&waiters), op_timeout));
        let losses = Arc::new(Losses::default());
        let watched = target
            .open(op_timeout)
            .map_err(|e| invalid(e.to_string()))?;
        let watcher = tokio::spawn(watch(watched, Arc::clone(&losses), op_timeout));
        let store = RedisStore {
            inner: Arc::new(Inner {
                id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
                target,
                shared: RwLock::new(Line::new(conn)),
                op_timeout,
                waiters,
                losses,
                _listener: AbortOnDrop(listener),
                _watcher: AbortOnDrop(watcher),
            }),
        };
        // Start connecting now rather than on the first request; the outcome does not matter here.
        if let Conn::Standalone(mut conn) = store.line().conn.clone() {
            tokio::spawn(async move {
                let ping = redis::cmd("PING");
                let _ =
                    tokio::time::timeout(op_timeout, ping.query_async::<Value>(&mut conn)).await;
            });
        }
        Ok(store)
    }

    /// Whether the listener is subscribed right now (else waiters only poll). For readiness and metrics.
    pub fn listening(&self) -> bool {
        self.inner.waiters.listening.load(Ordering::Relaxed)
    }

    /// When Redis was last found to have lost its records.
    pub fn losses(&self) -> &Losses {
        &self.inner.losses
    }

    /// How many keys have a waiter right now (the registry's size).
    pub fn waited_keys(&self) -> usize {
        self.inner.waiters.lock().len()
    }

    /// The connection for this thread: a worker's own (opened on its first use), else the shared one.
    fn line(&self) -> Arc<Line> {
        if workers::slot() == 0 {
            return Arc::clone(&self.shared());
        }
        WORKER_LINES.with(|lines| {
            let mut lines = lines.borrow_mut();
            if let Some(line) = lines.get(&self.inner.id) {
                return Arc::clone(line);
            }
            // Opening makes no connection (it is made on first use), so only a bad configuration fails here,
            // which `connect` already ruled out; should it fail all the same, use the shared one.
            match self.inner.target.open(self.inner.op_timeout) {
                Ok(conn) => Arc::clone(lines.entry(self.inner.id).or_insert(Line::new(conn))),
                Err(_) => Arc::clone(&self.shared()),
            }
        })
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, Arc<Line>> {
        self.inner
            .shared
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs one script, bounded by the operation time-out.
    async fn eval(
        &self,
        op: &'static str,
        script: &Script,
        key: &Key,
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        self.eval_at(op, script, &record_key(key), args).await
    }

    /// [`Self::eval`] on the Redis key `name`.
    async fn eval_at(
        &self,
        op: &'static str,
        script: &Script,
        record: &str,
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        let line = self.line();
        let mut conn = line.conn.clone();
        let answer =
            tokio::time::timeout(self.inner.op_timeout, conn.eval(script, record, args)).await;
        match answer {
            Ok(Ok(value)) => {
                line.timeouts_in_a_row.store(0, Ordering::Relaxed);
                Ok(value)
            }
            Ok(Err(err)) => {
                if err.is_timeout() {
                    self.timed_out(&line);
                } else {
                    // An answer, if only an error: the connection is alive.
                    line.timeouts_in_a_row.store(0, Ordering::Relaxed);
                }
                Err(StoreError {
                    op,
                    cause: format!("redis: {err}"),
                })
            }
            Err(_) => {
                self.timed_out(&line);
                Err(StoreError {
                    op,
                    cause: format!(
                        "no answer from redis within {} ms",
                        self.inner.op_timeout.as_millis()
                    ),
                })
            }
        }
    }

    /// Counts a time-out on `line`; replaces it, where this thread found it, after [`RECONNECT_AFTER_TIMEOUTS`]
    /// in a row.
    fn timed_out(&self, line: &Arc<Line>) {
        let inner = &self.inner;
        if line.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed) + 1 < RECONNECT_AFTER_TIMEOUTS
            || line.opened.elapsed() < inner.op_timeout
        {
            return;
        }
        let Ok(conn) = inner.target.open(inner.op_timeout) else {
            return;
        };
        let replaced = if workers::slot() == 0 {
            let mut shared = inner
                .shared
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Another operation may have replaced it already.
            Arc::ptr_eq(&shared, line) && {
                *shared = Line::new(conn);
                true
            }
        } else {
            WORKER_LINES.with(|lines| match lines.borrow_mut().get_mut(&inner.id) {
                Some(mine) if Arc::ptr_eq(mine, line) => {
                    *mine = Line::new(conn);
                    true
                }
                _ => false,
            })
        };
        if replaced {
            // The connection retries by itself and only times out: a connection of its own says why (a Redis in
            // protected mode writes `-DENIED …` and hangs up, a wrong port refuses, a password is missing).
            let inner = Arc::clone(&self.inner);
            tokio::spawn(async move {
                let probe = inner.target.probe(inner.op_timeout).await;
                tracing::warn!(
                    new_connection = %probe.err().as_deref().unwrap_or("answers PING"),
                    "redis store: no answer {RECONNECT_AFTER_TIMEOUTS} times in a row, connecting anew"
                );
            });
        }
    }

    /// One command bounded by the operation time-out (for the admin listing; the request path uses [`Self::eval`]).
    async fn bounded(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = redis::RedisResult<Value>>,
    ) -> Result<Value, StoreError> {
        match tokio::time::timeout(self.inner.op_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(StoreError {
                op,
                cause: format!("redis: {err}"),
            }),
            Err(_) => Err(StoreError {
                op,
                cause: format!(
                    "no answer from redis within {} ms",
                    self.inner.op_timeout.as_millis()
                ),
            }),
        }
    }

    /// `(host, port)` of every master of the Cluster, from `CLUSTER NODES`.
    async fn masters(
        &self,
        cluster: &mut ClusterConnection,
    ) -> Result<Vec<(String, u16)>, StoreError> {
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
        let value = self
            .bounded(
                "list",
                cluster.route_command(redis::cmd("CLUSTER").arg("NODES").clone(), routing),
            )
            .await?;
        let nodes = text(Some(&value)).ok_or_else(|| unexpected("list", &value))?;
        let masters: Vec<(String, u16)> = epoch::masters(nodes)
            .into_iter()
            .map(|master| (master.host, master.port))
            .collect();
        if masters.is_empty() {
            return Err(unexpected("list", &value));
        }
        Ok(masters)
    }

    /// Releases the claim `token` may hold on `key` after its claim failed (timed out, or the connection broke
    /// with the script sent): retried in the background until Redis answers, for at most the lease. The
    /// release is fenced by the token, so it never touches another leader's record; sent after the claim on
    /// the same connection, it runs after the claim did, before any retry of the client's can.
    fn clean_up_claim(&self, key: &Key, token: String, lease: Duration) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let (this, key) = (self.clone(), key.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + lease;
            loop {
                match this.release(&key, &token, None).await {
                    Ok(true) => {
                        tracing::info!(key = key.prefix(), "a timed-out claim had run: released");
                        return;
                    }
                    Ok(false) => return,
                    Err(_) if tokio::time::Instant::now() + CLEAN_UP_PAUSE < deadline => {
                        tokio::time::sleep(CLEAN_UP_PAUSE).await;
                    }
                    Err(err) => {
                        tracing::warn!(key = key.prefix(), %err, "a timed-out claim could not be cleaned up; should it have run, the key turns unknown after its lease");
                        return;
                    }
                }
            }
        });
    }

    /// Whether the record is in flight under a live lease (a waiter keeps waiting).
    async fn is_in_flight(&self, key: &Key) -> Result<bool, StoreError> {
        let value = self.eval("changed", &scripts().in_flight, key, &[]).await?;
        flag("changed", &value)
    }

    /// A settling script (release, mark_unknown, resolve): ARGV = token, a duration in ms, then the answer's
    /// status, head and body (an empty status: no answer).
    async fn settle(
        &self,
        op: &'static str,
        script: &Script,
        key: &Key,
        token: &str,
        duration: Duration,
        answer: Option<&Stored>,
    ) -> Result<bool, StoreError> {
        let duration = millis(duration);
        let status = answer.map(|a| a.status.to_string()).unwrap_or_default();
        let (head, body) = answer.map_or((&b""[..], &b""[..]), |a| (&a.head[..], &a.body[..]));
        let args = [
            token.as_bytes(),
            duration.as_bytes(),
            status.as_bytes(),
            head,
            body,
        ];
        self.change(op, script, key, &args).await
    }

    async fn change(
        &self,
        op: &'static str,
        script: &Script,
        key: &Key,
        args: &[&[u8]],
    ) -> Result<bool, StoreError> {
        let value = self.eval(op, script, key, args).await?;
        flag(op, &value)
    }
}

impl Store for RedisStore {
    async fn claim(&self, key: &Key, info: &ClaimInfo) -> Result<Claim, StoreError> {
        let token = new_token();
        let (lease, window) = (millis(info.lease), millis(info.window));
        let value = self
            .eval(
                "claim",
                &scripts().claim,
                key,
                &[
                    token.as_bytes(),
                    info.fingerprint.as_bytes(),
                    info.fields.as_bytes(),
                    lease.as_bytes(),
                    window.as_bytes(),
                    info.credential.as_bytes(),
                ],
            )
            .await;
        match value {
            Ok(value) => claim_answer("claim", value, token),
            Err(err) => {
                // The caller answers "nothing forwarded", but the script may still run on Redis and leave an
                // in-flight record that no leader will ever settle. (On a fail-open route the call goes ahead
                // elsewhere: that record must stay.)
                if info.release_if_failed {
                    self.clean_up_claim(key, token, info.lease);
                }
                Err(err)
            }
        }
    }

    async fn takeover(
        &self,
        key: &Key,
        previous_owner: &str,
        info: &ClaimInfo,
    ) -> Result<Claim, StoreError> {
        let token = new_token();
        let (lease, window) = (millis(info.lease), millis(info.window));
        let value = self
            .eval(
                "takeover",
                &scripts().takeover,
                key,
                &[
                    previous_owner.as_bytes(),
                    token.as_bytes(),
                    info.fingerprint.as_bytes(),
                    info.fields.as_bytes(),
                    lease.as_bytes(),
                    window.as_bytes(),
                    info.credential.as_bytes(),
                ],
            )
            .await?;
        claim_answer("takeover", value, token)
    }

    async fn renew(&self, key: &Key, token: &str, lease: Duration) -> Result<bool, StoreError> {
        let lease = millis(lease);
        self.change(
            "renew",
            &scripts().renew,
            key,
            &[token.as_bytes(), lease.as_bytes()],
        )
        .await
    }

    async fn complete(
        &self,
        key: &Key,
        token: &str,
        response: &Stored,
        window: Duration,
        delivered: bool,
    ) -> Result<bool, StoreError> {
        let (window, status) = (millis(window), response.status.to_string());
        let delivered: &[u8] = if delivered { b"1" } else { b"0" };
        self.change(
            "complete",
            &scripts().complete,
            key,
            &[
                token.as_bytes(),
                window.as_bytes(),
                status.as_bytes(),
                &response.head,
                &response.body,
                delivered,
            ],
        )
        .await
    }

    async fn release(
        &self,
        key: &Key,
        token: &str,
        answer: Option<&Stored>,
    ) -> Result<bool, StoreError> {
        let script = &scripts().release;
        self.settle("release", script, key, token, super::RELEASED_KEEP, answer)
            .await
    }

    async fn mark_unknown(
        &self,
        key: &Key,
        token: &str,
        window: Duration,
        answer: Option<&Stored>,
    ) -> Result<bool, StoreError> {
        let script = &scripts().mark_unknown;
        self.settle("mark_unknown", script, key, token, window, answer)
            .await
    }

    async fn resolve(
        &self,
        key: &Key,
        owner: &str,
        answer: Option<&Stored>,
    ) -> Result<bool, StoreError> {
        let script = &scripts().resolve;
        self.settle("resolve", script, key, owner, super::RELEASED_KEEP, answer)
            .await
    }

    async fn keep_lookup(&self, key: &Key, owner: &str, lookup: &str) -> Result<bool, StoreError> {
        let args: [&[u8]; 2] = [owner.as_bytes(), lookup.as_bytes()];
        self.change("keep_lookup", &scripts().keep_lookup, key, &args)
            .await
    }

    async fn ask_turn(
        &self,
        key: &Key,
        owner: &str,
        lease: Duration,
        gap: Duration,
    ) -> Result<Turn, StoreError> {
        let (lease, gap) = (millis(lease), millis(gap));
        let args: [&[u8]; 3] = [owner.as_bytes(), lease.as_bytes(), gap.as_bytes()];
        let value = self
            .eval("ask_turn", &scripts().ask_turn, key, &args)
            .await?;
        match text(Some(&value)) {
            Some("yours") => Ok(Turn::Yours),
            Some("busy") => Ok(Turn::Busy),
            Some("asked") => Ok(Turn::Asked),
            Some("settled") => Ok(Turn::Settled),
            _ => Err(unexpected("ask_turn", &value)),
        }
    }

    async fn end_turn(&self, key: &Key, owner: &str) -> Result<bool, StoreError> {
        self.change("end_turn", &scripts().end_turn, key, &[owner.as_bytes()])
            .await
    }

    async fn lookup(&self, key: &Key) -> Result<Option<(String, String)>, StoreError> {
        let value = self.eval("lookup", &scripts().lookup, key, &[]).await?;
        match &value {
            Value::Nil | Value::Boolean(false) => Ok(None),
            Value::Array(items) => match (text(items.first()), text(items.get(1))) {
                (Some(owner), Some(lookup)) => Ok(Some((owner.to_string(), lookup.to_string()))),
                _ => Err(unexpected("lookup", &value)),
            },
            _ => Err(unexpected("lookup", &value)),
        }
    }

    async fn mark_owed(&self, key: &Key) -> Result<bool, StoreError> {
        self.change("mark_owed", &scripts().mark_owed, key, &[])
            .await
    }

    async fn mark_delivered(&self, key: &Key, owner: &str) -> Result<bool, StoreError> {
        self.change(
            "mark_delivered",
            &scripts().mark_delivered,
            key,
            &[owner.as_bytes()],
        )
        .await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        match self.eval("get", &scripts().get, key, &[]).await? {
            Value::Nil => Ok(None),
            value => match &value {
                Value::Array(items) if text(items.first()) == Some("existing") => record(items)
                    .map(Some)
                    .ok_or_else(|| unexpected("get", &value)),
                _ => Err(unexpected("get", &value)),
            },
        }
    }

    async fn purge(&self, key: &Key) -> Result<bool, StoreError> {
        self.change("purge", &scripts().purge, key, &[]).await
    }

    async fn note_auth(&self, client: &str, within: Duration) -> Result<(), StoreError> {
        let within = millis(within);
        let name = auth_key(client);
        self.eval_at(
            "note_auth",
            &scripts().note_auth,
            &name,
            &[within.as_bytes()],
        )
        .await
        .map(drop)
    }

    async fn auth_since(&self, client: &str) -> Result<Option<u64>, StoreError> {
        let name = auth_key(client);
        match self
            .eval_at("auth_since", &scripts().auth_since, &name, &[])
            .await?
        {
            Value::Nil => Ok(None),
            Value::Int(ms) => Ok(Some(u64::try_from(ms).unwrap_or(0))),
            other => Err(unexpected("auth_since", &other)),
        }
    }

    async fn note_instance(&self, id: i64, key: &Key, within: Duration) -> Result<(), StoreError> {
        let within = millis(within);
        self.eval_at(
            "note_instance",
            &scripts().note_instance,
            &instance_key(id),
            &[key.as_str().as_bytes(), within.as_bytes()],
        )
        .await
        .map(drop)
    }

    async fn instance_key(&self, id: i64) -> Result<Option<Key>, StoreError> {
        match self
            .eval_at(
                "instance_key",
                &scripts().instance_key,
                &instance_key(id),
                &[],
            )
            .await?
        {
            Value::Nil => Ok(None),
            Value::BulkString(text) => Ok(std::str::from_utf8(&text).ok().and_then(Key::parse)),
            other => Err(unexpected("instance_key", &other)),
        }
    }

    /// `SCAN`s for `runonce:{*}` hashes on the one server, or on every master of a Cluster (each holds part of
    /// the keyspace), and reads each record with the `get` script.
    async fn list(&self, filter: Listing, limit: usize) -> Result<Vec<(Key, Record)>, StoreError> {
        let mut conn = self.line().conn.clone();
        let nodes = match &mut conn {
            Conn::Standalone(_) => vec![None],
            Conn::Cluster(cluster) => self.masters(cluster).await?.into_iter().map(Some).collect(),
        };
        let mut found = Vec::new();
        for node in nodes {
            let mut cursor = 0u64;
            // Each turn moves the cursor on; SCAN ends with cursor 0 after a full pass.
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg("runonce:{*}")
                    .arg("COUNT")
                    .arg(500)
                    .arg("TYPE")
                    .arg("hash");
                let value = self
                    .bounded("list", conn.routed(scan, node.clone()))
                    .await?;
                let (next, names) = scan_page(&value).ok_or_else(|| unexpected("list", &value))?;
                for name in names {
                    let Some(key) = name
                        .strip_prefix("runonce:{")
                        .and_then(|rest| rest.strip_suffix('}'))
                        .and_then(Key::parse)
                    else {
                        continue;
                    };
                    if let Some(record) = self.get(&key).await? {
                        if filter.matches(&record.state) {
                            found.push((key, record));
                            if found.len() >= limit {
                                return Ok(found);
                            }
                        }
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(found)
    }

    async fn changed(&self, key: &Key, poll: Duration) {
        let registration = self.inner.waiters.register(channel(key));
        let notify = Arc::clone(&registration.notify);
        let mut notified = pin!(notify.notified());
        // From here on a published change wakes us (when the listener is subscribed).
        notified.as_mut().enable();
        let _ = tokio::time::timeout(poll, async {
            // A change between the caller's last read and the registration was published before we listened:
            // look once more. If Redis cannot say, sleep until the poll rather than spin.
            if let Ok(false) = self.is_in_flight(key).await {
                return;
            }
            notified.await;
        })
        .await;
        drop(registration);
    }
}

impl Target {
    /// A connection of its own and a `PING`, within `op_timeout`: what Redis (or the network) says to a new client.
    async fn probe(&self, op_timeout: Duration) -> Result<(), String> {
        let ping = redis::cmd("PING");
        let answer = tokio::time::timeout(op_timeout, async {
            match self {
                Target::Standalone(client) => {
                    let mut conn = client.get_multiplexed_async_connection().await?;
                    ping.query_async::<Value>(&mut conn).await
                }
                Target::Cluster(client) => {
                    let mut conn = client.get_async_connection().await?;
                    ping.query_async::<Value>(&mut conn).await
                }
            }
        })
        .await;
        let failed = match answer {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(err)) if !err.is_io_error() => return Err(err.to_string()),
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("no answer within {} ms", op_timeout.as_millis()),
        };
        // The client may have written its hand-shake after Redis hung up, and says only "broken pipe".
        Err(match self.greeting(op_timeout).await {
            Some(said) => format!("{failed}; redis said: {said}"),
            None => failed,
        })
    }

    /// The error line a plain-TCP standalone Redis answers an inline `PING` with: `-DENIED …` from one in protected
    /// mode, which writes it and hangs up on any client from another host.
    async fn greeting(&self, op_timeout: Duration) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Target::Standalone(client) = self else {
            return None;
        };
        let redis::ConnectionAddr::Tcp(host, port) = client.get_connection_info().addr() else {
            return None;
        };
        let said = tokio::time::timeout(op_timeout, async {
            let mut conn = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .ok()?;
            let _ = conn.write_all(b"PING\r\n").await;
            let mut heard = [0u8; 256];
            let n = conn.read(&mut heard).await.ok()?;
            let line = String::from_utf8_lossy(&heard[..n]);
            let line = line.lines().next()?.strip_prefix('-')?;
            Some(line.to_string())
        })
        .await;
        said.ok().flatten()
    }

    /// A new shared connection; it connects on first use and reconnects by itself.
    fn open(&self, op_timeout: Duration) -> Result<Conn, RedisError> {
        Ok(match self {
            Target::Standalone(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(op_timeout))
                    // The store's own time-out bounds each operation and counts toward replacing the connection.
                    .set_response_timeout(None)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(1));
                Conn::Standalone(ConnectionManager::new_lazy_with_config(
                    client.clone(),
                    config,
                )?)
            }
            Target::Cluster(client) => Conn::Cluster(
                client.get_pending_async_connection_with_config(
                    ClusterConfig::new()
                        .set_connection_timeout(op_timeout)
                        .set_response_timeout(op_timeout),
                ),
            ),
        })
    }
}

impl Conn {
    /// `EVALSHA`; when the server does not have the script yet (`NOSCRIPT`: new, restarted, flushed), `EVAL`
    /// with its source, which also caches it. Both name the record as their one key, so in a Cluster they go to
    /// the node that holds it, and only that node has to answer.
    async fn eval(
        &mut self,
        script: &Script,
        record: &str,
        args: &[&[u8]],
    ) -> redis::RedisResult<Value> {
        let call = |command: &str, script: &str| {
            let mut cmd = redis::cmd(command);
            cmd.arg(script).arg(1).arg(record);
            for arg in args {
                cmd.arg(*arg);
            }
            cmd
        };
        match self.query(&call("EVALSHA", &script.sha1)).await {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.query(&call("EVAL", script.source)).await
            }
            answer => answer,
        }
    }

    /// `cmd` on the standalone server, or on the given Cluster node.
    async fn routed(&mut self, cmd: Cmd, node: Option<(String, u16)>) -> redis::RedisResult<Value> {
        match (self, node) {
            (Conn::Cluster(conn), Some((host, port))) => {
                let routing =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                conn.route_command(cmd, routing).await
            }
            (conn, _) => conn.query(&cmd).await,
        }
    }

    async fn query(&mut self, cmd: &Cmd) -> redis::RedisResult<Value> {
        match self {
            Conn::Standalone(conn) => cmd.query_async(conn).await,
            Conn::Cluster(conn) => cmd.query_async(conn).await,
        }
    }
}

/// Parses `host:port,host:port[/db][?query]` (after the `…+cluster://` scheme) into a Cluster client and the
/// seed nodes.
fn cluster_target(
    scheme: &str,
    rest: &str,
    op_timeout: Duration,
) -> Result<(Target, Vec<ConnectionInfo>), String> {
    let hosts_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, suffix) = rest.split_at(hosts_end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
        None => (String::new(), authority),
    };
    let mut nodes = Vec::new();
    for host in hosts.split(',') {
        if host.trim().is_empty() {
            return Err(format!(
                "invalid Redis Cluster URL: empty host in {hosts:?}; expected {scheme}+cluster://host:port,host:port"
            ));
        }
        let node = format!("{scheme}://{userinfo}{}{suffix}", host.trim());
        let info = node
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("invalid Redis Cluster node {host:?}: {e}"))?;
        nodes.push(info);
    }
    let client = ClusterClientBuilder::new(nodes.clone())
        .connection_timeout(op_timeout)
        .response_timeout(op_timeout)
        .build()
        .map_err(|e| format!("invalid Redis Cluster URL: {e}"))?;
    Ok((Target::Cluster(client), nodes))
}

/// The record's hash: `runonce:{<key>}`.
fn record_key(key: &Key) -> String {
    format!("runonce:{{{key}}}")
}

/// The record's change channel: `runonce:{<key>}:changed`.
/// Where the key an instance id went to is noted: `runonce:instance:{<id>}` (its own hash slot).
fn instance_key(id: i64) -> String {
    format!("runonce:instance:{{{id}}}")
}

/// Where a client's last `/authApp` call is noted: `runonce:auth:{<client>}` (its own hash slot).
fn auth_key(client: &str) -> String {
    format!("runonce:auth:{{{client}}}")
}

fn channel(key: &Key) -> String {
    format!("runonce:{{{key}}}:changed")
}

fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

/// A Lua script: its source (the shared functions, then its own) and the source's SHA-1 for `EVALSHA`.
struct Script {
    source: &'static str,
    sha1: String,
}

impl Script {
    fn new(source: &'static str) -> Script {
        Script {
            source,
            // The redis crate computes the digest `EVALSHA` wants.
            sha1: redis::Script::new(source).get_hash().to_string(),
        }
    }
}

/// The scripts, each prefixed with the shared functions.
struct Scripts {
    claim: Script,
    takeover: Script,
    renew: Script,
    complete: Script,
    release: Script,
    mark_unknown: Script,
    mark_delivered: Script,
    mark_owed: Script,
    resolve: Script,
    note_auth: Script,
    auth_since: Script,
    note_instance: Script,
    ask_turn: Script,
    end_turn: Script,
    instance_key: Script,
    get: Script,
    purge: Script,
    in_flight: Script,
    keep_lookup: Script,
    lookup: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    macro_rules! script {
        ($file:literal) => {
            Script::new(concat!(include_str!("lua/lib.lua"), include_str!($file)))
        };
    }
    SCRIPTS.get_or_init(|| Scripts {
        claim: script!("lua/claim.lua"),
        takeover: script!("lua/takeover.lua"),
        renew: script!("lua/renew.lua"),
        complete: script!("lua/complete.lua"),
        release: script!("lua/release.lua"),
        mark_unknown: script!("lua/mark_unknown.lua"),
        mark_delivered: script!("lua/mark_delivered.lua"),
        mark_owed: script!("lua/mark_owed.lua"),
        resolve: script!("lua/resolve.lua"),
        note_auth: script!("lua/note_auth.lua"),
        auth_since: script!("lua/auth_since.lua"),
        note_instance: script!("lua/note_instance.lua"),
        ask_turn: script!("lua/ask_turn.lua"),
        end_turn: script!("lua/end_turn.lua"),
        instance_key: script!("lua/instance_key.lua"),
        get: script!("lua/get.lua"),
        purge: script!("lua/purge.lua"),
        in_flight: script!("lua/in_flight.lua"),
        keep_lookup: script!("lua/keep_lookup.lua"),
        lookup: script!("lua/lookup.lua"),
    })
}

// ---- answers ----------------------------------------------------------------------------------------------

fn unexpected(op: &'static str, value: &Value) -> StoreError {
    let mut shown = format!("{value:?}");
    if shown.len() > 200 {
        let mut end = 200;
        while !shown.is_char_boundary(end) {
            end -= 1;
        }
        shown.truncate(end);
        shown.push('…');
    }
    StoreError {
        op,
        cause: format!("unexpected answer from redis: {shown}"),
    }
}

fn bytes(value: Option<&Value>) -> Option<&[u8]> {
    match value? {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

fn text(value: Option<&Value>) -> Option<&str> {
    std::str::from_utf8(bytes(value)?).ok()
}

fn int(value: Option<&Value>) -> Option<i64> {
    match value? {
        Value::Int(n) => Some(*n),
        other => text(Some(other))?.parse().ok(),
    }
}

/// A `SCAN` answer: the next cursor and the names of this page.
fn scan_page(value: &Value) -> Option<(u64, Vec<String>)> {
    let Value::Array(items) = value else {
        return None;
    };
    let cursor = text(items.first())?.parse().ok()?;
    let Value::Array(names) = items.get(1)? else {
        return None;
    };
    let names = names
        .iter()
        .filter_map(|name| text(Some(name)).map(String::from))
        .collect();
    Some((cursor, names))
}

/// A `0`/`1` answer.
fn flag(op: &'static str, value: &Value) -> Result<bool, StoreError> {
    match int(Some(value)) {
        Some(0) => Ok(false),
        Some(1) => Ok(true),
        _ => Err(unexpected(op, value)),
    }
}

/// `{'leader'}` or a record. A record that carries our own token means an earlier attempt of this very claim
/// went through (the client library sent the script again after a broken connection): we lead.
fn claim_answer(op: &'static str, value: Value, token: String) -> Result<Claim, StoreError> {
    let Value::Array(items) = &value else {
        return Err(unexpected(op, &value));
    };
    match text(items.first()) {
        Some("leader") => Ok(Claim::Leader(token)),
        Some("existing") => {
            let record = record(items).ok_or_else(|| unexpected(op, &value))?;
            if record.owner == token && record.state == State::InFlight {
                return Ok(Claim::Leader(token));
            }
            Ok(Claim::Existing(record))
        }
        _ => Err(unexpected(op, &value)),
    }
}

/// `{'existing', state, owner, fp, fields, age_ms, status, head, body, delivered, cred, owed,
/// settled_ago_ms}` as a [`Record`].
fn record(items: &[Value]) -> Option<Record> {
    if items.len() != 13 {
        return None;
    }
    // The answer in status/head/body: a done record's, or the one that came with a release or an unknown.
    let answer = match text(items.get(6))? {
        "" => None,
        status => Some(Stored {
            status: status.parse().ok()?,
            head: Bytes::copy_from_slice(bytes(items.get(7))?),
            body: Bytes::copy_from_slice(bytes(items.get(8))?),
        }),
    };
    let (state, answer) = match text(items.get(1))? {
        "inflight" => (State::InFlight, None),
        "unknown" => (State::Unknown, answer),
        "released" => (State::Released, answer),
        "done" => (
            State::Done {
                response: answer?,
                delivered: match text(items.get(9))? {
                    "1" => true,
                    "0" => false,
                    _ => return None,
                },
            },
            None,
        ),
        _ => return None,
    };
    Some(Record {
        state,
        owner: text(items.get(2))?.to_string(),
        fingerprint: text(items.get(3))?.to_string(),
        fields: text(items.get(4))?.to_string(),
        age_ms: u64::try_from(int(items.get(5))?).unwrap_or(0),
        credential: text(items.get(10))?.to_string(),
        answer,
        owed: text(items.get(11))? == "1",
        settled_ago_ms: match text(items.get(12))? {
            "" => None,
            ms => Some(ms.parse().ok()?),
        },
    })
}

// ---- waiters and the listener -----------------------------------------------------------------------------

/// The keys someone waits on, by channel name, and whether the listener is subscribed.
#[derive(Default)]
struct Registry {
    channels: Mutex<HashMap<String, Waiting>>,
    listening: AtomicBool,
}

struct Waiting {
    notify: Arc<Notify>,
    waiters: usize,
}

/// One waiter's place in the registry; leaving removes the entry with its last waiter.
struct Registration<'a> {
    registry: &'a Registry,
    channel: String,
    notify: Arc<Notify>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Waiting>> {
        // Every change under this lock is a single insert, update or remove: consistent after a panic.
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn register(&self, channel: String) -> Registration<'_> {
        let mut channels = self.lock();
        let waiting = channels.entry(channel.clone()).or_insert_with(|| Waiting {
            notify: Arc::new(Notify::new()),
            waiters: 0,
        });
        waiting.waiters += 1;
        Registration {
            registry: self,
            notify: Arc::clone(&waiting.notify),
            channel,
        }
    }

    fn wake(&self, channel: &[u8]) {
        let Ok(channel) = std::str::from_utf8(channel) else {
            return;
        };
        if let Some(waiting) = self.lock().get(channel) {
            waiting.notify.notify_waiters();
        }
    }

    /// Wakes everyone: after (re)subscribing, changes made while nobody listened are unknown.
    fn wake_all(&self) {
        for waiting in self.lock().values() {
            waiting.notify.notify_waiters();
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut channels = self.registry.lock();
        if let Some(waiting) = channels.get_mut(&self.channel) {
            waiting.waiters = waiting.waiters.saturating_sub(1);
            if waiting.waiters == 0 {
                channels.remove(&self.channel);
            }
        }
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The watcher (see `store::epoch`): every [`EPOCH_CHECK_EVERY`], each master's marks against the ones it
/// showed before; a change is a loss. A check that fails (Redis away) is skipped: the next one that answers
/// tells what Redis came back with.
async fn watch(mut conn: Conn, losses: Arc<Losses>, op_timeout: Duration) {
    // By marker name: after a Cluster failover, the master now serving a marker's slots is compared with the
    // one that served them before.
    let mut seen: HashMap<String, Marks> = HashMap::new();
    let mut every = tokio::time::interval(EPOCH_CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Ok(Ok(nodes)) = tokio::time::timeout(op_timeout, markers(&mut conn)).await else {
            continue;
        };
        let mut why = None;
        for (node, marker) in nodes {
            let read = tokio::time::timeout(op_timeout, read_marks(&mut conn, node, &marker)).await;
            let Ok(Ok(marks)) = read else {
                continue;
            };
            why = why.or(epoch::lost(seen.get(&marker), &marks));
            seen.insert(marker, marks);
        }
        if let Some(why) = why {
            losses.found(why);
        }
    }
}

/// The nodes to check and each one's marker: the standalone server, or every Cluster master.
async fn markers(conn: &mut Conn) -> redis::RedisResult<Vec<(Option<(String, u16)>, String)>> {
    let Conn::Cluster(cluster) = conn else {
        return Ok(vec![(None, epoch::MARKER.to_string())]);
    };
    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
    let value = cluster
        .route_command(redis::cmd("CLUSTER").arg("NODES").clone(), routing)
        .await?;
    let nodes = text(Some(&value)).unwrap_or_default();
    Ok(epoch::masters(nodes)
        .into_iter()
        .filter_map(|m| Some((Some((m.host, m.port)), epoch::marker_for(&m.slots)?)))
        .collect())
}

/// One master's marks: its epoch marker (written when missing), run id and replication id.
async fn read_marks(
    conn: &mut Conn,
    node: Option<(String, u16)>,
    marker: &str,
) -> redis::RedisResult<Marks> {
    // Plain commands, not a script: the request path's scripts stay the only ones Redis runs.
    let fresh = new_token();
    let set = redis::cmd("SET").arg(marker).arg(&fresh).arg("NX").clone();
    let written = matches!(conn.query(&set).await?, Value::Okay);
    let epoch = if written {
        fresh
    } else {
        let value = conn.query(redis::cmd("GET").arg(marker)).await?;
        text(Some(&value)).unwrap_or_default().to_string()
    };
    let info = |section: &'static str| {
        let node = node.clone();
        let mut conn = conn.clone();
        async move {
            let value = conn
                .routed(redis::cmd("INFO").arg(section).clone(), node)
                .await?;
            Ok::<_, redis::RedisError>(text(Some(&value)).unwrap_or_default().to_string())
        }
    };
    let server = info("server").await?;
    let replication = info("replication").await?;
    Ok(Marks {
        epoch,
        written,
        run_id: epoch::info_field(&server, "run_id")
            .unwrap_or_default()
            .to_string(),
        replication_id: epoch::info_field(&replication, "master_replid")
            .unwrap_or_default()
            .to_string(),
    })
}

/// The listener: one subscribed connection at a time, to the seed nodes in turn, for as long as the store lives.
async fn listen(nodes: Vec<ConnectionInfo>, registry: Arc<Registry>, op_timeout: Duration) {
    let mut backoff = LISTENER_BACKOFF.0;
    let mut failures = 0u64;
    let mut next = 0;
    loop {
        let node = &nodes[next % nodes.len()];
        let outcome = listen_on(node, &registry, op_timeout).await;
        registry.listening.store(false, Ordering::Relaxed);
        match outcome {
            // It was subscribed: try again soon, on the same node.
            Ok(()) => {
                tracing::info!(
                    "redis store listener lost {}; waiters poll until it is back",
                    node.addr()
                );
                failures = 0;
                backoff = LISTENER_BACKOFF.0;
            }
            Err(cause) => {
                failures += 1;
                // Once per outage at warn, then quietly: the store's readiness shows it too.
                if failures == 1 {
                    tracing::warn!("redis store listener on {}: {cause}", node.addr());
                } else {
                    tracing::debug!("redis store listener on {}: {cause}", node.addr());
                }
                next += 1;
            }
        }
        tokio::time::sleep(backoff).await;
        if failures > 0 {
            backoff = (backoff * 2).min(LISTENER_BACKOFF.1);
        }
    }
}

/// One listener session: connect, subscribe, wake waiters on messages until the connection fails.
async fn listen_on(
    node: &ConnectionInfo,
    registry: &Registry,
    op_timeout: Duration,
) -> Result<(), String> {
    let node = node.clone().set_redis_settings(
        node.redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3),
    );
    let client = Client::open(node).map_err(|e| e.to_string())?;
    let (pushes, mut received) = tokio::sync::mpsc::unbounded_channel();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(op_timeout))
        .set_response_timeout(Some(op_timeout))
        .set_push_sender(pushes);
    let bounded = |what: &str| format!("{what}: no answer within {} ms", op_timeout.as_millis());
    let mut conn = tokio::time::timeout(
        op_timeout,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .map_err(|_| bounded("connect"))?
    .map_err(|e| format!("connect: {e}"))?;
    tokio::time::timeout(op_timeout, conn.psubscribe(CHANNEL_PATTERN))
        .await
        .map_err(|_| bounded("psubscribe"))?
        .map_err(|e| format!("psubscribe: {e}"))?;
    registry.listening.store(true, Ordering::Relaxed);
    registry.wake_all();
    let mut ping =
        tokio::time::interval_at(Instant::now() + LISTENER_PING_EVERY, LISTENER_PING_EVERY);
    loop {
        tokio::select! {
            push = received.recv() => {
                let Some(push) = push else { return Ok(()) };
                match push.kind {
                    PushKind::PMessage => {
                        if let Some(channel) = bytes(push.data.get(1)) {
                            registry.wake(channel);
                        }
                    }
                    PushKind::Message => {
                        if let Some(channel) = bytes(push.data.first()) {
                            registry.wake(channel);
                        }
                    }
                    PushKind::Disconnection => return Ok(()),
                    _ => {}
                }
            }
            _ = ping.tick() => {
                let ping = redis::cmd("PING");
                let pong = tokio::time::timeout(op_timeout, ping.query_async::<Value>(&mut conn)).await;
                if !matches!(pong, Ok(Ok(_))) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(values: &[&[u8]], age: i64) -> Vec<Value> {
        let mut items: Vec<Value> = values
            .iter()
            .map(|v| Value::BulkString(v.to_vec()))
            .collect();
        items.insert(5, Value::Int(age));
        items
    }

    #[test]
    fn names_share_one_hash_slot() {
        let key = Key::from_digest(&[0xab; 32]);
        assert_eq!(record_key(&key), format!("runonce:{{{}}}", key.as_str()));
        assert_eq!(
            channel(&key),
            format!("runonce:{{{}}}:changed", key.as_str())
        );
    }

    #[test]
    fn records_parse_and_odd_answers_are_errors() {
        let done = items(
            &[
                b"existing",
                b"done",
                b"tok",
                b"fp",
                b"{}",
                b"201",
                b"HTTP/1.1 201 X\r\n\r\n",
                b"\xff\x00",
                b"1",
                b"c0ffee",
                b"1",
                b"",
            ],
            42,
        );
        let parsed = record(&done).unwrap();
        assert_eq!(parsed.age_ms, 42);
        assert_eq!(parsed.credential, "c0ffee");
        assert!(parsed.owed);
        assert_eq!(
            parsed.state,
            State::Done {
                response: Stored {
                    status: 201,
                    head: Bytes::from_static(b"HTTP/1.1 201 X\r\n\r\n"),
                    body: Bytes::from_static(b"\xff\x00"),
                },
                delivered: true
            }
        );
        // A wrong state, a bad status, a short array: no record, no panic.
        let mut bad = done.clone();
        bad[1] = Value::BulkString(b"weird".to_vec());
        assert!(record(&bad).is_none());
        let mut bad = done.clone();
        bad[6] = Value::BulkString(b"99999".to_vec());
        assert!(record(&bad).is_none());
        assert!(record(&done[..12]).is_none());
        // A release without an answer, and one with the leader's answer for its waiters.
        let mut released = done.clone();
        released[1] = Value::BulkString(b"released".to_vec());
        assert_eq!(
            record(&released).unwrap().answer.map(|a| a.status),
            Some(201)
        );
        released[6] = Value::BulkString(Vec::new());
        let parsed = record(&released).unwrap();
        assert_eq!((parsed.state, parsed.answer), (State::Released, None));
        assert!(claim_answer("claim", Value::Int(1), "t".into()).is_err());
        assert!(claim_answer("claim", Value::Array(vec![]), "t".into()).is_err());
        assert!(flag("renew", &Value::Int(2)).is_err());
        assert!(flag("renew", &Value::Nil).is_err());
    }

    #[test]
    fn a_claim_that_finds_its_own_token_leads() {
        let own = items(
            &[
                b"existing",
                b"inflight",
                b"tok",
                b"fp",
                b"{}",
                b"",
                b"",
                b"",
                b"0",
                b"",
                b"0",
                b"",
            ],
            1,
        );
        assert_eq!(
            claim_answer("claim", Value::Array(own), "tok".into()).unwrap(),
            Claim::Leader("tok".into())
        );
    }

    #[tokio::test]
    async fn malformed_urls_are_refused_at_once() {
        for url in [
            "http://localhost:6379",
            "redis://",
            "redis://host:notaport",
            "redis+cluster://",
            "redis+cluster://127.0.0.1:7000,,127.0.0.1:7001",
            "redis+cluster://127.0.0.1:x",
        ] {
            let started = std::time::Instant::now();
            let err = RedisStore::connect(url, Duration::from_secs(1))
                .await
                .err()
                .unwrap_or_else(|| panic!("{url} was accepted"));
            assert_eq!(err.op, "connect");
            assert!(started.elapsed() < Duration::from_millis(500), "{url}");
        }
    }

    #[tokio::test]
    async fn registry_entries_go_with_their_last_waiter() {
        let registry = Registry::default();
        let a = registry.register("c1".into());
        let b = registry.register("c1".into());
        let c = registry.register("c2".into());
        assert_eq!(registry.lock().len(), 2);
        drop(a);
        assert_eq!(registry.lock().len(), 2);
        drop(b);
        drop(c);
        assert!(registry.lock().is_empty());
    }
}
