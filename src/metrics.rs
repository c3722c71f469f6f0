//! Metrics, served by the admin listener at `/metrics` in the Prometheus (OpenMetrics) text format.
//!
//! One process-wide set, kept by `prometheus-client`: counters and gauges are atomics, and every handle the
//! request path uses without a guarded route (pass-through requests, failovers, header repairs) is resolved once
//! at start, so counting a pass-through request is one atomic add and one histogram observation, with no label
//! built per request. Guarded requests look their `(route, role)` counter up by the route's shared name (an
//! `Arc`, cloned, never a new string).
//!
//! The names (all prefixed `runonce_`) are listed in README.md "Operations".

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The role a request played: how runonce answered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the label values, as Prometheus shows them
pub enum Role {
    /// Claimed its key and went upstream.
    leader,
    /// Waited for an identical call in flight and shared its answer.
    waiter,
    /// Answered with a stored answer.
    hit,
    /// Not a guarded route: streamed to the upstream untouched.
    passthrough,
    /// Refused by runonce (unknown outcome, still running, key reused, bad key, store down, …).
    rejected,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::leader => "leader",
            Role::waiter => "waiter",
            Role::hit => "hit",
            Role::passthrough => "passthrough",
            Role::rejected => "rejected",
        }
    }
}

/// A route's name as a label value, shared with the route rather than copied per request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteName(pub Arc<str>);

impl EncodeLabelValue for RouteName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteRole {
    pub route: RouteName,
    pub role: Role,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: RouteName,
}

/// How a leader's call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    done,
    released,
    unknown,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::done => "done",
            Outcome::released => "released",
            Outcome::unknown => "unknown",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: Outcome,
    /// Why (see `guard::outcome`'s table).
    pub reason: crate::guard::outcome::Reason,
}

/// The route label of every pass-through request: routes not guarded are not told apart (their names come from
/// clients, and a label per name would let clients grow the metrics without bound).
pub const PASSTHROUGH_ROUTE: &str = "other";

/// Every metric runonce keeps.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteRole, Counter>,
    /// `requests{route="other",role="passthrough"}`, resolved once.
    passthrough: Counter,
    /// `requests{route="other",role="rejected"}`: refused before routing.
    rejected: Counter,
    /// Duplicates that did not reach the server: waiters, hits, and duplicates refused because of an unknown or
    /// still-running call.
    pub duplicates_suppressed: Counter,
    /// Upstream time of guarded leaders' calls, by route.
    upstream_guarded: Family<RouteLabel, Histogram>,
    /// Upstream time (to the answer's head) of pass-through requests.
    pub upstream_passthrough: Histogram,
    /// How long waiters waited for a leader.
    pub wait: Histogram,
    /// Leaders whose call is running in this process.
    pub inflight_keys: Gauge,
    /// 1 when `/readyz` would answer 200, as of the last check (each probe, and every 5 s once scraped).
    pub ready: Gauge,
    pub auth_headers_repaired: Counter,
    pub store_errors: Counter,
    pub upstream_failovers: Counter,
    outcomes: Family<OutcomeLabel, Counter>,
    /// Delivered answers the memory store evicted early to make room.
    pub memory_evictions: Counter,
    /// `Idempotency-Key` reused with another payload (422).
    pub key_mismatches: Counter,
    /// Identical calls after a delivered answer that ran as new calls.
    pub new_calls_after_delivery: Counter,
    pub answers_not_taken: Counter,
    /// Successful and refused configuration reloads.
    pub reloads: Family<ReloadLabel, Counter>,
    /// Unknown outcomes runonce asked PowerJob about, by what it found.
    pub resolutions: Family<ResolutionLabel, Counter>,
    /// Times the store was found to have lost its records; each starts a quarantine.
    pub store_losses: Counter,
    /// New leaders that asked PowerJob first during a quarantine, by what it found.
    quarantine_checks: Family<QuarantineLabel, Counter>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct QuarantineLabel {
    pub result: QuarantineCheck,
}

/// What a new leader that asked PowerJob first, after the store lost its records, found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum QuarantineCheck {
    /// One matching instance: a forgotten copy of the call created it; the call is answered with it.
    found,
    /// None: the call is sent.
    none,
    /// Several: the call is not sent; its key turns unknown.
    ambiguous,
    /// The server cannot answer the lookup: the call is sent, and the rest of the quarantine asks no more.
    unsupported,
    /// The server refused the request's credentials: it gets the server's answer, nothing is sent.
    refused,
    /// No usable answer: the call is sent.
    failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResolutionLabel {
    pub result: Resolution,
}

/// What asking PowerJob about an unknown call found (see `guard::resolve`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Resolution {
    /// One matching instance: the key is done with it.
    done,
    /// None: nothing was created, the key is released.
    released,
    /// Several: the key stays unknown.
    ambiguous,
    /// The server cannot answer the lookup (5.1.0 and older; a 200 that is not a page): the key stays unknown.
    unsupported,
    /// The server refused the asking request's credentials: that caller gets its answer.
    refused,
    /// No usable answer (unreachable, timeout, not a page of instances): the key stays unknown.
    failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabel {
    pub result: ReloadResult,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadResult {
    applied,
    refused,
}

/// Seconds buckets from 1 ms to about 33 s (PowerJob answers in milliseconds; waits last up to `wait_timeout`).
fn seconds_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16)
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("runonce");
        let requests = Family::<RouteRole, Counter>::default();
        registry.register(
            "requests",
            "Client requests by route and by the role runonce gave them",
            requests.clone(),
        );
        let passthrough = requests
            .get_or_create(&RouteRole {
                route: RouteName(Arc::from(PASSTHROUGH_ROUTE)),
                role: Role::passthrough,
            })
            .clone();
        let rejected = requests
            .get_or_create(&RouteRole {
                route: RouteName(Arc::from(PASSTHROUGH_ROUTE)),
                role: Role::rejected,
            })
            .clone();
        let duplicates_suppressed = Counter::default();
        registry.register(
            "duplicates_suppressed",
            "Duplicate requests that did not reach the server",
            duplicates_suppressed.clone(),
        );
        // Family's default constructor type is a fn pointer, which a closure without captures coerces to.
        let upstream_guarded: Family<RouteLabel, Histogram> =
            Family::new_with_constructor(|| Histogram::new(seconds_buckets()));
        registry.register(
            "upstream_guarded_seconds",
            "Upstream time of guarded calls (leaders), request sent to answer read, by route",
            upstream_guarded.clone(),
        );
        let upstream_passthrough = Histogram::new(seconds_buckets());
        registry.register(
            "upstream_passthrough_seconds",
            "Upstream time of pass-through requests, request sent to the answer's head",
            upstream_passthrough.clone(),
        );
        let wait = Histogram::new(seconds_buckets());
        registry.register(
            "wait_seconds",
            "Time duplicates waited for an identical call in flight",
            wait.clone(),
        );
        let inflight_keys = Gauge::default();
        registry.register(
            "inflight_keys",
            "Guarded calls running upstream in this process (keys this process leads)",
            inflight_keys.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when runonce answers /readyz with 200 (an upstream accepts a connection, not shutting down), as of the last check: each probe, and every 5 s once scraped",
            ready.clone(),
        );
        let auth_headers_repaired = Counter::default();
        registry.register(
            "auth_headers_repaired",
            "Answers whose X-POWERJOB-AUTH-PASSED header runonce added or re-cased",
            auth_headers_repaired.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "store_errors",
            "Store operations that failed",
            store_errors.clone(),
        );
        let upstream_failovers = Counter::default();
        registry.register(
            "upstream_failovers",
            "Requests sent to another upstream because one could not be connected to (never after sending)",
            upstream_failovers.clone(),
        );
        let outcomes = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "leader_outcomes",
            "How leaders' calls ended: done (answer stored), released (nothing created), unknown; reason says why",
            outcomes.clone(),
        );
        let memory_evictions = Counter::default();
        registry.register(
            "memory_evictions",
            "Delivered answers the memory store dropped before their window ended, to stay within memory_max_keys",
            memory_evictions.clone(),
        );
        let key_mismatches = Counter::default();
        registry.register(
            "idempotency_key_mismatches",
            "Idempotency-Key reused with another payload (422)",
            key_mismatches.clone(),
        );
        let new_calls_after_delivery = Counter::default();
        registry.register(
            "new_calls_after_delivery",
            "Identical calls after a client received the answer that ran again",
            new_calls_after_delivery.clone(),
        );
        let answers_not_taken = Counter::default();
        registry.register(
            "answers_not_taken",
            "Leaders' answers the client's connection did not take (reset, or closed before it came): replayed to its retry",
            answers_not_taken.clone(),
        );
        let reloads = Family::<ReloadLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, applied or refused",
            reloads.clone(),
        );
        let resolutions = Family::<ResolutionLabel, Counter>::default();
        registry.register(
            "resolutions",
            "Unknown runJob outcomes runonce asked PowerJob about (queryInstance): done, released, ambiguous, unsupported, refused, failed",
            resolutions.clone(),
        );
        let store_losses = Counter::default();
        registry.register(
            "store_losses",
            "Times the store was found to have lost its records (Redis flushed, restarted or failed over; the memory store starting): each starts a quarantine",
            store_losses.clone(),
        );
        let quarantine_checks = Family::<QuarantineLabel, Counter>::default();
        registry.register(
            "quarantine_checks",
            "New runJob leaders that asked PowerJob first while the store was in quarantine: found, none, ambiguous, unsupported, refused, failed",
            quarantine_checks.clone(),
        );
        // Every result of the families an alert or a dashboard reads is exported from the start, at 0: a series
        // that appears only with its first increase cannot be told from one that is not exported.
        for result in [ReloadResult::applied, ReloadResult::refused] {
            let _ = reloads.get_or_create(&ReloadLabel { result });
        }
        use Resolution as R;
        for result in [
            R::done,
            R::released,
            R::ambiguous,
            R::unsupported,
            R::refused,
            R::failed,
        ] {
            let _ = resolutions.get_or_create(&ResolutionLabel { result });
        }
        use QuarantineCheck as Q;
        for result in [
            Q::found,
            Q::none,
            Q::ambiguous,
            Q::unsupported,
            Q::refused,
            Q::failed,
        ] {
            let _ = quarantine_checks.get_or_create(&QuarantineLabel { result });
        }
        Metrics {
            registry,
            requests,
            passthrough,
            rejected,
            duplicates_suppressed,
            upstream_guarded,
            upstream_passthrough,
            wait,
            inflight_keys,
            ready,
            auth_headers_repaired,
            store_errors,
            upstream_failovers,
            outcomes,
            key_mismatches,
            memory_evictions,
            new_calls_after_delivery,
            answers_not_taken,
            reloads,
            resolutions,
            store_losses,
            quarantine_checks,
        }
    }

    /// Counts one request.
    pub fn request(&self, route: &Arc<str>, role: Role) {
        if role == Role::passthrough {
            self.passthrough.inc();
            return;
        }
        self.requests
            .get_or_create(&RouteRole {
                route: RouteName(Arc::clone(route)),
                role,
            })
            .inc();
    }

    /// Counts one pass-through request.
    pub fn passthrough(&self) {
        self.passthrough.inc();
    }

    /// Counts one request refused before it was routed (head limits, access rules, `CONNECT`, body limits).
    pub fn rejected(&self) {
        self.rejected.inc();
    }

    pub fn upstream_guarded(&self, route: &Arc<str>, took: Duration) {
        self.upstream_guarded
            .get_or_create(&RouteLabel {
                route: RouteName(Arc::clone(route)),
            })
            .observe(took.as_secs_f64());
    }

    pub fn outcome(&self, outcome: Outcome, reason: crate::guard::outcome::Reason) {
        self.outcomes
            .get_or_create(&OutcomeLabel { outcome, reason })
            .inc();
    }

    pub fn resolution(&self, result: Resolution) {
        self.resolutions
            .get_or_create(&ResolutionLabel { result })
            .inc();
    }

    pub fn quarantine_check(&self, result: QuarantineCheck) {
        self.quarantine_checks
            .get_or_create(&QuarantineLabel { result })
            .inc();
    }

    pub fn reload(&self, result: ReloadResult) {
        self.reloads.get_or_create(&ReloadLabel { result }).inc();
    }

    /// The text a Prometheus scrape receives.
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// `Content-Type` of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
