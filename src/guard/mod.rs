//! The idempotency engine: one upstream call per logical request (DESIGN.md "A request's way through").
//!
//! A guarded request is read whole, keyed ([`key`]: its fingerprint, or its `Idempotency-Key`) and claimed in
//! the store. Then it takes one of three roles:
//! - **leader**: the key was free. Its upstream call runs in a task of its own, which renews the lease, finishes
//!   and records the outcome ([`outcome`]) even when the client goes away.
//! - **waiter**: the call is in flight. It sleeps until the record changes ([`Store::changed`]), then shares
//!   the leader's answer, or claims again if the leader released the key.
//! - **hit**: an answer is stored. It is replayed (`Idempotent-Replayed: true`) when the duplicate is a retry:
//!   nobody received the answer yet, the same `Idempotency-Key`, the 5.1.0 client's re-send after `/authApp`,
//!   or `after_delivery = "replay"`. Otherwise (a client received it) the duplicate is a new call: it takes the
//!   key over and leads.
//!
//! An `unknown` key (the server may have acted, no answer is known) is never re-run: 409 with `Retry-After`.
//! When the store fails, the route's policy answers: `fail-closed` (503) or `fail-open` (an in-process store).

pub mod heads;
pub mod key;
pub mod outcome;
pub mod routes;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{request, response, HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Either, Full, Limited};

use crate::config::{AfterDelivery, AuthHeader, OnStoreError, Settings};
use crate::proxy::answer::Answer;
use crate::proxy::error::ProxyError;
use crate::proxy::headers;
use crate::proxy::tap::Arm;
use crate::proxy::upstream::Upstreams;
use crate::store::memory::MemoryStore;
use crate::store::{AnyStore, Claim, ClaimInfo, Key, Record, State, Store, StoreError, Stored};
use heads::Heads;
use outcome::Outcome;
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
/// Most client addresses whose `/authApp` calls are remembered.
const MAX_AUTH_CALLS: usize = 4096;

/// What the engine counted since start (exported by the metrics endpoint).
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests that claimed a key and went upstream.
    pub leaders: AtomicU64,
    /// Requests that waited for a leader in flight.
    pub waits: AtomicU64,
    /// Requests answered with a stored answer.
    pub replays: AtomicU64,
    /// `Idempotency-Key` reused with another payload (422).
    pub mismatches: AtomicU64,
    /// Calls whose outcome became unknown, and duplicates refused because of one.
    pub unknowns: AtomicU64,
    /// Store operations that failed.
    pub store_errors: AtomicU64,
    /// Identical calls after a delivered answer that ran as new calls.
    pub repeats: AtomicU64,
    /// Leader outcomes released (nothing was created).
    pub released: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// `(name, value)` of every counter.
    pub fn snapshot(&self) -> [(&'static str, u64); 8] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("leaders", get(&self.leaders)),
            ("waits", get(&self.waits)),
            ("replays", get(&self.replays)),
            ("mismatches", get(&self.mismatches)),
            ("unknowns", get(&self.unknowns)),
            ("store_errors", get(&self.store_errors)),
            ("repeats", get(&self.repeats)),
            ("released", get(&self.released)),
        ]
    }
}

/// The engine, shared by every connection.
pub struct Guard {
    store: AnyStore,
    /// De-duplication within this process when the store fails on a `fail-open` route.
    fallback: AnyStore,
    routes: Routes,
    upstreams: Arc<Upstreams>,
    idempotency_key_window: Duration,
    wait_timeout: Duration,
    lease: Duration,
    keep_business_errors: bool,
    /// When each client address last called `/authApp` (the 5.1.0 re-send signature). Only noted when the
    /// auth header is not repaired: with the repair the 5.1.0 client never re-sends.
    auth_calls: Option<Mutex<HashMap<IpAddr, Instant>>>,
    /// Parsed heads of stored answers, for replays.
    heads: Heads,
    pub counters: Counters,
}

/// One guarded request, keyed.
struct Call {
    route: Arc<Route>,
    key: Key,
    info: ClaimInfo,
    /// Keyed by the client's `Idempotency-Key` (then a stored answer is always replayed).
    client_keyed: bool,
    client: SocketAddr,
    parts: request::Parts,
    body: Bytes,
    repair: bool,
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
    /// The outcome was stored as done: the answer's delivery is recorded.
    stored: bool,
}

impl Guard {
    pub fn new(settings: &Settings, store: AnyStore, upstreams: Arc<Upstreams>) -> Guard {
        let fallback = AnyStore::Memory(Arc::new(MemoryStore::new(settings.memory_max_keys.0)));
        Guard {
            store,
            fallback,
            routes: Routes::new(settings),
            upstreams,
            idempotency_key_window: settings.idempotency_key_window.0,
            wait_timeout: settings.wait_timeout.0,
            lease: settings.lease.0,
            keep_business_errors: settings.keep_business_errors.0,
            auth_calls: (settings.auth_header == AuthHeader::Preserve)
                .then(|| Mutex::new(HashMap::new())),
            heads: Heads::default(),
            counters: Counters::default(),
        }
    }

    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// The route guarding this request, if any.
    pub fn route(&self, method: &http::Method, path: &str) -> Option<Arc<Route>> {
        self.routes.find(method, path)
    }

    /// Notes a `/authApp` call from `client`: a duplicate right after it is the 5.1.0 client's re-send.
    pub fn note_auth(&self, client: IpAddr) {
        let Some(calls) = &self.auth_calls else {
            return;
        };
        let now = Instant::now();
        let mut calls = calls.lock().unwrap_or_else(|p| p.into_inner());
        if calls.len() >= MAX_AUTH_CALLS {
            calls.retain(|_, at| now.duration_since(*at) < RESEND_AFTER_AUTH);
            if calls.len() >= MAX_AUTH_CALLS {
                calls.clear();
            }
        }
        calls.insert(client, now);
    }

    /// Whether `client` called `/authApp` within the last second and after the record (claimed `age_ms` ago)
    /// was created: the 5.1.0 client's refresh between its answer and its re-send.
    fn resent_after_auth(&self, client: IpAddr, age_ms: u64) -> bool {
        let Some(calls) = &self.auth_calls else {
            return false;
        };
        let calls = calls.lock().unwrap_or_else(|p| p.into_inner());
        calls.get(&client).is_some_and(|at| {
            let since = at.elapsed();
            since < RESEND_AFTER_AUTH && since < Duration::from_millis(age_ms)
        })
    }

    /// Answers a guarded request whose head passed the limits and whose `parts` are ready to go upstream.
    pub async fn handle(
        self: &Arc<Self>,
        route: Arc<Route>,
        parts: request::Parts,
        body: Bytes,
        client: SocketAddr,
        repair: bool,
    ) -> Result<Response<Answer>, ProxyError> {
        if route.only_creating && key::names_existing_record(&body) {
            // An update of an existing record creates nothing: no key, no store.
            let led = self.call_upstream(parts, body, repair).await?;
            return Ok(Response::from_parts(led.parts, Answer::new(led.body)));
        }
        let call = Arc::new(self.key(route, parts, body, client, repair)?);
        // The decision runs in a task of its own: a client that goes away mid-claim cannot leave a claimed key
        // without its leader.
        let this = Arc::clone(self);
        let decided = tokio::spawn(async move { this.decide_with_policy(call).await });
        decided.await.unwrap_or_else(|err| {
            Err(ProxyError::Broken {
                upstream: "runonce".into(),
                cause: format!("the guarded request's task failed: {err}"),
            })
        })
    }

    /// [`Self::decide`] on the store, and on a store failure what the route's policy says.
    async fn decide_with_policy(
        self: Arc<Self>,
        call: Arc<Call>,
    ) -> Result<Response<Answer>, ProxyError> {
        let route = &call.route.name;
        match self.decide(&self.store, &call).await {
            Ok(answer) => Ok(answer),
            Err(Failure::Refused(err)) => Err(err),
            Err(Failure::Store { err, seen }) => {
                Counters::add(&self.counters.store_errors);
                let unavailable = |err: StoreError| ProxyError::StoreUnavailable {
                    cause: err.to_string(),
                };
                if call.route.on_store_error == OnStoreError::FailClosed || seen {
                    // `seen`: an identical call may be running or done; forwarding could send it twice.
                    tracing::warn!(%route, key = call.key.prefix(), %err, seen, "store failed: refused");
                    return Err(unavailable(err));
                }
                tracing::warn!(%route, key = call.key.prefix(), %err, "store failed: de-duplicating in this process only (fail-open)");
                match self.decide(&self.fallback, &call).await {
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
    ) -> Result<Call, ProxyError> {
        let client_key = client_key(&parts.headers)?;
        let text = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let payload = key::payload(
            &route.name,
            text("content-type"),
            parts.uri.query(),
            &body,
            text(crate::powerjob::APP_ID),
            route.fields.as_deref(),
        );
        let fingerprint = key::fingerprint(parts.method.as_str(), &route.name, &payload);
        let (key, window) = match client_key {
            Some(client_key) => (
                key::idempotency_key(&route.name, &payload.principal, client_key),
                self.idempotency_key_window,
            ),
            None => (fingerprint.clone(), route.window),
        };
        Ok(Call {
            key,
            info: ClaimInfo {
                fingerprint: fingerprint.to_string(),
                fields: key::field_digests(&payload),
                lease: self.lease,
                window,
            },
            client_keyed: client_key.is_some(),
            route,
            client,
            parts,
            body,
            repair,
        })
    }

    /// Claims the key and plays the role the record gives: leader, waiter or hit.
    async fn decide(
        self: &Arc<Self>,
        store: &AnyStore,
        call: &Call,
    ) -> Result<Response<Answer>, Failure> {
        let deadline = tokio::time::Instant::now() + self.wait_timeout;
        // A request that waited for a call in flight is a retry of it: the answer it finds is its own,
        // delivered to someone or not, whichever leader stored it.
        let mut waited = false;
        let mut claim = store
            .claim(&call.key, &call.info)
            .await
            .map_err(|err| Failure::Store { err, seen: false })?;
        // Each turn claims, takes over, or waits until the deadline: the loop ends.
        loop {
            let record = match claim {
                Claim::Leader(token) => {
                    return self
                        .lead(store, call, token)
                        .await
                        .map_err(Failure::Refused)
                }
                Claim::Existing(record) => record,
            };
            if call.client_keyed && record.fingerprint != call.info.fingerprint {
                Counters::add(&self.counters.mismatches);
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
                        || call.client_keyed
                        || call.route.after_delivery == AfterDelivery::Replay
                        || self.resent_after_auth(call.client.ip(), record.age_ms);
                    if retry {
                        Counters::add(&self.counters.replays);
                        let mark =
                            (!delivered).then(|| (store.clone(), call.key.clone(), record.owner));
                        return Ok(replay(&self.heads, response, mark).await);
                    }
                    Counters::add(&self.counters.repeats);
                    tracing::info!(route = %call.route.name, key = call.key.prefix(), "identical call after a delivered answer: a new call");
                    claim = store.takeover(&call.key, &record.owner, &call.info).await?;
                }
                State::Unknown => {
                    Counters::add(&self.counters.unknowns);
                    let left = call
                        .info
                        .window
                        .saturating_sub(Duration::from_millis(record.age_ms));
                    return Err(Failure::Refused(ProxyError::OutcomeUnknown {
                        retry_after: left,
                    }));
                }
                State::InFlight => {
                    if !waited {
                        Counters::add(&self.counters.waits);
                    }
                    waited = true;
                    claim = match wait(store, &call.key, deadline).await? {
                        Some(settled) => Claim::Existing(settled),
                        // Released (nothing was created) or expired: the next claim may lead.
                        None => store.claim(&call.key, &call.info).await?,
                    };
                    if let Claim::Existing(Record {
                        state: State::InFlight,
                        ..
                    }) = claim
                    {
                        if tokio::time::Instant::now() >= deadline {
                            return Err(Failure::Refused(ProxyError::StillRunning {
                                waited: self.wait_timeout,
                            }));
                        }
                    }
                }
            }
        }
    }

    /// Runs the call as the leader. It already runs in the guarded request's own task (see [`Self::handle`]),
    /// so the call finishes and its outcome is recorded whatever happens to the client.
    async fn lead(
        &self,
        store: &AnyStore,
        call: &Call,
        token: String,
    ) -> Result<Response<Answer>, ProxyError> {
        Counters::add(&self.counters.leaders);
        let started = Instant::now();
        let (outcome, led) = self.lead_call(store, call, &token).await;
        tracing::info!(route = %call.route.name, key = call.key.prefix(), role = "leader", upstream_ms = started.elapsed().as_millis() as u64, outcome, "guarded call");
        let led = led?;
        let mark = led.stored.then(|| (store.clone(), call.key.clone(), token));
        Ok(Response::from_parts(
            led.parts,
            delivered_body(led.body, mark),
        ))
    }

    /// The upstream call with its lease renewed, then the outcome recorded; returns the outcome's name too.
    async fn lead_call(
        &self,
        store: &AnyStore,
        call: &Call,
        token: &str,
    ) -> (&'static str, Result<Led, ProxyError>) {
        let (key, window) = (&call.key, call.info.window);
        // `Parts` clones with its extensions: hyper's record of the client's header-name case goes upstream too.
        let (parts, body) = (call.parts.clone(), call.body.clone());
        let renew = async {
            let mut every = tokio::time::interval(self.lease / 3);
            every.tick().await;
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
                        Counters::add(&self.counters.store_errors);
                        tracing::warn!(key = key.prefix(), %err, "lease renewal failed");
                    }
                }
            }
            std::future::pending::<()>().await;
        };
        let led = tokio::select! {
            led = self.call_upstream_capturing(parts, body, call.repair) => led,
            () = renew => unreachable!("renewal never ends"),
        };
        let (outcome, change, result) = match led {
            Ok((mut led, head)) => match outcome::classify(
                led.parts.status.as_u16(),
                &led.parts.headers,
                &led.body,
                self.keep_business_errors,
            ) {
                Outcome::Done => {
                    let stored = Stored {
                        status: led.parts.status.as_u16(),
                        head: head.unwrap_or_else(|| render_head(&led.parts)),
                        body: led.body.clone(),
                    };
                    led.stored = true;
                    (
                        "done",
                        store.complete(key, token, &stored, window).await,
                        Ok(led),
                    )
                }
                Outcome::Release(why) => {
                    tracing::debug!(key = key.prefix(), why, "released");
                    Counters::add(&self.counters.released);
                    ("released", store.release(key, token).await, Ok(led))
                }
                Outcome::Unknown(why) => {
                    tracing::warn!(
                        key = key.prefix(),
                        why,
                        "outcome unknown: the key is kept and never re-sent"
                    );
                    Counters::add(&self.counters.unknowns);
                    (
                        "unknown",
                        store.mark_unknown(key, token, window).await,
                        Ok(led),
                    )
                }
            },
            // A buffered body cannot fail on the client's side: anything but "never sent" may have reached the
            // server.
            Err(err) if !matches!(err, ProxyError::Unreachable { .. }) => {
                Counters::add(&self.counters.unknowns);
                (
                    "unknown",
                    store.mark_unknown(key, token, window).await,
                    Err(err),
                )
            }
            Err(err) => {
                Counters::add(&self.counters.released);
                ("released", store.release(key, token).await, Err(err))
            }
        };
        let recorded = matches!(change, Ok(true));
        match change {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                key = key.prefix(),
                "the key was no longer this leader's: outcome not recorded"
            ),
            Err(err) => {
                Counters::add(&self.counters.store_errors);
                tracing::warn!(key = key.prefix(), %err, "outcome not recorded; the lease will run out and the key turn unknown");
            }
        }
        let result = result.map(|mut led| {
            led.stored &= recorded;
            led
        });
        (outcome, result)
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

    /// [`Self::call_upstream`], also returning the answer's head as it came (for storing).
    async fn call_upstream_capturing(
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
        let upstream = "upstream answer";
        let body = tokio::time::timeout(
            self.upstreams.response_timeout(),
            Limited::new(incoming, MAX_ANSWER).collect(),
        )
        .await
        .map_err(|_| ProxyError::Timeout {
            upstream: upstream.into(),
            timeout: self.upstreams.response_timeout(),
        })?
        .map_err(|err| ProxyError::Broken {
            upstream: upstream.into(),
            cause: err.to_string(),
        })?
        .to_bytes();
        Ok((
            Led {
                parts,
                body,
                stored: false,
            },
            head,
        ))
    }
}

/// Waits until the record is settled (`Some`), gone (`None`), or the deadline passed (`Some` still in flight).
async fn wait(
    store: &AnyStore,
    key: &Key,
    deadline: tokio::time::Instant,
) -> Result<Option<Record>, StoreError> {
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        store.changed(key, left.min(POLL)).await;
        match store.get(key).await? {
            Some(record)
                if record.state == State::InFlight && tokio::time::Instant::now() < deadline =>
            {
                continue
            }
            other => return Ok(other),
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
