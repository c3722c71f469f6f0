//! The idempotency engine: one upstream call per logical request (DESIGN.md "A request's way through").
//!
//! A guarded request is read whole, keyed ([`key`]: its fingerprint, or its `Idempotency-Key`) and claimed in
//! the store. Then it takes one of three roles:
//! - **leader**: the key was free. Its upstream call runs in a task of its own, which renews the lease, finishes
//!   and records the outcome ([`outcome`]) even when the client goes away. A definite answer is stored with its
//!   delivery in one write, when the client's connection takes it (`Completion`).
//! - **waiter**: the call is in flight. It shares the leader's outcome, whatever it is (stored, released or
//!   unknown): a waiter never sends the call itself. A leader in this process is joined in memory
//!   ([`flights`], consulted before and after the store); one elsewhere is waited for on the store
//!   ([`Store::changed`]). A record that vanishes under a waiter proves nothing: 409, never a second call.
//! - **hit**: an answer is stored. It is replayed (`Idempotent-Replayed: true`) when the duplicate is a retry:
//!   nobody received the answer yet, the same `Idempotency-Key`, the 5.1.0 client's re-send after `/authApp`,
//!   or `after_delivery = "replay"`. Otherwise (a client received it) the duplicate is a new call: it takes the
//!   key over and leads.
//!
//! A waiter or hit whose access token differs from the leader's gets the stored answer only after the server
//! accepted its token ([`auth`]).
//!
//! An `unknown` key (the server may have acted, no answer is known) is never re-run: 409 with `Retry-After`.
//! A duplicate told 409 because the call still ran is owed the answer: the record says so, and its retry is
//! replayed on any replica. When the store fails, the route's policy answers: `fail-closed` (503) or
//! `fail-open` (an in-process store, behind the same registry of this process's leaders). An unknown `runJob`
//! is resolved by asking PowerJob, and after the store lost its records a new leader asks first (`asking.rs`).
//!
//! The files, along DESIGN's diagram: this one keys a request and decides its role (`decide`); `leader.rs`
//! runs a leader's call; `waiter.rs` is a duplicate's side (join, wait, 409, the token check); `replay.rs`
//! renders a stored answer; `completion.rs` writes a leader's verdict and its delivery; `asking.rs` asks
//! PowerJob; `tests.rs` runs these rules against a stand-in server, without sockets.

pub mod auth;
pub mod flights;
pub mod heads;
pub mod key;
pub mod outcome;
pub mod resolve;
pub mod routes;

mod asking;
mod completion;
mod leader;
mod replay;
#[cfg(test)]
mod tests;
mod waiter;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{request, response, HeaderMap, HeaderValue, Request, Response};
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

use crate::config::{AfterDelivery, AuthHeader, OnStoreError, Settings};
use crate::metrics::{self, QuarantineCheck, Role};
use crate::proxy::answer::Answer;
use crate::proxy::delivery::{Confirmation, Delivery};
use crate::proxy::error::ProxyError;
use crate::proxy::headers;
use crate::proxy::tap::Arm;
use crate::proxy::upstream::{Exchange, Exchanged};
use crate::store::memory::MemoryStore;
use crate::store::{
    AnyStore, Claim, ClaimInfo, Key, Record, State, Store, StoreError, Stored, Turn,
};
use asking::Asked;
use completion::{note_change, Completion, Verdict, Write};
use flights::{Flight, Flights, Shared};
use heads::Heads;
use outcome::{Outcome, Reason};
use replay::{render_head, replay};
use routes::{Route, Routes};
use waiter::{wait, Waited};

/// The request header a client may key its request with (IETF httpapi idempotency-key draft).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Added to every replayed answer.
pub const REPLAYED: &str = "Idempotent-Replayed";
/// Longest `Idempotency-Key` accepted.
const MAX_CLIENT_KEY: usize = 255;
/// Most bytes of an upstream answer a leader keeps (PowerJob answers are a few hundred bytes).
const MAX_ANSWER: usize = 4 * 1024 * 1024;
/// A waiter re-reads the record at least this often, in case a wake-up was lost.
const POLL: Duration = Duration::from_millis(250);
/// The 5.1.0 client re-sends right after `/authApp`: a duplicate this soon after one from the same address is
/// that re-send. The note is taken when `/authApp` arrives, so the window covers the server's answer to it as
/// well as the client's re-send: 1 s proved too tight on a loaded machine (a CI run saw a re-send miss it).
const RESEND_AFTER_AUTH: Duration = Duration::from_secs(3);

/// The engine, shared by every connection.
pub struct Guard {
    store: AnyStore,
    /// De-duplication within this process when the store fails on a `fail-open` route.
    fallback: AnyStore,
    /// The leaders this process runs: consulted before and after the store.
    flights: Arc<Flights>,
    /// What a configuration reload may change; read once per request (one atomic load).
    policy: ArcSwap<Policy>,
    /// Where calls go: the servers ([`Upstreams`]), or a stand-in in the engine's unit tests.
    upstreams: Arc<dyn Exchange>,
    lease: Duration,
    /// How long a leader's answer waits for the client's connection to confirm it took it.
    delivery_grace: Duration,
    /// Whether `/authApp` calls are noted in the store (the 5.1.0 re-send signature): only when the auth
    /// header is not repaired; with the repair the 5.1.0 client never re-sends.
    notes_auth: bool,
    /// Parsed heads of stored answers, for replays.
    heads: Heads,
    /// Every guarded request's decision task, so that shutdown can wait for leaders to finish.
    tracker: TaskTracker,
    /// Cancelled when the drain time runs out: leaders still waiting for the upstream stop and mark their key
    /// unknown.
    cut_off: CancellationToken,
    /// Whether a new leader asks PowerJob first after the store lost its records ([`Self::recall`]).
    quarantine: bool,
    /// The loss (its wall clock ms) during whose quarantine the server showed it cannot look instances up:
    /// asking again until the next loss would only cost every call a round trip.
    cannot_look_up: AtomicI64,
    /// Instance ids this process's leaders received right after a store's loss: not a forgotten call's.
    handed_out: resolve::HandedOut,
}

/// The engine's settings that a reload may change (see `reload.rs`).
struct Policy {
    routes: Routes,
    idempotency_key_window: Duration,
    wait_timeout: Duration,
    keep_business_errors: bool,
    resolve_after: Duration,
}

impl Policy {
    fn new(settings: &Settings) -> Policy {
        Policy {
            routes: Routes::new(settings),
            idempotency_key_window: settings.idempotency_key_window.0,
            wait_timeout: settings.wait_timeout.0,
            keep_business_errors: settings.keep_business_errors.0,
            resolve_after: settings.resolve_after.0,
        }
    }
}

/// What happened to one guarded request, for its log line and its metrics.
#[derive(Default)]
struct Seen {
    /// It claimed the key and called upstream.
    led: bool,
    /// When it started waiting for an identical call in flight.
    waited_since: Option<Instant>,
    /// How long its upstream call took (leaders).
    upstream: Option<Duration>,
    /// The leader's outcome, and why.
    outcome: Option<(metrics::Outcome, Reason)>,
}

/// One guarded request, keyed.
struct Call {
    route: Arc<Route>,
    key: Key,
    /// Shared with this process's registry of leaders when the call leads.
    info: Arc<ClaimInfo>,
    /// Keyed by the client's `Idempotency-Key` (then a stored answer is always replayed).
    client_keyed: bool,
    client: SocketAddr,
    parts: request::Parts,
    body: Bytes,
    repair: bool,
    /// The client's connection, watched for whether it takes the leader's answer (none: taken when handed
    /// to it).
    delivery: Option<Arc<Delivery>>,
}

/// Why a request could not be decided: the store failed, or a definite refusal.
enum Failure {
    /// `seen`: the request had already seen a record of its key (a call may be running or done elsewhere), so
    /// only the store can decide it: `fail-open` must not forward it.
    Store {
        err: StoreError,
        seen: bool,
    },
    Refused(ProxyError),
}

impl From<StoreError> for Failure {
    fn from(err: StoreError) -> Failure {
        Failure::Store { err, seen: true }
    }
}

/// What the leader's task hands back to the request that started it.
struct Led {
    parts: response::Parts,
    body: Bytes,
    /// A definite answer still to be stored: when the client's connection takes it, or without the delivery
    /// when it never does.
    completion: Option<Completion>,
}

impl Guard {
    pub fn new(settings: &Settings, store: AnyStore, upstreams: Arc<dyn Exchange>) -> Guard {
        let fallback = AnyStore::Memory(Arc::new(MemoryStore::new(
            settings.memory_max_keys.0,
            settings.wait_timeout.0,
        )));
        Guard {
            store,
            fallback,
            flights: Arc::new(Flights::default()),
            policy: ArcSwap::from_pointee(Policy::new(settings)),
            upstreams,
            lease: settings.lease.0,
            delivery_grace: settings.delivery_grace.0,
            notes_auth: settings.auth_header == AuthHeader::Preserve,
            heads: Heads::default(),
            tracker: TaskTracker::new(),
            cut_off: CancellationToken::new(),
            quarantine: settings.quarantine.0,
            cannot_look_up: AtomicI64::new(0),
            handed_out: resolve::HandedOut::default(),
        }
    }

    /// Applies reloaded routes, windows and timeouts to the requests that start from now on.
    pub fn reload(&self, settings: &Settings) {
        self.policy.store(Arc::new(Policy::new(settings)));
    }

    /// Shutdown: takes no new guarded requests' tasks into account after this, and resolves when every
    /// guarded request's task has finished.
    pub async fn drained(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Shutdown, once the drain time ran out: leaders still waiting for their upstream stop, mark their key
    /// unknown (the server may have acted) and answer 502.
    pub fn cut_off(&self) {
        self.cut_off.cancel();
    }

    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// The route guarding this request, if any.
    pub fn route(&self, method: &http::Method, endpoint: &str) -> Option<Arc<Route>> {
        self.policy.load().routes.find(method, endpoint)
    }

    /// Whether `/authApp` calls are noted (then the fast lane hands them to [`Self::note_auth`]'s path).
    pub fn notes_auth(&self) -> bool {
        self.notes_auth
    }

    /// Notes a `/authApp` call from `client` in the store, before it is forwarded: a duplicate right after it,
    /// on any replica, is the 5.1.0 client's re-send. A store failure only loses the note.
    pub async fn note_auth(&self, client: IpAddr) {
        if !self.notes_auth {
            return;
        }
        if let Err(err) = self
            .store
            .note_auth(&client.to_string(), RESEND_AFTER_AUTH)
            .await
        {
            metrics::get().store_errors.inc();
            tracing::warn!(%client, %err, "/authApp call not noted");
        }
    }

    /// Whether `client` called `/authApp` within [`RESEND_AFTER_AUTH`] and after the record (claimed `age_ms` ago)
    /// was created: the 5.1.0 client's refresh between its answer and its re-send.
    async fn resent_after_auth(&self, client: IpAddr, age_ms: u64) -> bool {
        if !self.notes_auth {
            return false;
        }
        match self.store.auth_since(&client.to_string()).await {
            Ok(Some(since)) => since < age_ms,
            Ok(None) => false,
            Err(err) => {
                metrics::get().store_errors.inc();
                tracing::warn!(%client, %err, "/authApp notes unreadable: taken as a new call");
                false
            }
        }
    }

    /// Answers a guarded request whose head passed the limits and whose `parts` are ready to go upstream.
    /// Logs one line for it (route, key prefix, role, upstream time, outcome) and counts it.
    pub async fn handle(
        self: &Arc<Self>,
        route: Arc<Route>,
        parts: request::Parts,
        body: Bytes,
        client: SocketAddr,
        repair: bool,
        delivery: Option<Arc<Delivery>>,
    ) -> Result<Response<Answer>, ProxyError> {
        if route.only_creating && key::names_existing_record(&body) {
            // An update of an existing record creates nothing: no key, no store.
            metrics::get().passthrough();
            let led = self.call_upstream(parts, body, repair).await?;
            return Ok(Response::from_parts(led.parts, Answer::new(led.body)));
        }
        let call = match self.key(Arc::clone(&route), parts, body, client, repair, delivery) {
            Ok(call) => Arc::new(call),
            Err(err) => {
                account(&route, None, &Seen::default(), Err(&err));
                return Err(err);
            }
        };
        // The decision runs in a task of its own: a client that goes away mid-claim cannot leave a claimed key
        // without its leader. The tracker lets shutdown wait for it.
        let this = Arc::clone(self);
        let task_call = Arc::clone(&call);
        let decided = self.tracker.spawn(async move {
            let mut seen = Seen::default();
            let answer = this.decide_with_policy(task_call, &mut seen).await;
            (answer, seen)
        });
        let (answer, seen) = decided.await.unwrap_or_else(|err| {
            let broken = ProxyError::Internal {
                cause: format!("the guarded request's task failed: {err}"),
            };
            (Err(broken), Seen::default())
        });
        account(&route, Some(&call.key), &seen, answer.as_ref().map(|_| ()));
        answer
    }

    /// [`Self::decide`] on the store, and on a store failure what the route's policy says.
    async fn decide_with_policy(
        self: Arc<Self>,
        call: Arc<Call>,
        trace: &mut Seen,
    ) -> Result<Response<Answer>, ProxyError> {
        let route = &call.route.name;
        match self.decide(&self.store, &call, trace).await {
            Ok(answer) => Ok(answer),
            Err(Failure::Refused(err)) => Err(err),
            Err(Failure::Store { err, seen }) => {
                metrics::get().store_errors.inc();
                let unavailable = |err: StoreError| ProxyError::StoreUnavailable {
                    cause: err.to_string(),
                };
                if call.route.on_store_error == OnStoreError::FailClosed || seen {
                    // `seen`: an identical call may be running or done; forwarding could send it twice.
                    tracing::warn!(%route, key = call.key.prefix(), %err, seen, "store failed: refused");
                    return Err(unavailable(err));
                }
                tracing::warn!(%route, key = call.key.prefix(), %err, "store failed: de-duplicating in this process only (fail-open)");
                match self.decide(&self.fallback, &call, trace).await {
                    Ok(answer) => Ok(answer),
                    Err(Failure::Refused(err)) => Err(err),
                    Err(Failure::Store { err, .. }) => Err(unavailable(err)),
                }
            }
        }
    }

    /// Reads the request's key: its `Idempotency-Key`, or the fingerprint of its payload.
    fn key(
        &self,
        route: Arc<Route>,
        parts: request::Parts,
        body: Bytes,
        client: SocketAddr,
        repair: bool,
        delivery: Option<Arc<Delivery>>,
    ) -> Result<Call, ProxyError> {
        let policy = self.policy.load();
        let client_key = client_key(&parts.headers)?;
        let text = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let payload = key::payload(
            &route.name,
            text("content-type"),
            parts.uri.query(),
            &body,
            text(crate::powerjob::APP_ID),
            route.fields.as_deref(),
        )
        .map_err(|err| match err {
            key::BadPayload::MediaType { .. } => ProxyError::UnsupportedMediaType {
                reason: err.to_string(),
            },
            key::BadPayload::Malformed(reason) => ProxyError::BadBody { reason },
        })?;
        // The path router's prefix scopes the key: `/clusterA/openApi/runJob` is not `/clusterB/…`.
        let prefix = crate::powerjob::served_prefix(parts.uri.path()).unwrap_or_default();
        let fingerprint = key::fingerprint(parts.method.as_str(), &prefix, &route.name, &payload);
        let (key, window) = match client_key {
            Some(client_key) => (
                key::idempotency_key(&prefix, &route.name, &payload.principal, client_key),
                policy.idempotency_key_window,
            ),
            None => (fingerprint.clone(), route.window),
        };
        Ok(Call {
            key,
            info: Arc::new(ClaimInfo {
                fingerprint: fingerprint.to_string(),
                // Only an Idempotency-Key can come back with another payload (a fingerprint key is the
                // payload), so only its record keeps the field digests that name what differs (422).
                fields: if client_key.is_some() {
                    key::field_digests(&payload)
                } else {
                    String::new()
                },
                credential: auth::credential(&parts.headers),
                lease: self.lease,
                window,
                release_if_failed: route.on_store_error == OnStoreError::FailClosed,
            }),
            client_keyed: client_key.is_some(),
            route,
            client,
            parts,
            body,
            repair,
            delivery,
        })
    }

    /// Claims the key and plays the role the record gives: leader, waiter or hit.
    async fn decide(
        self: &Arc<Self>,
        store: &AnyStore,
        call: &Call,
        seen: &mut Seen,
    ) -> Result<Response<Answer>, Failure> {
        let wait_timeout = self.policy.load().wait_timeout;
        let deadline = tokio::time::Instant::now() + wait_timeout;
        // Before the store: a leader of this key in this process answers, whatever the store says or forgot.
        // Once its definite answer is out, whether this call is a retry or a new one depends on whether the
        // client took that answer: the store says so once the delivery is confirmed.
        if let Some(flight) = self.flights.find(&call.key) {
            if !flight.answered() || !flight.landed(deadline).await {
                return self.join(store, call, &flight, deadline, seen).await;
            }
        }
        // A request that waited for a call in flight is a retry of it: the answer it finds is its own,
        // delivered to someone or not, whichever leader stored it.
        let mut waited = false;
        // It asked PowerJob about an unknown outcome already (once is enough).
        let mut asked = false;
        let mut claim = store
            .claim(&call.key, &call.info)
            .await
            .map_err(|err| Failure::Store { err, seen: false })?;
        // Each turn claims, takes over, or waits until the deadline: the loop ends.
        loop {
            let record = match claim {
                Claim::Leader(token) => match self.fallback_record(store, &call.key).await {
                    // Claimed on the fallback while the store was away: that record decides, not a new call.
                    Some(record) => {
                        let _ = store.release(&call.key, &token, None).await;
                        record
                    }
                    None => {
                        return self
                            .lead(store, call, token, seen)
                            .await
                            .map_err(Failure::Refused)
                    }
                },
                Claim::Existing(record) => record,
            };
            if call.client_keyed && record.fingerprint != call.info.fingerprint {
                metrics::get().key_mismatches.inc();
                let fields = key::differing_fields(&record.fields, &call.info.fields);
                return Err(Failure::Refused(ProxyError::KeyReused { fields }));
            }
            match record.state {
                State::Done {
                    response,
                    delivered,
                } => {
                    let retry = !delivered
                        || waited
                        || record.owed
                        || call.client_keyed
                        || call.route.after_delivery == AfterDelivery::Replay
                        || self
                            .resent_after_auth(call.client.ip(), record.age_ms)
                            .await;
                    if retry {
                        let mark =
                            (!delivered).then(|| (store.clone(), call.key.clone(), record.owner));
                        return self
                            .share(call, &record.credential, response, mark)
                            .await
                            .map_err(Failure::Refused);
                    }
                    metrics::get().new_calls_after_delivery.inc();
                    tracing::info!(route = %call.route.name, key = call.key.prefix(), "identical call after a delivered answer: a new call");
                    claim = store.takeover(&call.key, &record.owner, &call.info).await?;
                }
                // Only a waiter reads a released record (a claim takes it): it shares the leader's answer.
                State::Released => {
                    return match record.answer {
                        Some(answer) => self
                            .share(call, &record.credential, answer, None)
                            .await
                            .map_err(Failure::Refused),
                        None => Err(Failure::Refused(ProxyError::Unreachable {
                            upstream: "the identical request runonce was waiting for".into(),
                            cause: "it was not sent; retry".into(),
                        })),
                    };
                }
                State::Unknown if !asked && self.due_for_resolving(call, &record) => {
                    // PowerJob decides: the key turns done (its instance) or released (nothing), and this
                    // request takes it from there; otherwise it stays unknown.
                    asked = true;
                    // Sent when the record was created, as far as this clock can tell.
                    let sent_from = wall_ms() - record.age_ms as i64;
                    let asked = match Self::lookup_of(call, sent_from) {
                        Some(lookup) => {
                            // Due: it turned unknown `resolve_after` ago.
                            let gap = self.policy.load().resolve_after;
                            self.resolve(
                                store,
                                &call.key,
                                (&record.owner, &lookup),
                                &call.parts,
                                true,
                                gap,
                            )
                            .await
                        }
                        None => Asked::Failed("the call names no app and job to look for".into()),
                    };
                    match asked {
                        Asked::Found(_) | Asked::Nothing | Asked::Elsewhere => {
                            claim = store.claim(&call.key, &call.info).await?;
                        }
                        Asked::Refused((parts, body)) => {
                            return Ok(Response::from_parts(parts, Answer::new(body)))
                        }
                        _ => claim = Claim::Existing(record),
                    }
                }
                State::Unknown => match record.answer {
                    // A duplicate that waited for the call shares its answer, as it came.
                    Some(answer) if waited => {
                        return self
                            .share(call, &record.credential, answer, None)
                            .await
                            .map_err(Failure::Refused)
                    }
                    _ => {
                        let left = call
                            .info
                            .window
                            .saturating_sub(Duration::from_millis(record.age_ms));
                        return Err(Failure::Refused(ProxyError::OutcomeUnknown {
                            retry_after: left,
                        }));
                    }
                },
                State::InFlight => {
                    // The leader runs here (it registered after our first look); as above.
                    if let (false, Some(flight)) = (waited, self.flights.find(&call.key)) {
                        if !flight.answered() || !flight.landed(deadline).await {
                            return self.join(store, call, &flight, deadline, seen).await;
                        }
                        claim = store.claim(&call.key, &call.info).await?;
                        continue;
                    }
                    if !waited {
                        seen.waited_since = Some(Instant::now());
                    }
                    waited = true;
                    match wait(store, &self.flights, &call.key, deadline).await? {
                        Waited::Settled(record) => claim = Claim::Existing(record),
                        Waited::Here(flight) => {
                            return self.join(store, call, &flight, deadline, seen).await
                        }
                        // Evicted, expired or forgotten: no evidence that nothing was sent.
                        Waited::Vanished => {
                            tracing::warn!(route = %call.route.name, key = call.key.prefix(), "the record of the call this request waited for vanished: the outcome is unknown");
                            return Err(Failure::Refused(ProxyError::OutcomeUnknown {
                                retry_after: call.info.window,
                            }));
                        }
                        Waited::TooLong => return Err(self.still_running(store, call).await),
                    }
                }
            }
        }
    }

    /// A record of `key` on the `fail-open` fallback, when `store` is the configured store and the fallback
    /// holds anything (only after the store failed): a leader claimed there while the store was away.
    async fn fallback_record(&self, store: &AnyStore, key: &Key) -> Option<Record> {
        let AnyStore::Memory(fallback) = &self.fallback else {
            return None;
        };
        if std::ptr::eq(store, &self.fallback) || fallback.is_empty() {
            return None;
        }
        let record = fallback.get(key).await.ok().flatten()?;
        (record.state != State::Released).then_some(record)
    }
}

/// The one log line and the metrics of a guarded request. `key` is `None` when it could not be keyed.
fn account(route: &Route, key: Option<&Key>, seen: &Seen, answer: Result<(), &ProxyError>) {
    let metrics = metrics::get();
    let role = match answer {
        _ if seen.led => Role::leader,
        Err(_) => Role::rejected,
        Ok(()) if seen.waited_since.is_some() => Role::waiter,
        Ok(()) => Role::hit,
    };
    metrics.request(&route.name, role);
    if let Some(since) = seen.waited_since {
        metrics.wait.observe(since.elapsed().as_secs_f64());
    }
    let refused_duplicate = matches!(
        answer,
        Err(ProxyError::OutcomeUnknown { .. } | ProxyError::StillRunning { .. })
    );
    if matches!(role, Role::waiter | Role::hit) || refused_duplicate {
        metrics.duplicates_suppressed.inc();
    }
    let outcome = match (seen.outcome, answer) {
        (Some((outcome, reason)), _) => {
            metrics.outcome(outcome, reason);
            outcome.as_str()
        }
        (None, Ok(())) if role == Role::waiter => "shared",
        (None, Ok(())) => "replayed",
        (None, Err(err)) => err.code(),
    };
    let status = match answer {
        Ok(()) => None,
        Err(err) => Some(err.status().as_u16()),
    };
    tracing::info!(
        route = %route.name,
        key = key.map_or("-", Key::prefix),
        role = role.as_str(),
        upstream_ms = seen.upstream.map(|d| d.as_millis() as u64),
        outcome,
        status,
        "guarded request"
    );
}

/// The client's `Idempotency-Key`, if it sent one: 1 to 255 visible ASCII characters, once.
fn client_key(headers: &HeaderMap) -> Result<Option<&str>, ProxyError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad = |reason: &str| {
        Err(ProxyError::BadIdempotencyKey {
            reason: reason.into(),
        })
    };
    if values.next().is_some() {
        return bad("sent more than once");
    }
    let text = value.to_str().map(str::trim).unwrap_or("");
    if text.is_empty()
        || text.len() > MAX_CLIENT_KEY
        || !text.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return bad("must be 1 to 255 visible ASCII characters");
    }
    Ok(Some(text))
}

/// Wall clock milliseconds since the Unix epoch (PowerJob's instance ids and trigger times are in these).
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
