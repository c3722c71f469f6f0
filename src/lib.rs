//! runonce: a reverse proxy in front of a PowerJob-compatible server that lets one logical instance-creating
//! call reach the server once, however often the client sends it.
//!
//! # Layout
//! The modules, in the order a request meets them:
//! - [`config`]: settings from file < `RUNONCE_*` env < flags, validated once before anything binds.
//! - [`server`]: listeners, connection cap, header limits and read timeout, graceful shutdown; [`tls`] toward
//!   clients when configured.
//! - [`proxy`]: the request's way: access control ([`proxy::access`]), classify, forward as a stream ([`proxy::upstream`] pool and failover,
//!   [`proxy::tap`] auth-header repair on the upstream bytes, [`proxy::headers`] rules), the one
//!   [`proxy::error`] rescue that turns any failure into a PowerJob-shaped answer, and [`proxy::delivery`],
//!   which watches a client's connection for whether it took its answer.
//! - [`guard`]: the idempotency engine on guarded routes: key, claim, lead / wait / replay, outcome; the
//!   leaders this process runs ([`guard::flights`]) answer their duplicates before the store does. It calls
//!   the servers through one seam ([`proxy::upstream::Exchange`]), so its rules are unit-tested without sockets.
//! - [`store`]: where keys live: [`store::memory`] (one process) or [`store::redis`] (shared by replicas).
//! - [`admin`]: the admin listener (`/healthz`, `/readyz`, `/metrics`, the key API, `/reload`); [`health`], the `runonce health` check that GETs it.
//! - [`metrics`]: the Prometheus metrics; [`reload`]: configuration reload (SIGHUP, `POST /reload`).
//! - [`powerjob`]: protocol facts, read from PowerJob's source.
//! - [`sim`]: the simulator, not the product: the mock server ([`sim::mock`]) and the 5.1.0 client emulation
//!   ([`sim::client`]), for the demo, the tests and the benchmark.
//! - [`http1`]: the HTTP/1.1 contract in one place: the head as it came, the framing decision, the chunked
//!   decoder and the head lines the lane writes (framing fields from the decision); the lane, the tap and
//!   [`rawhttp`] read every head with it. A change to framing belongs here; to header rules, in
//!   [`proxy::headers`]; to the engine's leader, in [`guard`]; to the store, in [`store`].
//! - [`rawhttp`]: the one minimal HTTP/1.1 client that keeps header-name case, with a request reader for scripted
//!   upstreams (the client emulation, the demo's mock stats, tests); never on the proxy's request path.
//! - [`telemetry`]: tracing setup.
//! - [`demo`]: the side-by-side demo (direct vs through runonce).

pub mod admin;
pub mod config;
pub mod demo;
pub mod guard;
pub mod health;
pub mod http1;
pub mod metrics;
pub mod powerjob;
pub mod proxy;
pub mod rawhttp;
pub mod reload;
pub mod server;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod workers;
