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
//! `fail-open` (an in-process store, behind the same registry of this process's leaders).

pub mod auth;
pub mod flights;
pub mod heads;
pub mod key;
pub mod outcome;
pub mod resolve;
pub mod routes;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{request, response, HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Either, Full, Limited};
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
use crate::proxy::upstream::Upstreams;
use crate::store::memory::MemoryStore;
use crate::store::{AnyStore, Claim, ClaimInfo, Key, Record, State, Store, StoreError, Stored};
use flights::{Flight, Flights, Shared};
use heads::Heads;
use outcome::{Outcome, Reason};
use routes::{Route, Routes};

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
/// that re-send.
const RESEND_AFTER_AUTH: Duration = Duration::from_secs(1);

/// The engine, shared by every connection.
pub struct Guard {
    store: AnyStore,
    /// De-duplication within this process when the store fails on a `fail-open` route.
    fallback: AnyStore,
    /// The leaders this process runs: consulted before and after the store.
    flights: Arc<Flights>,
    /// What a configuration reload may change; read once per request (one atomic load).
    policy: ArcSwap<Policy>,
    upstreams: Arc<Upstreams>,
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
    /// The resolutions this process runs: one request asks per key, the others wait for it.
    resolving: resolve::Resolving,
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
    pub fn new(settings: &Settings, store: AnyStore, upstreams: Arc<Upstreams>) -> Guard {
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
            resolving: resolve::Resolving::default(),
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

    /// Whether `client` called `/authApp` within the last second and after the record (claimed `age_ms` ago)
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

    /// What a resolver looks for on the server for this call, sent from `sent_from` (wall clock ms); `None`
    /// when it names no app and job as numbers (the server refuses it before any insert). Read again from the
    /// request, only when PowerJob is asked: a duplicate's payload is its leader's, so a duplicate can resolve
    /// a dead leader's key too.
    fn lookup_of(call: &Call, sent_from: i64) -> Option<resolve::Lookup> {
        let text = |name: &str| call.parts.headers.get(name).and_then(|v| v.to_str().ok());
        let payload = key::payload(
            &call.route.name,
            text("content-type"),
            call.parts.uri.query(),
            &call.body,
            text(crate::powerjob::APP_ID),
            None,
        )
        .ok()?;
        let (app, job, params, delay) =
            resolve::Lookup::run_job(&payload.principal, &payload.fields)?;
        let path = call.parts.uri.path();
        Some(resolve::Lookup {
            app,
            job,
            params_sha256: resolve::params_digest(&params),
            prefix: path[..path.find("/openApi/").unwrap_or(0)].to_string(),
            delay,
            sent_from,
            sent_to: wall_ms(),
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
                            self.resolve(store, &call.key, &record.owner, &lookup, &call.parts)
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

    /// Shares the outcome of `flight`, this process's leader of the call's key, with a duplicate.
    async fn join(
        &self,
        store: &AnyStore,
        call: &Call,
        flight: &Flight,
        deadline: tokio::time::Instant,
        seen: &mut Seen,
    ) -> Result<Response<Answer>, Failure> {
        if call.client_keyed && flight.info.fingerprint != call.info.fingerprint {
            metrics::get().key_mismatches.inc();
            let fields = key::differing_fields(&flight.info.fields, &call.info.fields);
            return Err(Failure::Refused(ProxyError::KeyReused { fields }));
        }
        seen.waited_since.get_or_insert_with(Instant::now);
        match tokio::time::timeout_at(deadline, flight.outcome()).await {
            Ok(Shared::Answer(answer)) => self
                .share(call, &flight.info.credential, answer, None)
                .await
                .map_err(Failure::Refused),
            Ok(Shared::Error(err)) => Err(Failure::Refused(err)),
            Err(_) => Err(self.still_running(store, call).await),
        }
    }

    /// 409 for a duplicate whose call still runs at its deadline; the record notes that it is owed the answer.
    async fn still_running(&self, store: &AnyStore, call: &Call) -> Failure {
        if let Err(err) = store.mark_owed(&call.key).await {
            metrics::get().store_errors.inc();
            tracing::warn!(key = call.key.prefix(), %err, "could not note the 409'd duplicate as owed");
        }
        Failure::Refused(ProxyError::StillRunning {
            waited: self.policy.load().wait_timeout,
        })
    }

    /// A stored or shared answer for a duplicate, once its token is good for it ([`Self::check_token`]).
    async fn share(
        &self,
        call: &Call,
        credential: &str,
        answer: Stored,
        mark: Option<(AnyStore, Key, String)>,
    ) -> Result<Response<Answer>, ProxyError> {
        if let Some(refusal) = self.check_token(call, credential, &answer).await? {
            return Ok(refusal);
        }
        Ok(replay(&self.heads, answer, mark).await)
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

    /// Whether a duplicate that found `record` unknown asks PowerJob now: the route has a lookup, the record
    /// and it turned unknown `resolve_after` ago (the server can no longer create it).
    fn due_for_resolving(&self, call: &Call, record: &Record) -> bool {
        let after = self.policy.load().resolve_after.as_millis() as u64;
        call.route.resolve && record.settled_ago_ms.is_some_and(|ago| ago >= after)
    }

    /// Asks PowerJob, `resolve_after` from now, what the unknown call its leader ran in this process created,
    /// with the leader's credentials (kept in memory, never written to the store).
    fn resolve_later(self: &Arc<Self>, store: &AnyStore, call: &Call, owner: &str, sent_from: i64) {
        let Some(lookup) = Self::lookup_of(call, sent_from) else {
            return;
        };
        let after = self.policy.load().resolve_after;
        let (this, store, key) = (Arc::clone(self), store.clone(), call.key.clone());
        let (owner, parts, cut_off) = (owner.to_string(), call.parts.clone(), self.cut_off.clone());
        tokio::spawn(async move {
            // Kept with the record, for an operator's `POST /keys/{key}/resolve`.
            if let Ok(json) = serde_json::to_string(&lookup) {
                if let Err(err) = store.keep_lookup(&key, &owner, &json).await {
                    metrics::get().store_errors.inc();
                    tracing::warn!(key = key.prefix(), %err, "the lookup of the unknown call was not kept; a duplicate can still resolve it");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(after) => {}
                () = cut_off.cancelled() => return,
            }
            // A duplicate or an operator may have settled it meanwhile: the store's fencing makes this a no-op.
            this.resolve(&store, &key, &owner, &lookup, &parts).await;
        });
    }

    /// An operator's `POST /keys/{key}/resolve`: asks PowerJob now about the unknown call on `key`, with the
    /// lookup its leader kept and the credentials of the operator's request (`X-POWERJOB-APP-ID` and
    /// `X-POWERJOB-ACCESS-TOKEN`, when the server checks them), and settles the key by the answer. Returns the
    /// admin's answer: its status and JSON body.
    pub async fn resolve_by_key(
        &self,
        key: &Key,
        operator: &http::HeaderMap,
    ) -> Result<(http::StatusCode, serde_json::Value), StoreError> {
        use http::StatusCode;
        use serde_json::json;
        let store = &self.store;
        let record = match store.get(key).await? {
            None => return Ok((StatusCode::NOT_FOUND, json!({"status": "no such key"}))),
            Some(record) if record.state != State::Unknown => {
                let status = format!(
                    "the key is {}, not unknown: nothing to resolve",
                    record.state.name()
                );
                return Ok((
                    StatusCode::CONFLICT,
                    json!({"status": status, "state": record.state.name()}),
                ));
            }
            Some(record) => record,
        };
        let kept = store.lookup(key).await?;
        let lookup = kept
            .filter(|(owner, _)| *owner == record.owner)
            .and_then(|(_, json)| serde_json::from_str::<resolve::Lookup>(&json).ok());
        let Some(lookup) = lookup else {
            let status = "no lookup is kept with this key (its leader's process ended before the outcome was \
                          recorded, or its route has none): a duplicate after resolve_after resolves it, or check \
                          the server and purge the key";
            return Ok((StatusCode::UNPROCESSABLE_ENTITY, json!({"status": status})));
        };
        let mut parts = Request::new(()).into_parts().0;
        parts.uri = format!("{}{}/runJob", lookup.prefix, crate::powerjob::WEB_PATH)
            .parse()
            .unwrap_or_default();
        for name in [crate::powerjob::APP_ID, crate::powerjob::ACCESS_TOKEN] {
            for value in operator.get_all(name) {
                parts.headers.append(name, value.clone());
            }
        }
        let asked = self
            .resolve(store, key, &record.owner, &lookup, &parts)
            .await;
        let state = match store.get(key).await {
            Ok(Some(record)) => record.state.name(),
            Ok(None) => "gone",
            Err(_) => "unread",
        };
        tracing::info!(key = key.prefix(), state, "admin: key resolution asked");
        Ok(match asked {
            Asked::Found(id) => (
                StatusCode::OK,
                json!({"result": "done", "instance": id, "state": state}),
            ),
            Asked::Nothing => (
                StatusCode::OK,
                json!({"result": "released", "state": state}),
            ),
            Asked::Ambiguous(n) => (
                StatusCode::OK,
                json!({"result": "ambiguous", "matching": n, "state": state}),
            ),
            Asked::Unsupported(why) => (
                StatusCode::OK,
                json!({"result": "unsupported", "why": why, "state": state}),
            ),
            Asked::Refused((head, body)) => (
                StatusCode::FORBIDDEN,
                json!({"result": "refused", "server_status": head.status.as_u16(),
                       "server_body": String::from_utf8_lossy(&body), "state": state}),
            ),
            Asked::Failed(why) => (
                StatusCode::BAD_GATEWAY,
                json!({"result": "failed", "why": why, "state": state}),
            ),
            Asked::Elsewhere => (
                StatusCode::OK,
                json!({"result": "asked by another request", "state": state}),
            ),
        })
    }

    /// Asks PowerJob what the unknown call on `key` (its record created by `owner`) created, on behalf of the
    /// request whose head is `parts`, and settles the key by the answer: done with the one matching instance,
    /// released when there is none, unknown otherwise.
    async fn resolve(
        &self,
        store: &AnyStore,
        key: &Key,
        owner: &str,
        lookup: &resolve::Lookup,
        parts: &request::Parts,
    ) -> Asked {
        let _asking = match self.resolving.begin(key) {
            Ok(asking) => asking,
            Err(mut done) => {
                // Another request of this process asks: its verdict lands on the key.
                let wait = self.policy.load().wait_timeout;
                let _ = tokio::time::timeout(wait, done.changed()).await;
                return Asked::Elsewhere;
            }
        };
        // A request that read the key unknown just before another one's turn settled it.
        if let Ok(Some(record)) = store.get(key).await {
            if record.state != State::Unknown || record.owner != owner {
                return Asked::Elsewhere;
            }
        }
        let asked = self
            .ask_powerjob(parts, lookup, wall_ms(), &|_| false)
            .await;
        let settle = |answer: Option<Stored>| async move {
            match store.resolve(key, owner, answer.as_ref()).await {
                Ok(settled) => settled,
                Err(err) => {
                    metrics::get().store_errors.inc();
                    tracing::warn!(key = key.prefix(), %err, "resolution not recorded; the key stays unknown");
                    false
                }
            }
        };
        let result = match &asked {
            Asked::Found(id) => {
                let (head, body) = resolve::resolved_answer(*id);
                let settled = settle(Some(Stored {
                    status: 200,
                    head,
                    body,
                }))
                .await;
                tracing::info!(
                    key = key.prefix(),
                    instance = id,
                    settled,
                    "PowerJob has the unknown call's instance: done"
                );
                metrics::Resolution::done
            }
            Asked::Nothing => {
                let settled = settle(None).await;
                tracing::info!(
                    key = key.prefix(),
                    settled,
                    "PowerJob has no instance of the unknown call: released"
                );
                metrics::Resolution::released
            }
            Asked::Ambiguous(n) => {
                tracing::warn!(
                    key = key.prefix(),
                    matching = n,
                    "several instances match the unknown call: it stays unknown"
                );
                metrics::Resolution::ambiguous
            }
            Asked::Unsupported(why) => {
                tracing::info!(key = key.prefix(), %why, "the server cannot look up instances (queryInstance needs 5.1.1): the key stays unknown");
                metrics::Resolution::unsupported
            }
            Asked::Refused(_) => {
                tracing::info!(
                    key = key.prefix(),
                    "the server refused the asking request's token: nothing resolved"
                );
                metrics::Resolution::refused
            }
            Asked::Failed(why) => {
                tracing::warn!(key = key.prefix(), %why, "asking PowerJob failed: the key stays unknown");
                metrics::Resolution::failed
            }
            // Not asked here (handled above).
            Asked::Elsewhere => return asked,
        };
        metrics::get().resolution(result);
        asked
    }

    /// Pages through `queryInstance` for the instances that match `lookup`, created up to `until` (wall clock
    /// ms; widened by the clock skew).
    async fn ask_powerjob(
        &self,
        parts: &request::Parts,
        lookup: &resolve::Lookup,
        until: i64,
        skip: &(dyn Fn(i64) -> bool + Sync),
    ) -> Asked {
        let now = until;
        let mut found = Vec::new();
        for index in 0..resolve::MAX_PAGES {
            let body = Bytes::from(lookup.query(now, index).to_string());
            let request = match auth::side_request(parts, "queryInstance", "application/json", body)
            {
                Ok(request) => request,
                Err(err) => return Asked::Failed(format!("cannot build the query: {err}")),
            };
            let bound = self.upstreams.response_timeout().min(auth::VERIFY_TIMEOUT);
            let answer = tokio::time::timeout(bound, async {
                // No repair: the verdict on the token is the server's header as it came.
                let (response, _) = self.upstreams.send(request, Arm::default()).await?;
                let (head, incoming) = response.into_parts();
                let body = Limited::new(incoming, MAX_ANSWER)
                    .collect()
                    .await
                    .map_err(|err| ProxyError::Broken {
                        upstream: "queryInstance".into(),
                        cause: err.to_string(),
                    })?
                    .to_bytes();
                Ok::<_, ProxyError>((head, body))
            })
            .await;
            let (mut head, body) = match answer {
                Ok(Ok(answer)) => answer,
                Ok(Err(err)) => return Asked::Failed(err.to_string()),
                Err(_) => return Asked::Failed(format!("no answer within {bound:?}")),
            };
            if head.status == http::StatusCode::OK && !auth::accepted(&head) {
                headers::remove_hop_by_hop(&mut head.headers);
                return Asked::Refused((head, body));
            }
            if head.status != http::StatusCode::OK {
                return Asked::Failed(format!("HTTP {}", head.status.as_u16()));
            }
            match resolve::read_page(lookup, &body, index, now) {
                resolve::Page::Found { ids, more } => {
                    found.extend(ids.into_iter().filter(|id| !skip(*id)));
                    if found.len() > 1 {
                        return Asked::Ambiguous(found.len());
                    }
                    if !more {
                        return found.first().map_or(Asked::Nothing, |id| Asked::Found(*id));
                    }
                }
                resolve::Page::Unsupported(why) => return Asked::Unsupported(why),
                // A 200 that is not a page: the server (or what answers in its place) has no such query.
                resolve::Page::Malformed => {
                    return Asked::Unsupported("the answer is not a page of instances".into())
                }
            }
        }
        Asked::Failed(format!(
            "more than {} pages of instances in the call's window",
            resolve::MAX_PAGES
        ))
    }

    /// `Some(the server's refusal)` when this duplicate's token is not the leader's and the server does not
    /// accept it; `None` when the stored answer may be replayed to it ([`auth`]).
    async fn check_token(
        &self,
        call: &Call,
        leader: &str,
        stored: &Stored,
    ) -> Result<Option<Response<Answer>>, ProxyError> {
        if call.info.credential == leader {
            return Ok(None);
        }
        let (route, key) = (&call.route.name, call.key.prefix());
        match auth::verify(&self.upstreams, &call.parts, stored).await {
            Ok(auth::Verdict::Accepted) => {
                tracing::debug!(%route, key, "another token, accepted by the server: replaying");
                Ok(None)
            }
            Ok(auth::Verdict::Refused(answer)) => {
                tracing::info!(%route, key, status = answer.status().as_u16(), client = %call.client, "another token, not accepted by the server: its answer, not the stored one");
                Ok(Some(answer))
            }
            Err(err) => Err(err),
        }
    }

    /// Runs the call as the leader. It already runs in the guarded request's own task (see [`Self::handle`]),
    /// so the call finishes and its outcome is recorded whatever happens to the client.
    async fn lead(
        self: &Arc<Self>,
        store: &AnyStore,
        call: &Call,
        token: String,
        seen: &mut Seen,
    ) -> Result<Response<Answer>, ProxyError> {
        seen.led = true;
        let metrics = metrics::get();
        metrics.inflight_keys.inc();
        // Registered before the call: a duplicate in this process joins it from now on.
        let flight = self.flights.lead(&call.key, &token, &call.info);
        let (outcome, led) = self.lead_call(store, call, &token, &flight, seen).await;
        metrics.inflight_keys.dec();
        seen.outcome = Some(outcome);
        let led = led?;
        let body = Answer::new(led.body);
        let body = match led.completion {
            Some(completion) => body
                .record_delivery(completion.handed_out(call.delivery.clone(), self.delivery_grace)),
            None => body,
        };
        Ok(Response::from_parts(led.parts, body))
    }

    /// The upstream call with its lease renewed, then the outcome recorded; returns the outcome too.
    async fn lead_call(
        self: &Arc<Self>,
        store: &AnyStore,
        call: &Call,
        token: &str,
        flight: &Arc<Flight>,
        seen: &mut Seen,
    ) -> ((metrics::Outcome, Reason), Result<Led, ProxyError>) {
        let metrics = metrics::get();
        let key = &call.key;
        // `Parts` clones with its extensions: hyper's record of the client's header-name case goes upstream too.
        let (parts, body) = (call.parts.clone(), call.body.clone());
        let renew = async {
            // The first tick one period from now: `interval`'s immediate first tick would register a timer
            // due at once, and tokio wakes its own driver (an eventfd write) for every timer due before the
            // one it sleeps until, on each guarded call.
            let period = self.lease / 3;
            let mut every = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                every.tick().await;
                match store.renew(key, token, self.lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(
                            key = key.prefix(),
                            "lease lost while the call runs; its outcome will not be stored"
                        );
                        break;
                    }
                    Err(err) => {
                        metrics.store_errors.inc();
                        tracing::warn!(key = key.prefix(), %err, "lease renewal failed");
                    }
                }
            }
            std::future::pending::<()>().await;
        };
        let started = Instant::now();
        let sent_from = wall_ms();
        let led = tokio::select! {
            led = self.send_unless_recalled(store, call, parts, body) => led,
            () = renew => unreachable!("renewal never ends"),
            // The request may have reached the server: the key turns unknown below, never re-sent.
            () = self.cut_off.cancelled() => Err(ProxyError::ShuttingDown),
        };
        let took = started.elapsed();
        seen.upstream = Some(took);
        metrics.upstream_guarded(&call.route.name, took);
        let keep_business_errors = self.policy.load().keep_business_errors;
        // Where a verdict is recorded: the key, kept for the call's window.
        let at = (key, call.info.window);
        let (outcome, answer, shared) = match &led {
            Ok((led, head)) => {
                let outcome = outcome::classify(
                    led.parts.status.as_u16(),
                    &led.parts.headers,
                    &led.body,
                    keep_business_errors,
                );
                let answer = Stored {
                    status: led.parts.status.as_u16(),
                    head: head.clone().unwrap_or_else(|| render_head(&led.parts)),
                    body: led.body.clone(),
                };
                (outcome, Some(answer.clone()), Shared::Answer(answer))
            }
            // Never sent: nothing was created (`ProxyError::sent`, the one rule).
            Err(err) if !err.sent() => (
                Outcome::Release(Reason::not_sent),
                None,
                Shared::Error(err.clone()),
            ),
            // It may have reached the server.
            Err(err) => (
                Outcome::Unknown(Reason::no_answer),
                None,
                Shared::Error(err.clone()),
            ),
        };
        // The duplicates in this process have their answer now, before the store write.
        flight.settle(shared, matches!(outcome, Outcome::Done(_)));
        let reason = outcome.reason();
        let linger = self.policy.load().wait_timeout;
        let (counted, change) = match outcome {
            Outcome::Done(_) => {
                if let (Some(lost), Some(stored)) = (self.quarantined_since(store, call), &answer) {
                    self.handed_out.note(lost, wall_ms(), &stored.body);
                }
                // Stored with its delivery in one write, when the client's connection takes the answer
                // (see `Completion`): the usual call then costs the store two operations, not three.
                let mut led = led;
                if let (Ok((led, _)), Some(stored)) = (&mut led, answer) {
                    led.completion = Some(Completion {
                        write: Some(Write {
                            guard: Arc::clone(self),
                            store: store.clone(),
                            key: key.clone(),
                            window: call.info.window,
                            stored,
                            flight: Arc::clone(flight),
                        }),
                        delivered: false,
                        _pending: self.tracker.token(),
                    });
                }
                return ((metrics::Outcome::done, reason), led.map(|(led, _)| led));
            }
            Outcome::Release(why) => {
                tracing::debug!(key = key.prefix(), why = why.as_str(), "released");
                let verdict = Verdict::Release {
                    answer: answer.clone(),
                };
                (
                    metrics::Outcome::released,
                    self.record(store, at, token, verdict).await,
                )
            }
            Outcome::Unknown(why) => {
                if let Err(err) = &led {
                    tracing::warn!(key = key.prefix(), %err, why = why.as_str(), "outcome unknown: the key is kept and never re-sent");
                } else {
                    tracing::warn!(
                        key = key.prefix(),
                        why = why.as_str(),
                        "outcome unknown: the key is kept and never re-sent"
                    );
                }
                let verdict = Verdict::Unknown {
                    answer: answer.clone(),
                };
                (
                    metrics::Outcome::unknown,
                    self.record(store, at, token, verdict).await,
                )
            }
        };
        let landed = matches!(change, Ok(true));
        self.flights.finished(key, flight, landed, linger);
        if landed && counted == metrics::Outcome::unknown && call.route.resolve {
            self.resolve_later(store, call, token, sent_from);
        }
        note_change(key, change);
        ((counted, reason), led.map(|(led, _)| led))
    }

    /// Records a leader's verdict on its key. When the store fails, the answer goes to the client at once and
    /// the write is retried in the background (tracked, so shutdown waits for it) until it lands or the lease
    /// runs out: the store's scripts are fenced by the token and the lease, so a late retry can never
    /// overwrite another leader's record. Without the retry, a store blip at the end of a call would leave the
    /// key to turn unknown, and every duplicate in the window would get 409 instead of the answer.
    async fn record(
        &self,
        store: &AnyStore,
        (key, window): (&Key, Duration),
        token: &str,
        verdict: Verdict,
    ) -> Result<bool, StoreError> {
        let first = verdict.write(store, key, token, window).await;
        if first.is_ok() {
            return first;
        }
        let deadline = Instant::now() + self.lease;
        let (store, key, token) = (store.clone(), key.clone(), token.to_string());
        let cut_off = self.cut_off.clone();
        self.tracker.spawn(async move {
            let mut pause = Duration::from_millis(100);
            while Instant::now() + pause < deadline {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = cut_off.cancelled() => return,
                }
                match verdict.write(&store, &key, &token, window).await {
                    Ok(recorded) => {
                        tracing::info!(key = key.prefix(), recorded, "outcome recorded on a retry");
                        return;
                    }
                    Err(err) => {
                        metrics::get().store_errors.inc();
                        tracing::debug!(key = key.prefix(), %err, "outcome retry failed");
                    }
                }
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            tracing::warn!(
                key = key.prefix(),
                "outcome not recorded before the lease ran out; the key turns unknown"
            );
        });
        first
    }

    /// Sends a buffered request upstream and reads the whole answer.
    async fn call_upstream(
        &self,
        parts: request::Parts,
        body: Bytes,
        repair: bool,
    ) -> Result<Led, ProxyError> {
        self.call_upstream_capturing(parts, body, repair)
            .await
            .map(|(led, _)| led)
    }

    /// [`Self::call_upstream`], also returning the answer's head as it came (for storing). The whole call
    /// (connecting, the answer's head, its body) is bounded by one `upstream_timeout`, so that a duplicate
    /// waiting `wait_timeout` (never shorter, see `config.rs`) sees its end.
    /// The leader's call, sent, unless the store lost its records lately and PowerJob holds the instance a
    /// forgotten copy of it created ([`Self::recall`]).
    async fn send_unless_recalled(
        &self,
        store: &AnyStore,
        call: &Call,
        parts: request::Parts,
        body: Bytes,
    ) -> Result<(Led, Option<Bytes>), ProxyError> {
        match self.recall(store, call).await {
            Some(recalled) => recalled,
            None => self.call_upstream_capturing(parts, body, call.repair).await,
        }
    }

    /// When the store lost its records, while the quarantine lasts (the route's `window` from the loss) on
    /// a route with a lookup; `None` otherwise (the usual case: a bool, a field and the clock).
    ///
    /// The route's `window`, not the key's: PowerJob keeps no `Idempotency-Key`, so it cannot tell a retry
    /// from another key's call with the same parameters. Looking back a day for keyed calls would take a
    /// job's every run of the day for the forgotten one; a minute catches the retries that follow a loss.
    fn quarantined_since(&self, store: &AnyStore, call: &Call) -> Option<i64> {
        if !self.quarantine || !call.route.resolve {
            return None;
        }
        let lost = store.lost_at()?;
        (wall_ms() - lost < call.route.window.as_millis() as i64).then_some(lost)
    }

    /// The quarantine (`store::epoch`): within the route's window after the store lost its records, a new
    /// leader on a route with a lookup asks PowerJob for an instance of this call created within that window
    /// before the loss (and not by this process's leaders since). One → the answer PowerJob gave the forgotten copy, rebuilt (`X-Runonce-Resolved`);
    /// several → not sent (the key turns unknown, as a resolution leaves it). `None`: send the call (nothing
    /// found, outside a quarantine, or PowerJob cannot tell).
    async fn recall(
        &self,
        store: &AnyStore,
        call: &Call,
    ) -> Option<Result<(Led, Option<Bytes>), ProxyError>> {
        let lost = self.quarantined_since(store, call)?;
        let now = wall_ms();
        let window = call.route.window.as_millis() as i64;
        if self.cannot_look_up.load(Ordering::Relaxed) == lost {
            return None;
        }
        if !self.handed_out.complete(lost) {
            tracing::warn!("quarantine: too many instances created right after the loss to tell them apart; calls are sent unchecked");
            return None;
        }
        // A forgotten copy was sent within the window before this call, and before the loss.
        let lookup = Self::lookup_of(call, now - window)?;
        let key = call.key.prefix();
        // Instances this process's leaders created after the loss are their keys'.
        let theirs = |id: i64| self.handed_out.contains(lost, id);
        let asked = self
            .ask_powerjob(&call.parts, &lookup, lost.min(now), &theirs)
            .await;
        let (result, recalled) = match asked {
            Asked::Found(id) => {
                tracing::info!(key, instance = id, "quarantine: PowerJob has this call's instance from before the store's loss; answering with it, not sending");
                let (head, body) = resolve::resolved_answer(id);
                let answer = match self.heads.replayed(&head).await {
                    Ok(parts) => Ok((
                        Led {
                            parts,
                            body,
                            completion: None,
                        },
                        Some(head),
                    )),
                    Err(err) => Err(ProxyError::Internal {
                        cause: format!("the resolved answer's head does not parse: {err}"),
                    }),
                };
                (QuarantineCheck::found, Some(answer))
            }
            Asked::Nothing => (QuarantineCheck::none, None),
            Asked::Ambiguous(n) => {
                tracing::warn!(key, matching = n, "quarantine: several instances match this call and the store forgot which was its: not sent, the key is unknown");
                let unknown = ProxyError::OutcomeUnknown {
                    retry_after: call.info.window,
                };
                (QuarantineCheck::ambiguous, Some(Err(unknown)))
            }
            Asked::Unsupported(why) => {
                tracing::warn!(%why, "quarantine: the server cannot look instances up (queryInstance needs 5.1.1); calls are sent unchecked until the next loss");
                self.cannot_look_up.store(lost, Ordering::Relaxed);
                (QuarantineCheck::unsupported, None)
            }
            Asked::Refused((parts, body)) => {
                let led = Led {
                    parts,
                    body,
                    completion: None,
                };
                (QuarantineCheck::refused, Some(Ok((led, None))))
            }
            Asked::Failed(why) => {
                tracing::warn!(key, %why, "quarantine: asking PowerJob failed; the call is sent");
                (QuarantineCheck::failed, None)
            }
            // Only a resolution shares its turn.
            Asked::Elsewhere => return None,
        };
        metrics::get().quarantine_check(result);
        recalled
    }

    /// The server requests go to first (the one that answered last): named in the errors of a call that
    /// reached it. Read only on a failure.
    fn current_upstream(&self) -> String {
        let (current, _) = self.upstreams.order();
        self.upstreams.url(current).to_string()
    }

    async fn call_upstream_capturing(
        &self,
        parts: request::Parts,
        body: Bytes,
        repair: bool,
    ) -> Result<(Led, Option<Bytes>), ProxyError> {
        let timeout = self.upstreams.response_timeout();
        tokio::time::timeout(timeout, self.call_upstream_unbounded(parts, body, repair))
            .await
            .unwrap_or_else(|_| {
                Err(ProxyError::Timeout {
                    upstream: self.current_upstream(),
                    timeout,
                })
            })
    }

    async fn call_upstream_unbounded(
        &self,
        parts: request::Parts,
        body: Bytes,
        repair: bool,
    ) -> Result<(Led, Option<Bytes>), ProxyError> {
        let request = Request::from_parts(parts, Either::Right(Full::new(body)));
        let (response, head) = self
            .upstreams
            .send(
                request,
                Arm {
                    repair,
                    capture: true,
                },
            )
            .await?;
        let (mut parts, incoming) = response.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers);
        let body = tokio::time::timeout(
            self.upstreams.response_timeout(),
            Limited::new(incoming, MAX_ANSWER).collect(),
        )
        .await
        .map_err(|_| ProxyError::Timeout {
            upstream: self.current_upstream(),
            timeout: self.upstreams.response_timeout(),
        })?
        .map_err(|err| ProxyError::Broken {
            upstream: self.current_upstream(),
            cause: format!("reading its answer: {err}"),
        })?
        .to_bytes();
        Ok((
            Led {
                parts,
                body,
                completion: None,
            },
            head,
        ))
    }
}

/// Logs a leader's record write that did not land (`Ok(false)`: its key was taken from it).
fn note_change(key: &Key, change: Result<bool, StoreError>) {
    match change {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            key = key.prefix(),
            "the key was no longer this leader's: outcome not recorded"
        ),
        Err(err) => {
            metrics::get().store_errors.inc();
            tracing::warn!(key = key.prefix(), %err, "outcome not recorded yet; retrying while the lease lasts, else the key turns unknown");
        }
    }
}

/// A leader's definite answer, stored in one write with its delivery: once the client's connection confirmed
/// whether the client took the body ([`Completion::handed_out`], `proxy::delivery`), or as not delivered when
/// the body is dropped unread (the client went away). Until then the key stays in flight
/// (duplicates wait, and are woken by the write), and the task tracker counts the completion, so that shutdown
/// waits for it. A write that did not finish (the body dropped while it ran) is run again in a tracked task of
/// its own: the store's scripts are idempotent for their leader, so a second landing changes nothing.
struct Completion {
    /// The write, until it finished.
    write: Option<Write>,
    /// Taken as delivered when handed out (no connection to watch): a write still owed on drop stores it so.
    delivered: bool,
    _pending: TaskTrackerToken,
}

/// A leader's answer and where it goes.
struct Write {
    guard: Arc<Guard>,
    store: AnyStore,
    key: Key,
    window: Duration,
    stored: Stored,
    /// This process's registry entry of the leader (its owner token too): it goes once the store holds the
    /// answer.
    flight: Arc<Flight>,
}

impl Write {
    /// Runs the write: at once when it finishes without waiting (the memory store's always does), else in a
    /// tracked task. `_pending` keeps shutdown waiting until then. Outside a runtime (only while the process
    /// ends) nothing can be written: the key turns unknown.
    fn finish(self, delivered: bool, _pending: TaskTrackerToken) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let tracker = self.guard.tracker.clone();
        let mut write = Box::pin(async move { self.run(delivered).await });
        // Polled once here with a waker that does nothing: a write that has to wait is polled again at
        // once by its task, which registers that task's waker instead.
        let mut now = Context::from_waker(noop_waker());
        if write.as_mut().poll(&mut now).is_pending() {
            tracker.spawn(write);
        }
    }

    async fn run(&self, delivered: bool) {
        let verdict = Verdict::Done {
            stored: self.stored.clone(),
            delivered,
        };
        let at = (&self.key, self.window);
        let change = self
            .guard
            .record(&self.store, at, &self.flight.token, verdict)
            .await;
        let linger = self.guard.policy.load().wait_timeout;
        let landed = matches!(change, Ok(true));
        self.guard
            .flights
            .finished(&self.key, &self.flight, landed, linger);
        note_change(&self.key, change);
    }
}

impl Completion {
    /// The body was handed to the client's connection. With a `delivery` watch, the answer is stored once the
    /// connection confirmed whether the client took it (see `proxy::delivery`): the data goes out now, and
    /// identical calls wait meanwhile (the key is still in flight). The write waits on the connection itself,
    /// counted by the task tracker, and runs where the confirmation comes (the next request's read, the grace
    /// timer, the close), in a tracked task only when it cannot finish at once. Without a watch, it is stored
    /// as delivered before the data goes out.
    async fn handed_out(mut self, delivery: Option<Arc<Delivery>>, grace: Duration) {
        match delivery {
            Some(delivery) => {
                let Some(write) = self.write.take() else {
                    return;
                };
                let pending = write.guard.tracker.token();
                delivery.handed_out(
                    grace,
                    Confirmation::new(move |taken| {
                        if !taken {
                            metrics::get().answers_not_taken.inc();
                        }
                        write.finish(taken, pending);
                    }),
                );
            }
            None => {
                // Should the body be dropped while this runs, `Drop` runs the write again (as delivered).
                self.delivered = true;
                if let Some(write) = &self.write {
                    write.run(true).await;
                }
                self.write = None;
            }
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(write) = self.write.take() {
            let pending = write.guard.tracker.token();
            write.finish(self.delivered, pending);
        }
    }
}

/// A waker that does nothing (`Waker::noop` needs Rust 1.85).
fn noop_waker() -> &'static Waker {
    struct Noop;
    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    static NOOP: OnceLock<Waker> = OnceLock::new();
    NOOP.get_or_init(|| Waker::from(Arc::new(Noop)))
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

/// What asking PowerJob about an unknown call gave (see [`resolve`]).
enum Asked {
    /// One matching instance: the call created it.
    Found(i64),
    /// None: nothing was created.
    Nothing,
    /// Several: cannot tell which is the call's.
    Ambiguous(usize),
    /// The server cannot answer the lookup (a 5.1.0 server cannot bind queryInstance's body).
    Unsupported(String),
    /// The server refused the asking request's credentials: its answer, for that caller.
    Refused((response::Parts, Bytes)),
    /// No usable answer.
    Failed(String),
    /// Another request of this process asked meanwhile; what it found is on the key.
    Elsewhere,
}

/// What a waiter found.
// Lives for one turn of a waiter's loop (as `Claim` does).
#[allow(clippy::large_enum_variant)]
enum Waited {
    /// The record left `InFlight`.
    Settled(Record),
    /// The leader runs in this process (it registered after the claim): share its outcome in memory.
    Here(Arc<Flight>),
    /// The record is gone, and no leader of it runs here: no evidence either way.
    Vanished,
    /// Still in flight at the deadline.
    TooLong,
}

/// Waits until the record settles, vanishes, or the deadline passes, consulting this process's leaders
/// after each look at the store.
async fn wait(
    store: &AnyStore,
    flights: &Flights,
    key: &Key,
    deadline: tokio::time::Instant,
) -> Result<Waited, StoreError> {
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        store.changed(key, left.min(POLL)).await;
        let record = store.get(key).await?;
        if let Some(flight) = flights.find(key) {
            return Ok(Waited::Here(flight));
        }
        match record {
            Some(record) if record.state != State::InFlight => return Ok(Waited::Settled(record)),
            Some(_) if tokio::time::Instant::now() >= deadline => return Ok(Waited::TooLong),
            Some(_) => continue,
            None => return Ok(Waited::Vanished),
        }
    }
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

/// A stored answer as the client receives it: its head as the server sent it, plus `Idempotent-Replayed`.
/// `mark` records the delivery when this answer was never delivered before.
async fn replay(
    heads: &Heads,
    stored: Stored,
    mark: Option<(AnyStore, Key, String)>,
) -> Response<Answer> {
    let parts = match heads.replayed(&stored.head).await {
        Ok(parts) => parts,
        // Stored heads were parsed by hyper once already; this is a safety net, not a path.
        Err(err) => {
            tracing::warn!(%err, "stored head does not parse; replaying with a minimal head");
            let mut response = Response::new(());
            *response.status_mut() =
                http::StatusCode::from_u16(stored.status).unwrap_or(http::StatusCode::OK);
            response
                .headers_mut()
                .insert(REPLAYED, HeaderValue::from_static("true"));
            response.into_parts().0
        }
    };
    Response::from_parts(parts, delivered_body(stored.body, mark))
}

/// The body; when `mark` is given, the store records the delivery before the data goes out.
fn delivered_body(body: Bytes, mark: Option<(AnyStore, Key, String)>) -> Answer {
    let answer = Answer::new(body);
    match mark {
        None => answer,
        Some((store, key, owner)) => answer.record_delivery(async move {
            if let Err(err) = store.mark_delivered(&key, &owner).await {
                metrics::get().store_errors.inc();
                tracing::warn!(key = key.prefix(), %err, "delivery not recorded");
            }
        }),
    }
}

/// A head rendered from parsed parts: the fallback when the tap could not keep the original bytes. Names come
/// out lower-case but for the auth header, which keeps the case the 5.1.0 client looks for.
fn render_head(parts: &response::Parts) -> Bytes {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        let name = if name
            .as_str()
            .eq_ignore_ascii_case(crate::powerjob::AUTH_PASSED)
        {
            crate::powerjob::AUTH_PASSED
        } else {
            name.as_str()
        };
        head.push_str(name);
        head.push_str(": ");
        head.push_str(&String::from_utf8_lossy(value.as_bytes()));
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    Bytes::from(head)
}

/// What a leader's call left on its key.
enum Verdict {
    /// An answer to keep for the window; `delivered` when the client's connection takes it.
    Done { stored: Stored, delivered: bool },
    /// Nothing was created: the key is free again (the answer stays a little while for the waiters).
    Release { answer: Option<Stored> },
    /// The server may have acted: kept, never re-sent.
    Unknown { answer: Option<Stored> },
}

impl Verdict {
    async fn write(
        &self,
        store: &AnyStore,
        key: &Key,
        token: &str,
        window: Duration,
    ) -> Result<bool, StoreError> {
        match self {
            Verdict::Done { stored, delivered } => {
                store.complete(key, token, stored, window, *delivered).await
            }
            Verdict::Release { answer } => store.release(key, token, answer.as_ref()).await,
            Verdict::Unknown { answer } => {
                store
                    .mark_unknown(key, token, window, answer.as_ref())
                    .await
            }
        }
    }
}

/// Wall clock milliseconds since the Unix epoch (PowerJob's instance ids and trigger times are in these).
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
