//! A PowerJob-compatible fake server for tests and the demo.
//!
//! It owns: the `/openApi/**` endpoints a PowerJob client uses (`/assert`, `/authApp`, `/runJob`, `/runWorkflow`,
//! `/saveJob`, `/fetchInstanceInfo`, `/fetchInstanceStatus`, `/queryInstance`, `/retryInstance`, `/stopInstance`),
//! the server modes that decide whether `X-POWERJOB-AUTH-PASSED` is sent (see [`Mode`] and `shared/POWERJOB.md`
//! §3.5 and §7), faults injected into instance-creating calls (see [`FaultKind`]), a record of every request, and
//! the `/mock/*` admin endpoints that expose that record:
//!
//! - `GET /mock/stats`: instance and request counters as JSON, and the fault in force (`fault`, `faults_injected`,
//!   `stalled`).
//! - `GET /mock/requests`: every recorded request in arrival order.
//! - `POST /mock/reset`: clears counters and records (issued tokens, created instances and the fault stay).
//! - `POST /mock/expire-tokens`: makes every issued token expired, to exercise the `TOKEN_EXPIRED` path.
//! - `POST /mock/fault`: sets the fault, from JSON `{"kind":"timeout-after-create","count":1}` or the same as form
//!   fields; `count` absent = every creating call until changed, `message` replaces the `success:false` text,
//!   `{"kind":"none"}` clears. `GET /mock/fault` shows it.
//! - `POST /mock/create-instance`: form `jobId`, `appId`, `instanceParams`, `delay`; creates an instance as if
//!   another client had called `runJob` (counted like one, no checks, no fault) and answers `{"instanceId":…}`.
//!   For tests where runonce must not mistake someone else's instance for its own.
//!
//! Like the real server, it creates a new instance for every accepted `runJob`: there is no de-duplication here,
//! which is what lets tests count duplicates.
//!
//! # Faults (POWERJOB.md §10)
//!
//! A fault hits `runJob` and `runWorkflow` calls that pass the auth check and the controller's checks, at the
//! moment the instance would be created; refused calls answer as usual and do not use up a fault's count. Every
//! kind but `close-without-create` creates the instance first (counted in `instances`, `instances_by_job` or
//! `workflow_instances`, visible to `/fetchInstanceInfo` and `/queryInstance`), then:
//!
//! | kind | answer |
//! |---|---|
//! | `timeout-after-create` | HTTP 200 `success:false`, `TimeoutException: null` (the `@DesignateServer` forward timing out) |
//! | `error-after-create` | HTTP 200 `success:false`, `PowerJobException: dispatch failed` (the synchronous dispatch failing) |
//! | `5xx-after-create` | HTTP 500, Spring Boot's error JSON, no auth header |
//! | `502-after-create`, `504-after-create` | nginx's HTML error page, as from a hop between the client and the server |
//! | `stall-after-create` | nothing: the connection is held until the client leaves or the mock stops (10 minutes at most), then closed |
//! | `close-without-create` | nothing is created; the connection is closed without an answer (sent, never created) |
//!
//! `success:false` bodies take the mode's shape (`code` in 5.1.x, none in v4) and its auth header. Their message
//! can be replaced ([`Fault::message`], `--fault-message`, `"message"` in `/mock/fault`). The default
//! `TimeoutException: null` is the text POWERJOB.md §10 gives; read from the source, a 5.1.x server more likely
//! answers `UndeclaredThrowableException: ` (Spring's proxy wraps the forward's checked `TimeoutException`, and
//! commons-lang's `ExceptionUtils.getMessage` prints a null message as nothing). Both follow a created instance.
//!
//! Ids are snowflakes as PowerJob's (`(ms − 1555776000000) << 22 | seq`) and `gmtCreate` is read from the id, so a
//! time window and an id range select the same instances.
//!
//! # `/queryInstance` (POWERJOB.md §11)
//!
//! In `v5.1.1-auth-off` and `auth-on` it is 5.1.1's paged query: an `InstancePageQuery` JSON body, predicates
//! ANDed, ascending, `PageResult` out. In `v5.1.0-auth-off` and `v4` it fails as those servers do, because their
//! body type is the abstract `PowerQuery`: a JSON object gives `HttpMessageConversionException: Type definition
//! error: …` (Spring turns Jackson's `InvalidDefinitionException` into that), an empty or malformed body
//! `HttpMessageNotReadableException: …`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{request, response, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use md5::{Digest, Md5};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::powerjob::{
    header_present, result_json, result_json_v4, served_endpoint, status, ACCESS_TOKEN, APP_ID,
    AUTH_PASSED,
};
use crate::proxy::headers::{exact_case_head, parse_response_head};
use crate::rawhttp;

/// Request bodies above this are refused rather than buffered.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// PowerJob's JWT lifetime default (`oms.auth.security.jwt.expire-seconds`).
const TOKEN_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// The job id that stands for "a job that does not exist"; every other positive id exists.
const MISSING_JOB_ID: i64 = 999;
/// Jobs created by `/saveJob` start here, clear of [`MISSING_JOB_ID`].
const FIRST_NEW_JOB_ID: i64 = 1000;
/// The snowflake epoch of PowerJob's `SnowFlakeIdGenerator` (2019-04-21).
const SNOWFLAKE_EPOCH_MS: i64 = 1_555_776_000_000;
const SNOWFLAKE_SEQ_MASK: i64 = 0x3F_FFFF;
/// `InstanceType.NORMAL`.
const INSTANCE_TYPE_NORMAL: i32 = 1;
/// Reported as the worker that ran a finished instance.
const FAKE_TASK_TRACKER: &str = "127.0.0.1:27777";
/// `timeout-after-create`'s default message, as POWERJOB.md §10 gives it (the module docs say what else a server
/// may send).
const TIMEOUT_MESSAGE: &str = "TimeoutException: null";
/// `error-after-create`'s default message: a `PowerJobException` without an error code, so `code` is null.
const DISPATCH_FAILED_MESSAGE: &str = "PowerJobException: dispatch failed";
/// The longest `stall-after-create` holds a connection: long past any client's timeout, short of forever.
const STALL_LIMIT: Duration = Duration::from_secs(600);

/// Which PowerJob server the mock behaves like, as far as the auth header goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 5.1.0 with auth off: never sends `X-POWERJOB-AUTH-PASSED`, so a 5.1.0 client sends every call twice.
    V510AuthOff,
    /// 5.1.0-bugfix / 5.1.1 with auth off: `X-POWERJOB-AUTH-PASSED: true` on every `/openApi` answer.
    V511AuthOff,
    /// 5.1.x with `oms.auth.openapi.enable=true`: tokens are checked on everything but `/assert` and `/authApp`.
    AuthOn,
    /// 4.3.x: no `/authApp`, no header, `ResultDTO` bodies without `code`.
    V4,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::V510AuthOff, Mode::V511AuthOff, Mode::AuthOn, Mode::V4];

    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::V510AuthOff => "v5.1.0-auth-off",
            Mode::V511AuthOff => "v5.1.1-auth-off",
            Mode::AuthOn => "auth-on",
            Mode::V4 => "v4",
        }
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        by_name(&Mode::ALL, Mode::as_str, s, "mock mode")
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one of `all` whose `name` is `s`, or an error naming `what` and every name allowed.
fn by_name<T: Copy>(
    all: &[T],
    name: fn(&T) -> &'static str,
    s: &str,
    what: &str,
) -> Result<T, String> {
    all.iter()
        .copied()
        .find(|item| name(item) == s)
        .ok_or_else(|| {
            let allowed: Vec<&str> = all.iter().map(name).collect();
            format!(
                "unknown {what} `{s}`; expected one of: {}",
                allowed.join(", ")
            )
        })
}

/// What the mock does to an instance-creating call (`runJob`, `runWorkflow`) instead of answering it normally.
/// Each kind reproduces an answer that PowerJob or a hop in front of it can give; see the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FaultKind {
    /// No fault: create and answer normally.
    #[default]
    None,
    /// Create, then HTTP 200 `success:false` `TimeoutException: null`.
    TimeoutAfterCreate,
    /// Create, then HTTP 200 `success:false` `PowerJobException: dispatch failed`.
    ErrorAfterCreate,
    /// Create, then HTTP 500 with Spring Boot's error JSON.
    ServerErrorAfterCreate,
    /// Create, then 502 with nginx's HTML page.
    BadGatewayAfterCreate,
    /// Create, then 504 with nginx's HTML page.
    GatewayTimeoutAfterCreate,
    /// Create, then hold the connection without answering.
    StallAfterCreate,
    /// Create nothing and close the connection without answering.
    CloseWithoutCreate,
}

impl FaultKind {
    const ALL: [FaultKind; 8] = [
        FaultKind::None,
        FaultKind::TimeoutAfterCreate,
        FaultKind::ErrorAfterCreate,
        FaultKind::ServerErrorAfterCreate,
        FaultKind::BadGatewayAfterCreate,
        FaultKind::GatewayTimeoutAfterCreate,
        FaultKind::StallAfterCreate,
        FaultKind::CloseWithoutCreate,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            FaultKind::None => "none",
            FaultKind::TimeoutAfterCreate => "timeout-after-create",
            FaultKind::ErrorAfterCreate => "error-after-create",
            FaultKind::ServerErrorAfterCreate => "5xx-after-create",
            FaultKind::BadGatewayAfterCreate => "502-after-create",
            FaultKind::GatewayTimeoutAfterCreate => "504-after-create",
            FaultKind::StallAfterCreate => "stall-after-create",
            FaultKind::CloseWithoutCreate => "close-without-create",
        }
    }
}

impl FromStr for FaultKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        by_name(&FaultKind::ALL, FaultKind::as_str, s, "fault")
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fault in force: which kind, for how many more creating calls, and an optional message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    /// How many more creating calls get it; `None`: every one until it is changed. Back to no fault at 0.
    pub remaining: Option<u64>,
    /// Replaces the `message` of the `success:false` kinds (`timeout-after-create`, `error-after-create`), e.g.
    /// with `UndeclaredThrowableException: `, which is what Spring's AOP proxy may make of the forward's
    /// `TimeoutException`; ignored by the other kinds.
    pub message: Option<String>,
}

impl Fault {
    /// `kind` for the next `count` creating calls (`None`: all of them).
    pub fn new(kind: FaultKind, count: Option<u64>) -> Self {
        Self {
            kind,
            remaining: count,
            message: None,
        }
    }

    /// No fault at all for `none` or a count of 0, so that `/mock/stats` never shows a fault that cannot fire.
    fn normalized(self) -> Self {
        if self.kind == FaultKind::None || self.remaining == Some(0) {
            Fault::default()
        } else {
            self
        }
    }

    /// The fault for the next creating call, counted down; `FaultKind::None` when there is none (left).
    fn take(&mut self) -> Injected {
        if self.remaining == Some(0) {
            *self = Fault::default();
        }
        let injected = Injected {
            kind: self.kind,
            message: self.message.clone(),
        };
        if let Some(remaining) = self.remaining.as_mut() {
            *remaining -= 1;
            if *remaining == 0 {
                *self = Fault::default();
            }
        }
        injected
    }

    fn to_json(&self) -> Value {
        json!({ "kind": self.kind.as_str(), "remaining": self.remaining, "message": self.message })
    }
}

/// One creating call's share of a [`Fault`].
#[derive(Debug)]
struct Injected {
    kind: FaultKind,
    message: Option<String>,
}

/// The mock drops the connection without answering, on purpose. Handed to hyper as the service's error, which
/// makes it close the connection without writing a response.
#[derive(Debug, thiserror::Error)]
#[error("the mock closed the connection without answering (fault {0})")]
pub struct Hangup(FaultKind);

/// How the mock behaves and which single app it knows.
#[derive(Clone, Debug)]
pub struct MockOptions {
    pub mode: Mode,
    /// Added before answering `runJob` and `runWorkflow`, after the instance exists: a client that times out
    /// meanwhile has still created it, as against a real server that commits and then answers slowly.
    pub latency: Duration,
    /// Added before answering `queryInstance`: a slow lookup.
    pub query_latency: Duration,
    /// How many `queryInstance` calls, the first ones, fail with HTTP 500 (a server that is briefly down).
    pub query_failures: u64,
    pub app_name: String,
    pub password: String,
    pub app_id: i64,
    /// The fault instance-creating calls get from the start (`Fault::default()`: none); `POST /mock/fault`
    /// replaces it at run time.
    pub fault: Fault,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            mode: Mode::V510AuthOff,
            latency: Duration::ZERO,
            query_latency: Duration::ZERO,
            query_failures: 0,
            app_name: "my-app".to_owned(),
            password: "123456".to_owned(),
            app_id: 1,
            fault: Fault::default(),
        }
    }
}

/// Serves until `shutdown` resolves (then stops accepting; in-flight connections may finish). Logs with tracing.
pub async fn run(
    listener: TcpListener,
    options: MockOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let mock = Mock::new(options).await.map_err(std::io::Error::other)?;
    info!(
        addr = ?listener.local_addr().ok(),
        mode = %mock.options.mode,
        fault = %mock.state().fault.to_json(),
        "PowerJob mock serving"
    );
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    warn!(%err, "mock accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let mock = Arc::clone(&mock);
        // An `Err` (a `Hangup` fault) makes hyper close the connection without writing an answer.
        let service = service_fn(move |req| {
            let mock = Arc::clone(&mock);
            async move { mock.handle(req).await }
        });
        let conn = http1::Builder::new()
            .preserve_header_case(true)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                debug!(%peer, %err, "mock connection ended with an error");
            }
        });
    }
    // Dropping the sender tells every connection to finish its current request and close: idle keep-alive
    // connections must not outlive the server, or a client's pooled connection would keep "reaching" it.
    drop(graceful);
    // Stalled calls would otherwise hold their connections (and a test's client) for up to STALL_LIMIT.
    mock.stopping.cancel();
    info!(mode = %mock.options.mode, "PowerJob mock stopped");
    Ok(())
}

/// `GET /mock/stats` from the mock at `addr`, within `timeout`: the counters as JSON (for the demo and the tests).
pub async fn fetch_stats(addr: SocketAddr, timeout: Duration) -> std::io::Result<Value> {
    const REQUEST: &[u8] = b"GET /mock/stats HTTP/1.1\r\nHost: mock\r\nConnection: close\r\n\r\n";
    rawhttp::exchange(addr, REQUEST, timeout).await?.json()
}

/// The fake server: options, pre-built response heads and the shared state. Cheap to share through `Arc`.
pub struct Mock {
    options: MockOptions,
    heads: Heads,
    ids: IdGenerator,
    next_job_id: AtomicI64,
    state: Mutex<State>,
    /// Calls held by `stall-after-create` right now; an atomic because a stalled call is dropped (client gone)
    /// without a chance to take the lock in an orderly way.
    stalled: AtomicU64,
    /// Cancelled when `run` stops accepting: stalled calls then let go of their connections.
    stopping: CancellationToken,
    /// `queryInstance` calls answered so far (for `MockOptions::query_failures`).
    queries: AtomicU64,
}

/// Response heads whose header names must leave in exact case; built once, cloned per response.
struct Heads {
    plain: response::Parts,
    passed: response::Parts,
    refused: response::Parts,
    /// `5xx-after-create`: Spring Boot's error answer, without the auth header.
    server_error: response::Parts,
    /// `502-after-create` and `504-after-create`: nginx's heads, reason phrases included.
    bad_gateway: response::Parts,
    gateway_timeout: response::Parts,
}

impl Heads {
    async fn build() -> Result<Self, hyper::Error> {
        const JSON: (&str, &str) = ("Content-Type", "application/json");
        Ok(Self {
            plain: exact_case_head(StatusCode::OK, &[JSON]).await?,
            passed: exact_case_head(StatusCode::OK, &[JSON, (AUTH_PASSED, "true")]).await?,
            refused: exact_case_head(StatusCode::OK, &[JSON, (AUTH_PASSED, "false")]).await?,
            server_error: exact_case_head(StatusCode::INTERNAL_SERVER_ERROR, &[JSON]).await?,
            bad_gateway: nginx_head(StatusCode::BAD_GATEWAY).await?,
            gateway_timeout: nginx_head(StatusCode::GATEWAY_TIMEOUT).await?,
        })
    }
}

/// nginx's status line (its own reason phrases, e.g. `Gateway Time-out`) and headers for an error page.
async fn nginx_head(status: StatusCode) -> Result<response::Parts, hyper::Error> {
    let head = format!(
        "HTTP/1.1 {}\r\nServer: nginx\r\nContent-Type: text/html\r\nContent-Length: 0\r\n\r\n",
        nginx_status(status)
    );
    parse_response_head(head.as_bytes()).await
}

/// `504 Gateway Time-out`, as nginx writes it in its status line and error page.
fn nginx_status(status: StatusCode) -> String {
    let reason = match status {
        StatusCode::GATEWAY_TIMEOUT => "Gateway Time-out",
        other => other.canonical_reason().unwrap_or(""),
    };
    format!("{} {reason}", status.as_u16())
}

/// nginx's built-in error page (`ngx_http_error_pages`), CRLF line ends included.
fn nginx_error_page(status: StatusCode) -> String {
    let title = nginx_status(status);
    format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )
}

/// Spring Boot's `BasicErrorController` JSON for an exception that escaped to the servlet container.
fn spring_error_body(path: &str) -> String {
    json!({
        "timestamp": iso_millis(now_ms()),
        "status": 500,
        "error": "Internal Server Error",
        "path": path,
    })
    .to_string()
}

#[derive(Default)]
struct State {
    requests: Vec<RecordedRequest>,
    requests_by_path: BTreeMap<String, u64>,
    instances_created: u64,
    instances_by_job: BTreeMap<i64, u64>,
    workflow_instances: u64,
    tokens_issued: u64,
    /// Creating calls that got a fault (other than `none`) since the start or the last reset.
    faults_injected: u64,
    /// The "database": survives `/mock/reset` so that ids a client already holds stay valid.
    instances: HashMap<i64, Instance>,
    tokens: HashMap<String, Token>,
    /// Configuration rather than a record: survives `/mock/reset`; `POST /mock/fault` changes it.
    fault: Fault,
}

/// One request as it arrived. Header names are lower case (hyper keeps the original case private); repeated
/// headers are joined with `", "`.
#[derive(Clone, Debug, Serialize)]
struct RecordedRequest {
    seq: u64,
    at_ms: i64,
    method: String,
    path: String,
    query: Option<String>,
    headers: BTreeMap<String, String>,
    body: String,
}

#[derive(Clone)]
struct Instance {
    job_id: i64,
    app_id: i64,
    instance_params: Option<String>,
    created_ms: i64,
    expected_trigger_ms: i64,
}

struct Token {
    app_id: i64,
    expires_ms: i64,
}

/// What an accepted creating call creates.
enum Creation {
    Job(NewInstance),
    Workflow { workflow_id: i64 },
}

/// A job instance to insert, as `runJob` or `POST /mock/create-instance` asked for it.
struct NewInstance {
    job_id: i64,
    app_id: i64,
    instance_params: Option<String>,
    delay: i64,
}

/// `runWorkflow(workflowId, appId, initParams, delay)`: the server checks nothing beyond binding.
fn check_run_workflow(form: &Form) -> Result<Creation, Failure> {
    let workflow_id = form.long("workflowId")?;
    form.long("appId")?;
    form.long("delay")?;
    let workflow_id = workflow_id.ok_or_else(null_id)?;
    Ok(Creation::Workflow { workflow_id })
}

/// A business failure: HTTP 200, `success:false`. `code` is set only where PowerJob sets it.
#[derive(Debug)]
struct Failure {
    message: String,
    code: Option<&'static str>,
}

impl Failure {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: None,
        }
    }

    fn coded(message: impl Into<String>, code: &'static str) -> Self {
        Self {
            message: message.into(),
            code: Some(code),
        }
    }
}

type Outcome = Result<Value, Failure>;

impl Mock {
    /// Fails only if the exact-case response heads cannot be built.
    pub async fn new(options: MockOptions) -> Result<Arc<Self>, hyper::Error> {
        let state = State {
            fault: options.fault.clone().normalized(),
            ..State::default()
        };
        Ok(Arc::new(Self {
            options,
            heads: Heads::build().await?,
            ids: IdGenerator::default(),
            next_job_id: AtomicI64::new(FIRST_NEW_JOB_ID),
            state: Mutex::new(state),
            stalled: AtomicU64::new(0),
            stopping: CancellationToken::new(),
            queries: AtomicU64::new(0),
        }))
    }

    /// Answers one request: every problem becomes a response, except the faults that answer nothing
    /// (`close-without-create`, and `stall-after-create` once it lets go), which are a [`Hangup`].
    pub async fn handle<B>(&self, req: Request<B>) -> Result<Response<Full<Bytes>>, Hangup>
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => return Ok(unreadable_body(&parts, err)),
        };
        let path = parts.uri.path();
        if let Some(admin) = path.strip_prefix("/mock/") {
            return Ok(self.admin(&parts, admin, &body));
        }
        self.record(&parts, &body);
        match served_endpoint(path).as_deref() {
            Some(endpoint) => self.openapi(&parts, endpoint, &body).await,
            None => Ok(not_found(path)),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves counters that are still usable for a fake server.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, parts: &request::Parts, body: &[u8]) {
        let path = parts.uri.path().to_owned();
        debug!(method = %parts.method, %path, "mock request");
        let mut state = self.state();
        *state.requests_by_path.entry(path.clone()).or_default() += 1;
        let seq = state.requests.len() as u64 + 1;
        state.requests.push(RecordedRequest {
            seq,
            at_ms: now_ms(),
            method: parts.method.to_string(),
            path,
            query: parts.uri.query().map(str::to_owned),
            headers: header_copy(&parts.headers),
            body: String::from_utf8_lossy(body).into_owned(),
        });
    }

    /// The `/openApi/**` pipeline in Spring's order: handler mapping, method check, auth interceptor, controller.
    async fn openapi(
        &self,
        parts: &request::Parts,
        endpoint: &str,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, Hangup> {
        if self.options.mode == Mode::V4 && endpoint == "authApp" {
            return Ok(not_found(parts.uri.path()));
        }
        if parts.method != Method::POST {
            // Raised while mapping the handler, so no interceptor runs and no auth header is added.
            let message = format!(
                "HttpRequestMethodNotSupportedException: Request method '{}' not supported",
                parts.method
            );
            let body = self.result(Err(Failure::new(message)));
            return Ok(self.reply(&self.heads.plain, body));
        }
        let head = match self.intercept(endpoint, &parts.headers) {
            Ok(head) => head,
            Err(refusal) => return Ok(self.reply(&self.heads.refused, refusal)),
        };
        let body = match endpoint {
            "runJob" | "runWorkflow" => {
                return self.creating_call(endpoint, parts, body, head).await
            }
            // 5.1.1 answers the page with `ResultDTO.success`: no `code` key, unlike its errors.
            "queryInstance"
                if self.queries.fetch_add(1, Ordering::Relaxed) < self.options.query_failures =>
            {
                let error = spring_error_body(parts.uri.path());
                return Ok(self.reply(&self.heads.server_error, error));
            }
            "queryInstance" => match self.slow_query(body).await {
                Ok(page) => result_json_v4(true, page, None),
                Err(failure) => self.result(Err(failure)),
            },
            _ => self.result(self.controller(endpoint, parts, body)),
        };
        Ok(self.reply(head, body))
    }

    /// `OpenApiInterceptor.preHandle`: picks the response head, or refuses with an error body.
    fn intercept(&self, endpoint: &str, headers: &HeaderMap) -> Result<&response::Parts, String> {
        match self.options.mode {
            Mode::V510AuthOff | Mode::V4 => Ok(&self.heads.plain),
            Mode::V511AuthOff => Ok(&self.heads.passed),
            Mode::AuthOn if matches!(endpoint, "assert" | "authApp") => Ok(&self.heads.plain),
            Mode::AuthOn => match self.check_token(headers) {
                Ok(()) => Ok(&self.heads.passed),
                Err(failure) => {
                    debug!(endpoint, message = %failure.message, "mock refused the token");
                    // The interceptor writes with a NON_NULL mapper: no `data` key, unlike `result_json`.
                    Err(json!({ "success": false, "message": failure.message, "code": failure.code })
                        .to_string())
                }
            },
        }
    }

    /// `authAppByToken`, checks in PowerJob's order (POWERJOB.md §3.5 rows 1-5).
    fn check_token(&self, headers: &HeaderMap) -> Result<(), Failure> {
        let app_id = present_header(headers, APP_ID)
            .ok_or_else(|| Failure::coded("INVALID_REQUEST:lack_of_appId_in_header", "-300"))?;
        let token = present_header(headers, ACCESS_TOKEN)
            .ok_or_else(|| Failure::coded("OPEN_API_AUTH_FAILED:token_is_empty", "-1002"))?;
        let token_app_id = {
            let state = self.state();
            let issued = state.tokens.get(token).ok_or_else(|| {
                Failure::coded(
                    "INVALID_TOKEN:SignatureException: token was not issued by this server",
                    "-401",
                )
            })?;
            let now = now_ms();
            if now >= issued.expires_ms {
                return Err(token_expired(issued.expires_ms, now));
            }
            issued.app_id
        };
        if app_id.trim() != token_app_id.to_string() {
            return Err(Failure::coded(
                "INVALID_REQUEST:Inconsistent_appId_from_token_and_header",
                "-300",
            ));
        }
        Ok(())
    }

    /// The endpoints that answer a plain `ResultDTO` and never hang up.
    fn controller(&self, endpoint: &str, parts: &request::Parts, body: &[u8]) -> Outcome {
        match endpoint {
            "authApp" => self.auth_app(body),
            "saveJob" => self.save_job(body),
            _ => {
                let form = Form::from_request(parts, body);
                match endpoint {
                    "assert" => self.assert_app(&form),
                    "fetchInstanceInfo" => self.fetch_instance(&form).map(|(id, instance)| {
                        instance_info(id, &instance, now_ms())
                    }),
                    "fetchInstanceStatus" => self
                        .fetch_instance(&form)
                        .map(|(_, instance)| Value::from(instance_status(&instance, now_ms()))),
                    "retryInstance" | "stopInstance" => Ok(Value::Null),
                    _ => Err(Failure::new(format!(
                        "UnsupportedOperationException: /openApi/{endpoint} is not supported by the runonce PowerJob mock"
                    ))),
                }
            }
        }
    }

    /// `/assert`: the 4.x login, a plaintext compare; its errors differ between 4.3.x and 5.1.x.
    fn assert_app(&self, form: &Form) -> Outcome {
        let app_name = form.get("appName");
        let password = form.get("password");
        let v4 = self.options.mode == Mode::V4;
        if app_name != Some(self.options.app_name.as_str()) {
            let name = app_name.unwrap_or("null");
            return Err(if v4 {
                Failure::new(format!(
                    "PowerJobException: can't find appInfo by appName: {name}"
                ))
            } else {
                Failure::coded(format!("PowerJobException: INVALID_APP:{name}"), "-402")
            });
        }
        match password {
            Some(password) if password == self.options.password => Ok(self.options.app_id.into()),
            _ if v4 => Err(Failure::new("PowerJobException: password error!")),
            // 5.1.x calls `password.equals(originPwd)` on the request's password.
            None => Err(Failure::new(
                "NullPointerException: Cannot invoke \"String.equals(Object)\" because \"password\" is null",
            )),
            Some(_) => Err(Failure::coded("PowerJobException: INCORRECT_PASSWORD", "-400")),
        }
    }

    /// `/authApp`: failures are caught inside the controller, so messages carry no class-name prefix.
    fn auth_app(&self, body: &[u8]) -> Outcome {
        let request = parse_json(body)?;
        let field = |name: &str| request.get(name).and_then(Value::as_str);
        let app_name = field("appName");
        if app_name != Some(self.options.app_name.as_str()) {
            let name = app_name.unwrap_or("null");
            return Err(Failure::coded(format!("INVALID_APP:{name}"), "-402"));
        }
        let Some(password) = field("encryptedPassword") else {
            return Err(Failure::coded(
                "NullPointerException: Cannot invoke \"String.equals(Object)\" because \"password\" is null",
                "-500",
            ));
        };
        if !self.password_matches(password, field("encryptType"))? {
            return Err(Failure::coded("INCORRECT_PASSWORD", "-400"));
        }
        let token = self.issue_token();
        Ok(json!({ "appId": self.options.app_id, "token": token, "extra": null }))
    }

    /// `AppInfoServiceImpl.checkPassword`: no or `none` encryption compares plaintext, `md5` compares the digest.
    fn password_matches(
        &self,
        password: &str,
        encrypt_type: Option<&str>,
    ) -> Result<bool, Failure> {
        match encrypt_type {
            None | Some("") => Ok(password == self.options.password),
            Some(t) if t.eq_ignore_ascii_case("none") => Ok(password == self.options.password),
            // PowerJob's md5 of an empty password is null, which matches nothing.
            Some(t) if t.eq_ignore_ascii_case("md5") => Ok(!self.options.password.is_empty()
                && password.eq_ignore_ascii_case(&md5_hex(&self.options.password))),
            Some(other) => Err(Failure::coded(
                format!("INVALID_REQUEST:unknown_encryptType:{other}"),
                "-300",
            )),
        }
    }

    fn issue_token(&self) -> String {
        let token = format!("runonce-mock.{}.{:x}", self.options.app_id, self.ids.next());
        let expires_ms = now_ms().saturating_add(TOKEN_LIFETIME.as_millis() as i64);
        let mut state = self.state();
        state.tokens_issued += 1;
        state.tokens.insert(
            token.clone(),
            Token {
                app_id: self.options.app_id,
                expires_ms,
            },
        );
        token
    }

    /// `runJob` and `runWorkflow`: the controller's checks, then the fault in force (if any), the instance, the
    /// latency and the answer the fault calls for. Refused calls answer as usual and leave the fault alone.
    async fn creating_call(
        &self,
        endpoint: &str,
        parts: &request::Parts,
        body: &[u8],
        head: &response::Parts,
    ) -> Result<Response<Full<Bytes>>, Hangup> {
        let form = Form::from_request(parts, body);
        let checked = if endpoint == "runJob" {
            self.check_run_job(&form)
        } else {
            check_run_workflow(&form)
        };
        let creation = match checked {
            Ok(creation) => creation,
            Err(failure) => return Ok(self.reply(head, self.result(Err(failure)))),
        };
        let fault = self.take_fault();
        if fault.kind == FaultKind::CloseWithoutCreate {
            info!(endpoint, "mock fault: closing without creating anything");
            return Err(Hangup(fault.kind));
        }
        let id = self.create(&creation);
        self.answer_slowly().await;
        self.answer_created(head, parts.uri.path(), id, fault).await
    }

    /// `runJob(appId, jobId, instanceParams, delay)`: binding and `checkJobIdValid`.
    fn check_run_job(&self, form: &Form) -> Result<Creation, Failure> {
        let app_id = form.long("appId")?;
        let job_id = form.long("jobId")?;
        let delay = form.long("delay")?.unwrap_or(0);
        let job_id = job_id.ok_or_else(null_id)?;
        if job_id <= 0 || job_id == MISSING_JOB_ID {
            return Err(Failure::new(format!(
                "IllegalArgumentException: can't find job by jobId: {job_id}"
            )));
        }
        let app_id = app_id.ok_or_else(|| {
            Failure::new(
                "NullPointerException: Cannot invoke \"java.lang.Long.equals(Object)\" because \"appId\" is null",
            )
        })?;
        if app_id != self.options.app_id {
            return Err(Failure::new(format!(
                "IllegalArgumentException: this job is not belong to the app whose appId is {app_id}"
            )));
        }
        Ok(Creation::Job(NewInstance {
            job_id,
            app_id,
            instance_params: form.get("instanceParams").map(str::to_owned),
            delay,
        }))
    }

    fn take_fault(&self) -> Injected {
        let mut state = self.state();
        let injected = state.fault.take();
        if injected.kind != FaultKind::None {
            state.faults_injected += 1;
        }
        injected
    }

    fn create(&self, creation: &Creation) -> i64 {
        match creation {
            Creation::Job(instance) => self.create_instance(instance),
            Creation::Workflow { workflow_id } => {
                let id = self.ids.next();
                self.state().workflow_instances += 1;
                debug!(
                    workflow_id,
                    wf_instance_id = id,
                    "mock created a workflow instance"
                );
                id
            }
        }
    }

    /// The answer to a call whose instance `id` now exists: the id, or what the fault puts in its place.
    async fn answer_created(
        &self,
        head: &response::Parts,
        path: &str,
        id: i64,
        fault: Injected,
    ) -> Result<Response<Full<Bytes>>, Hangup> {
        let failed = |default: &str| {
            let message = fault.message.as_deref().unwrap_or(default);
            self.reply(head, self.result(Err(Failure::new(message))))
        };
        if fault.kind != FaultKind::None {
            info!(fault = %fault.kind, instance_id = id, "mock fault after creating");
        }
        match fault.kind {
            FaultKind::None => Ok(self.reply(head, self.result(Ok(id.into())))),
            FaultKind::TimeoutAfterCreate => Ok(failed(TIMEOUT_MESSAGE)),
            FaultKind::ErrorAfterCreate => Ok(failed(DISPATCH_FAILED_MESSAGE)),
            FaultKind::ServerErrorAfterCreate => {
                Ok(self.reply(&self.heads.server_error, spring_error_body(path)))
            }
            FaultKind::BadGatewayAfterCreate => Ok(self.reply(
                &self.heads.bad_gateway,
                nginx_error_page(StatusCode::BAD_GATEWAY),
            )),
            FaultKind::GatewayTimeoutAfterCreate => Ok(self.reply(
                &self.heads.gateway_timeout,
                nginx_error_page(StatusCode::GATEWAY_TIMEOUT),
            )),
            FaultKind::StallAfterCreate => {
                self.stall().await;
                Err(Hangup(fault.kind))
            }
            FaultKind::CloseWithoutCreate => Err(Hangup(fault.kind)),
        }
    }

    /// Holds a call until the mock stops or [`STALL_LIMIT`] passes; when the client leaves first, hyper drops
    /// this future and the guard still counts the call out of `stalled`.
    async fn stall(&self) {
        struct Stalled<'a>(&'a AtomicU64);
        impl Drop for Stalled<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.stalled.fetch_add(1, Ordering::Relaxed);
        let _stalled = Stalled(&self.stalled);
        tokio::select! {
            () = tokio::time::sleep(STALL_LIMIT) => warn!(limit = ?STALL_LIMIT, "mock stall ran out; closing"),
            () = self.stopping.cancelled() => debug!("mock stopping; releasing a stalled call"),
        }
    }

    /// `saveJob`: an `id` means "update that job" and is echoed back; otherwise a new job id.
    fn save_job(&self, body: &[u8]) -> Outcome {
        let request = parse_json(body)?;
        match request.get("id") {
            None | Some(Value::Null) => {
                Ok(self.next_job_id.fetch_add(1, Ordering::Relaxed).into())
            }
            Some(id) => json_long(id).map(Value::from).ok_or_else(|| {
                Failure::new(format!(
                    "HttpMessageNotReadableException: JSON parse error: Cannot deserialize value of type `java.lang.Long` from {id}"
                ))
            }),
        }
    }

    /// `/queryInstance`: 5.1.1's `InstancePageQuery` → `PageResult<InstanceInfoDTO>`; the older servers cannot
    /// bind their abstract `PowerQuery` and fail before the controller runs.
    fn query_instance(&self, body: &[u8]) -> Outcome {
        if matches!(self.options.mode, Mode::V510AuthOff | Mode::V4) {
            return Err(unbindable_power_query(self.options.mode, body));
        }
        let query = InstanceQuery::parse(body)?;
        let now = now_ms();
        let state = self.state();
        let mut rows: Vec<(i64, &Instance)> = state
            .instances
            .iter()
            .map(|(id, instance)| (*id, instance))
            .filter(|(id, instance)| query.matches(*id, instance, now))
            .collect();
        // `Sort.by(sortBy)` is ascending whatever `asc` says; ties, and no `sortBy`, follow insertion order.
        let sort_by = query.sort_by.as_deref().unwrap_or("instanceId");
        rows.sort_by_key(|(id, instance)| (sort_key(sort_by, *id, instance, now), *id));
        Ok(query.page(&rows, now))
    }

    fn fetch_instance(&self, form: &Form) -> Result<(i64, Instance), Failure> {
        let id = form.long("instanceId")?;
        let invalid = || {
            let shown = id.map_or_else(|| "null".to_owned(), |id| id.to_string());
            Failure::new(format!(
                "IllegalArgumentException: invalid instanceId: {shown}"
            ))
        };
        let id = id.ok_or_else(invalid)?;
        let state = self.state();
        let instance = state.instances.get(&id).ok_or_else(invalid)?;
        Ok((id, instance.clone()))
    }

    /// Inserts the row as `instanceService.create` does: `expectedTriggerTime` = now + max(delay, 0), the
    /// parameters as sent. `gmtCreate` is read from the id, so a time window and an id range always agree.
    fn create_instance(&self, new: &NewInstance) -> i64 {
        let id = self.ids.next();
        let created_ms = snowflake_ms(id);
        let mut state = self.state();
        state.instances_created += 1;
        *state.instances_by_job.entry(new.job_id).or_default() += 1;
        state.instances.insert(
            id,
            Instance {
                job_id: new.job_id,
                app_id: new.app_id,
                instance_params: new.instance_params.clone(),
                created_ms,
                expected_trigger_ms: created_ms.saturating_add(new.delay.max(0)),
            },
        );
        debug!(
            job_id = new.job_id,
            instance_id = id,
            "mock created an instance"
        );
        id
    }

    /// `/queryInstance`, after the query latency.
    async fn slow_query(&self, body: &[u8]) -> Outcome {
        if !self.options.query_latency.is_zero() {
            tokio::time::sleep(self.options.query_latency).await;
        }
        self.query_instance(body)
    }

    async fn answer_slowly(&self) {
        if !self.options.latency.is_zero() {
            tokio::time::sleep(self.options.latency).await;
        }
    }

    /// Renders an outcome in the mode's DTO: `PowerResultDTO` (with `code`) for 5.1.x, `ResultDTO` for 4.x.
    fn result(&self, outcome: Outcome) -> String {
        let v4 = self.options.mode == Mode::V4;
        match outcome {
            Ok(data) if v4 => result_json_v4(true, data, None),
            Ok(data) => result_json(true, data, None, None),
            Err(failure) if v4 => result_json_v4(false, Value::Null, Some(&failure.message)),
            Err(failure) => result_json(false, Value::Null, Some(&failure.message), failure.code),
        }
    }

    fn reply(&self, head: &response::Parts, body: String) -> Response<Full<Bytes>> {
        let mut head = head.clone();
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        Response::from_parts(head, Full::new(Bytes::from(body)))
    }

    fn admin(&self, parts: &request::Parts, what: &str, body: &[u8]) -> Response<Full<Bytes>> {
        let method = &parts.method;
        match (method, what) {
            (&Method::GET, "stats") => plain_json(StatusCode::OK, self.stats()),
            (&Method::GET, "requests") => {
                let requests = serde_json::to_value(&self.state().requests).unwrap_or_default();
                plain_json(StatusCode::OK, requests)
            }
            (&Method::POST, "reset") => {
                self.reset();
                plain_json(StatusCode::OK, json!({ "reset": true }))
            }
            (&Method::POST, "expire-tokens") => {
                let expired = self.expire_tokens();
                plain_json(StatusCode::OK, json!({ "expired": expired }))
            }
            (&Method::GET, "fault") => plain_json(
                StatusCode::OK,
                json!({ "fault": self.state().fault.to_json() }),
            ),
            (&Method::POST, "fault") => match parse_fault(parts, body) {
                Ok(fault) => plain_json(StatusCode::OK, json!({ "fault": self.set_fault(fault) })),
                Err(error) => plain_json(StatusCode::BAD_REQUEST, json!({ "error": error })),
            },
            (&Method::POST, "create-instance") => match self.create_outside(parts, body) {
                Ok(id) => plain_json(StatusCode::OK, json!({ "instanceId": id })),
                Err(error) => plain_json(StatusCode::BAD_REQUEST, json!({ "error": error })),
            },
            (_, "stats" | "requests" | "reset" | "expire-tokens" | "fault" | "create-instance") => {
                plain_json(
                    StatusCode::METHOD_NOT_ALLOWED,
                    json!({ "error": format!("method {method} not allowed on /mock/{what}") }),
                )
            }
            _ => not_found(&format!("/mock/{what}")),
        }
    }

    /// Replaces the fault in force; answers the new one as `/mock/stats` shows it.
    fn set_fault(&self, fault: Fault) -> Value {
        info!(kind = %fault.kind, remaining = ?fault.remaining, "mock fault set");
        let mut state = self.state();
        state.fault = fault.normalized();
        state.fault.to_json()
    }

    /// `POST /mock/create-instance`: an instance created by someone other than the client under test. Only
    /// `jobId` is required; `appId` defaults to the mock's app, `delay` to 0; no job check, no fault.
    fn create_outside(&self, parts: &request::Parts, body: &[u8]) -> Result<i64, String> {
        let form = admin_form(parts, body);
        let long = |name: &str| form.long(name).map_err(|failure| failure.message);
        let job_id = long("jobId")?.ok_or("jobId is required")?;
        let new = NewInstance {
            job_id,
            app_id: long("appId")?.unwrap_or(self.options.app_id),
            instance_params: form.get("instanceParams").map(str::to_owned),
            delay: long("delay")?.unwrap_or(0),
        };
        let id = self.create_instance(&new);
        info!(
            job_id,
            instance_id = id,
            "mock created an instance from outside"
        );
        Ok(id)
    }

    fn stats(&self) -> Value {
        let state = self.state();
        let by_job: BTreeMap<String, u64> = state
            .instances_by_job
            .iter()
            .map(|(job, n)| (job.to_string(), *n))
            .collect();
        json!({
            "mode": self.options.mode.as_str(),
            "instances": state.instances_created,
            "workflow_instances": state.workflow_instances,
            "instances_by_job": by_job,
            "requests_by_path": state.requests_by_path,
            "tokens_issued": state.tokens_issued,
            "fault": state.fault.to_json(),
            "faults_injected": state.faults_injected,
            "stalled": self.stalled.load(Ordering::Relaxed),
        })
    }

    fn reset(&self) {
        let mut state = self.state();
        state.requests.clear();
        state.requests_by_path.clear();
        state.instances_created = 0;
        state.instances_by_job.clear();
        state.workflow_instances = 0;
        state.tokens_issued = 0;
        state.faults_injected = 0;
        info!("mock counters and records reset");
    }

    fn expire_tokens(&self) -> usize {
        let now = now_ms();
        let mut state = self.state();
        for token in state.tokens.values_mut() {
            token.expires_ms = token.expires_ms.min(now);
        }
        info!(tokens = state.tokens.len(), "mock expired every token");
        state.tokens.len()
    }
}

/// The properties of `InstanceInfoDO`, the only names `sortBy` may give (Spring Data checks them).
const INSTANCE_COLUMNS: [&str; 18] = [
    "id",
    "jobId",
    "appId",
    "instanceId",
    "jobParams",
    "instanceParams",
    "type",
    "wfInstanceId",
    "status",
    "result",
    "expectedTriggerTime",
    "actualTriggerTime",
    "finishedTime",
    "lastReportTime",
    "taskTrackerAddress",
    "runningTimes",
    "gmtCreate",
    "gmtModified",
];

/// 5.1.1's `InstancePageQuery` as Spring's Jackson binds it: unknown keys ignored, `null` = absent, dates as
/// epoch milliseconds. `outerKeyEq` and `typeEq` came later (5.1.2) and are ignored like any unknown key.
#[derive(Debug, Default)]
struct InstanceQuery {
    app_id_eq: Option<i64>,
    job_id_eq: Option<i64>,
    instance_id_eq: Option<i64>,
    instance_id_lt: Option<i64>,
    instance_id_gt: Option<i64>,
    status_in: Option<Vec<i64>>,
    gmt_create_lt: Option<i64>,
    gmt_create_gt: Option<i64>,
    gmt_modified_lt: Option<i64>,
    gmt_modified_gt: Option<i64>,
    index: i64,
    page_size: i64,
    sort_by: Option<String>,
}

impl InstanceQuery {
    fn parse(body: &[u8]) -> Result<Self, Failure> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(Failure::new(format!(
                "HttpMessageNotReadableException: Required request body is missing: {QUERY_INSTANCE_511}"
            )));
        }
        let value = parse_json(body)?;
        let Value::Object(fields) = &value else {
            return Err(not_readable(format!(
                "Cannot deserialize value of type `tech.powerjob.common.request.query.InstancePageQuery` from {}",
                json_kind(&value)
            )));
        };
        let fields = JsonFields(fields);
        let query = Self {
            app_id_eq: fields.long("appIdEq")?,
            job_id_eq: fields.long("jobIdEq")?,
            instance_id_eq: fields.long("instanceIdEq")?,
            instance_id_lt: fields.long("instanceIdLt")?,
            instance_id_gt: fields.long("instanceIdGt")?,
            status_in: fields.ints("statusIn")?,
            gmt_create_lt: fields.date("gmtCreateLt")?,
            gmt_create_gt: fields.date("gmtCreateGt")?,
            gmt_modified_lt: fields.date("gmtModifiedLt")?,
            gmt_modified_gt: fields.date("gmtModifiedGt")?,
            index: fields.int("index")?.unwrap_or(0),
            page_size: fields.int("pageSize")?.unwrap_or(10),
            sort_by: fields.string("sortBy")?.filter(|s| !s.is_empty()),
        };
        query.check()?;
        Ok(query)
    }

    /// What `PageRequest.of` and Spring Data's sort resolution refuse, in that order.
    fn check(&self) -> Result<(), Failure> {
        if self.index < 0 {
            return Err(Failure::new(
                "IllegalArgumentException: Page index must not be less than zero",
            ));
        }
        if self.page_size < 1 {
            return Err(Failure::new(
                "IllegalArgumentException: Page size must not be less than one",
            ));
        }
        match self.sort_by.as_deref() {
            Some(property) if !INSTANCE_COLUMNS.contains(&property) => Err(Failure::new(format!(
                "PropertyReferenceException: No property '{property}' found for type 'InstanceInfoDO'"
            ))),
            _ => Ok(()),
        }
    }

    /// `QueryConvertUtils.toSpecification`: every given predicate ANDed; `Lt`/`Gt` strict.
    fn matches(&self, id: i64, instance: &Instance, now_ms: i64) -> bool {
        let status = i64::from(instance_status(instance, now_ms));
        let modified = modified_ms(instance, now_ms);
        holds(self.app_id_eq, |v| instance.app_id == v)
            && holds(self.job_id_eq, |v| instance.job_id == v)
            && holds(self.instance_id_eq, |v| id == v)
            && holds(self.instance_id_lt, |v| id < v)
            && holds(self.instance_id_gt, |v| id > v)
            && holds(self.status_in.as_ref(), |v| v.contains(&status))
            && holds(self.gmt_create_lt, |v| instance.created_ms < v)
            && holds(self.gmt_create_gt, |v| instance.created_ms > v)
            && holds(self.gmt_modified_lt, |v| modified < v)
            && holds(self.gmt_modified_gt, |v| modified > v)
    }

    /// Spring Data's `Page` as `PageResult`: `totalPages` = ⌈totalItems / pageSize⌉; a page past the end is empty.
    fn page(&self, rows: &[(i64, &Instance)], now_ms: i64) -> Value {
        let size = usize::try_from(self.page_size).unwrap_or(usize::MAX);
        let skip = usize::try_from(self.index)
            .unwrap_or(usize::MAX)
            .saturating_mul(size);
        let data: Vec<Value> = rows
            .iter()
            .skip(skip)
            .take(size)
            .map(|(id, instance)| instance_info(*id, instance, now_ms))
            .collect();
        json!({
            "index": self.index,
            "pageSize": self.page_size,
            "totalPages": rows.len().div_ceil(size),
            "totalItems": rows.len(),
            "data": data,
        })
    }
}

/// An absent predicate holds for every row.
fn holds<T>(bound: Option<T>, test: impl FnOnce(T) -> bool) -> bool {
    bound.map_or(true, test)
}

/// The value `sortBy` orders by. Creation order stands in for the columns the mock keeps no varying value
/// for, and for `gmtCreate` and `id`, which follow it.
fn sort_key(property: &str, id: i64, instance: &Instance, now_ms: i64) -> i64 {
    match property {
        "jobId" => instance.job_id,
        "appId" => instance.app_id,
        "status" => i64::from(instance_status(instance, now_ms)),
        "expectedTriggerTime" => instance.expected_trigger_ms,
        "gmtModified" => modified_ms(instance, now_ms),
        _ => id,
    }
}

/// The 5.1.1 handler, as Spring names it when the body is missing.
const QUERY_INSTANCE_511: &str = "public tech.powerjob.common.response.ResultDTO<tech.powerjob.common.response.PageResult<tech.powerjob.common.response.InstanceInfoDTO>> tech.powerjob.server.openapi.OpenAPIController.queryInstance(tech.powerjob.common.request.query.InstancePageQuery)";

/// How 4.3.x and 5.1.0 fail a `/queryInstance`: Jackson cannot construct the abstract `PowerQuery`, which it
/// reports as an `InvalidDefinitionException`, which Spring turns into `HttpMessageConversionException`. A
/// body that is missing or not JSON fails earlier, as `HttpMessageNotReadableException`.
fn unbindable_power_query(mode: Mode, body: &[u8]) -> Failure {
    if body.iter().all(u8::is_ascii_whitespace) {
        let package = if mode == Mode::V4 {
            "tech.powerjob.server.web.controller"
        } else {
            "tech.powerjob.server.openapi"
        };
        return Failure::new(format!(
            "HttpMessageNotReadableException: Required request body is missing: public tech.powerjob.common.response.ResultDTO<java.util.List<tech.powerjob.common.response.InstanceInfoDTO>> {package}.OpenAPIController.queryInstance(tech.powerjob.common.PowerQuery)"
        ));
    }
    match parse_json(body) {
        Err(failure) => failure,
        Ok(_) => Failure::new(
            "HttpMessageConversionException: Type definition error: [simple type, class tech.powerjob.common.PowerQuery]",
        ),
    }
}

/// A JSON object's fields read as Jackson binds them into a DTO's boxed fields.
struct JsonFields<'a>(&'a serde_json::Map<String, Value>);

impl JsonFields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|value| !value.is_null())
    }

    fn long(&self, name: &str) -> Result<Option<i64>, Failure> {
        self.get(name)
            .map(|value| json_long(value).ok_or_else(|| mismatch("java.lang.Long", value)))
            .transpose()
    }

    fn int(&self, name: &str) -> Result<Option<i64>, Failure> {
        self.get(name)
            .map(|value| {
                json_long(value)
                    .filter(|v| i32::try_from(*v).is_ok())
                    .ok_or_else(|| mismatch("java.lang.Integer", value))
            })
            .transpose()
    }

    /// A `java.util.Date`: epoch milliseconds, as a number or a string of digits.
    fn date(&self, name: &str) -> Result<Option<i64>, Failure> {
        self.get(name)
            .map(|value| json_long(value).ok_or_else(|| mismatch("java.util.Date", value)))
            .transpose()
    }

    fn ints(&self, name: &str) -> Result<Option<Vec<i64>>, Failure> {
        let Some(value) = self.get(name) else {
            return Ok(None);
        };
        let Value::Array(items) = value else {
            return Err(mismatch("java.util.ArrayList<java.lang.Integer>", value));
        };
        items
            .iter()
            .map(|item| json_long(item).ok_or_else(|| mismatch("java.lang.Integer", item)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn string(&self, name: &str) -> Result<Option<String>, Failure> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            // Jackson coerces scalars into a String field.
            Some(value @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(value.to_string())),
            Some(value) => Err(mismatch("java.lang.String", value)),
        }
    }
}

/// Jackson's complaint about a value of the wrong type, as Spring wraps it.
fn mismatch(java_type: &str, value: &Value) -> Failure {
    let shown = match value {
        Value::String(s) => format!("String \"{s}\": not a valid `{java_type}` value"),
        other => json_kind(other),
    };
    not_readable(format!(
        "Cannot deserialize value of type `{java_type}` from {shown}"
    ))
}

fn not_readable(detail: String) -> Failure {
    Failure::new(format!(
        "HttpMessageNotReadableException: JSON parse error: {detail}"
    ))
}

/// How Jackson names a JSON token in its messages.
fn json_kind(value: &Value) -> String {
    match value {
        Value::Null => "Null value".to_owned(),
        Value::Bool(b) => format!("Boolean value ({b})"),
        Value::Number(n) => format!("Number value ({n})"),
        Value::String(s) => format!("String value (\"{s}\")"),
        Value::Array(_) => "Array value (token `JsonToken.START_ARRAY`)".to_owned(),
        Value::Object(_) => "Object value (token `JsonToken.START_OBJECT`)".to_owned(),
    }
}

/// `gmtModified`: the trigger time once the instance counts as finished, its creation before that.
fn modified_ms(instance: &Instance, now_ms: i64) -> i64 {
    if instance_status(instance, now_ms) == status::SUCCEED {
        instance.expected_trigger_ms
    } else {
        instance.created_ms
    }
}

/// `/mock/*` parameters: the query string, then the body as a form whatever its `Content-Type`.
fn admin_form(parts: &request::Parts, body: &[u8]) -> Form {
    let mut pairs = parts.uri.query().map(parse_form).unwrap_or_default();
    pairs.extend(parse_form(&String::from_utf8_lossy(body)));
    Form(pairs)
}

/// `POST /mock/fault`: JSON `{"kind":…,"count":…,"message":…}`, or the same names as form or query fields.
fn parse_fault(parts: &request::Parts, body: &[u8]) -> Result<Fault, String> {
    let text = String::from_utf8_lossy(body);
    let (kind, count, message) = if text.trim_start().starts_with('{') {
        let value: Value =
            serde_json::from_str(&text).map_err(|err| format!("invalid JSON: {err}"))?;
        let kind = value.get("kind").and_then(Value::as_str);
        let count = match value.get("count") {
            None | Some(Value::Null) => None,
            Some(count) => Some(
                json_long(count)
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or_else(|| format!("count must be a whole number >= 0, not {count}"))?,
            ),
        };
        let message = value.get("message").and_then(Value::as_str);
        (kind.map(str::to_owned), count, message.map(str::to_owned))
    } else {
        let form = admin_form(parts, body);
        let count = match form.get("count").map(str::trim).filter(|c| !c.is_empty()) {
            None => None,
            Some(count) => Some(
                count
                    .parse::<u64>()
                    .map_err(|_| format!("count must be a whole number >= 0, not {count:?}"))?,
            ),
        };
        (
            form.get("kind").map(str::to_owned),
            count,
            form.get("message").map(str::to_owned),
        )
    };
    let kind: FaultKind = kind.ok_or("kind is required")?.parse()?;
    Ok(Fault {
        kind,
        remaining: count,
        message,
    })
}

/// Instances wait until their delay is over and then count as already succeeded: no worker runs them.
fn instance_status(instance: &Instance, now_ms: i64) -> i32 {
    if now_ms >= instance.expected_trigger_ms {
        status::SUCCEED
    } else {
        status::WAITING_DISPATCH
    }
}

/// `InstanceInfoDTO` as Spring's Jackson renders it: trigger times are epoch millis, `gmt*` are ISO dates.
fn instance_info(id: i64, instance: &Instance, now_ms: i64) -> Value {
    let status = instance_status(instance, now_ms);
    let done = status == status::SUCCEED;
    let trigger = instance.expected_trigger_ms;
    json!({
        "jobId": instance.job_id,
        "appId": instance.app_id,
        "instanceId": id,
        "wfInstanceId": null,
        "jobParams": null,
        "instanceParams": instance.instance_params,
        "status": status,
        "type": INSTANCE_TYPE_NORMAL,
        "result": done.then_some("success"),
        "expectedTriggerTime": trigger,
        "actualTriggerTime": done.then_some(trigger),
        "finishedTime": done.then_some(trigger),
        "taskTrackerAddress": done.then_some(FAKE_TASK_TRACKER),
        "runningTimes": i32::from(done),
        "gmtCreate": iso_millis(instance.created_ms),
        "gmtModified": iso_millis(modified_ms(instance, now_ms)),
    })
}

/// Snowflake-shaped ids like PowerJob's (`(ms since 2019-04-21) << 22 | seq`), so they exceed 2^53 as real ones
/// do. Strictly increasing even if the clock steps back or the sequence wraps within one millisecond.
#[derive(Default)]
struct IdGenerator {
    seq: AtomicU64,
    last: AtomicI64,
}

impl IdGenerator {
    fn next(&self) -> i64 {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) as i64 & SNOWFLAKE_SEQ_MASK;
        let candidate = ((now_ms() - SNOWFLAKE_EPOCH_MS).max(0) << 22) | seq;
        let step = |last: i64| Some(candidate.max(last + 1));
        let (Ok(previous) | Err(previous)) =
            self.last
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, step);
        candidate.max(previous + 1)
    }
}

/// The creation time (epoch ms) a snowflake id carries: `(id >> 22) + 2019-04-21`. The other way round,
/// instances created in [T0, T1] have ids in `[(T0 − epoch) << 22, (T1 + 1 − epoch) << 22)`.
fn snowflake_ms(id: i64) -> i64 {
    (id >> 22) + SNOWFLAKE_EPOCH_MS
}

/// Spring's `@RequestParam` view of a request: query-string parameters, then form-body ones; first one wins.
struct Form(Vec<(String, String)>);

impl Form {
    fn from_request(parts: &request::Parts, body: &[u8]) -> Self {
        let mut pairs = parts.uri.query().map(parse_form).unwrap_or_default();
        if is_form(&parts.headers) {
            pairs.extend(parse_form(&String::from_utf8_lossy(body)));
        }
        Self(pairs)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// A `Long` parameter as Spring binds it: absent or empty is `null`, whitespace is trimmed.
    fn long(&self, name: &str) -> Result<Option<i64>, Failure> {
        let Some(raw) = self.get(name).filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let trimmed: String = raw.chars().filter(|c| !c.is_whitespace()).collect();
        trimmed.parse().map(Some).map_err(|_| {
            Failure::new(format!(
                "MethodArgumentTypeMismatchException: Failed to convert value of type 'java.lang.String' to required type 'java.lang.Long'; nested exception is java.lang.NumberFormatException: For input string: \"{raw}\""
            ))
        })
    }
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            mime.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// Decodes `application/x-www-form-urlencoded` pairs leniently, as Spring does: a name without `=` gets an
/// empty value, a `%` not followed by two hex digits stays as it is, invalid UTF-8 is replaced.
fn parse_form(encoded: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(encoded.as_bytes())
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect()
}

fn parse_json(body: &[u8]) -> Result<Value, Failure> {
    serde_json::from_slice(body).map_err(|err| {
        Failure::new(format!(
            "HttpMessageNotReadableException: JSON parse error: {err}"
        ))
    })
}

/// Jackson's coercion into `Long`: a JSON integer or a string holding one.
fn json_long(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The interceptor's answer to an expired JWT; the message is jjwt's `ExpiredJwtException` text.
fn token_expired(expired_ms: i64, now_ms: i64) -> Failure {
    Failure::coded(
        format!(
            "TOKEN_EXPIRED:JWT expired at {}. Current time: {}, a difference of {} milliseconds.  Allowed clock skew: 0 milliseconds.",
            iso_seconds(expired_ms),
            iso_seconds(now_ms),
            now_ms - expired_ms
        ),
        "-403",
    )
}

/// What `findById(null)` raises when a required id is missing.
fn null_id() -> Failure {
    Failure::new("IllegalArgumentException: The given id must not be null!")
}

fn present_header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| header_present(v))
}

fn header_copy(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut copy = BTreeMap::<String, String>::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        copy.entry(name.as_str().to_owned())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    copy
}

fn md5_hex(text: &str) -> String {
    format!("{:x}", Md5::digest(text.as_bytes()))
}

fn unreadable_body(
    parts: &request::Parts,
    err: Box<dyn std::error::Error + Send + Sync>,
) -> Response<Full<Bytes>> {
    let too_large = err.is::<http_body_util::LengthLimitError>();
    warn!(method = %parts.method, path = parts.uri.path(), %err, "mock could not read a request body");
    let status = if too_large {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::BAD_REQUEST
    };
    plain_json(status, json!({ "error": err.to_string() }))
}

/// Spring Boot's answer for an unmapped path.
fn not_found(path: &str) -> Response<Full<Bytes>> {
    plain_json(
        StatusCode::NOT_FOUND,
        json!({ "status": 404, "error": "Not Found", "path": path }),
    )
}

fn plain_json(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `2024-08-12T03:04:05Z`, as jjwt prints times in its expiry message.
fn iso_seconds(ms: i64) -> String {
    let (date, time) = utc_parts(ms);
    format!("{date}T{time}Z")
}

/// `2024-08-12T03:04:05.678+00:00`, Jackson's `StdDateFormat` for `java.util.Date`.
fn iso_millis(ms: i64) -> String {
    let (date, time) = utc_parts(ms);
    format!("{date}T{time}.{:03}+00:00", ms.rem_euclid(1000))
}

/// (`YYYY-MM-DD`, `hh:mm:ss`) in UTC, by the days-to-civil algorithm (proleptic Gregorian calendar).
fn utc_parts(ms: i64) -> (String, String) {
    let secs = ms.div_euclid(1000);
    let (days, second_of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}-{month:02}-{day:02}"),
        format!(
            "{:02}:{:02}:{:02}",
            second_of_day / 3600,
            second_of_day / 60 % 60,
            second_of_day % 60
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    const STEP: Duration = Duration::from_secs(5);
    const TWO_POW_53: i64 = 1 << 53;
    const AUTH_BODY: &str = r#"{"appName":"my-app","encryptedPassword":"e10adc3949ba59abbe56e057f20f883e","encryptType":"md5"}"#;

    struct Server {
        addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<std::io::Result<()>>,
    }

    impl Server {
        async fn start(options: MockOptions) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(run(listener, options, async {
                let _ = stopped.await;
            }));
            Self {
                addr,
                stop: Some(stop),
                task,
            }
        }

        async fn mode(mode: Mode) -> Self {
            Self::start(MockOptions {
                mode,
                ..MockOptions::default()
            })
            .await
        }

        async fn connect(&self) -> Conn {
            let stream = tokio::time::timeout(STEP, TcpStream::connect(self.addr))
                .await
                .unwrap()
                .unwrap();
            Conn { stream }
        }

        /// One request on a fresh connection.
        async fn send(
            &self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: &str,
        ) -> Reply {
            self.connect().await.send(method, path, headers, body).await
        }

        async fn stats(&self) -> Value {
            fetch_stats(self.addr, STEP).await.unwrap()
        }
    }

    /// A raw HTTP/1.1 client connection, so header case is visible exactly as sent.
    struct Conn {
        stream: TcpStream,
    }

    /// A response with header names as sent.
    type Reply = rawhttp::Response;

    trait ReplyExt {
        /// Whether the auth header is there in any spelling.
        fn has_auth_header(&self) -> bool;
        /// Whether the head has this header line, byte for byte.
        fn has_line(&self, line: &str) -> bool;
    }

    impl ReplyExt for Reply {
        fn has_auth_header(&self) -> bool {
            self.headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case(AUTH_PASSED))
        }

        fn has_line(&self, line: &str) -> bool {
            self.header_lines().contains(&line)
        }
    }

    impl Conn {
        async fn send(
            &mut self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: &str,
        ) -> Reply {
            self.write(method, path, headers, body).await;
            tokio::time::timeout(STEP, rawhttp::read_response(&mut self.stream))
                .await
                .unwrap()
                .unwrap()
        }

        async fn write(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) {
            let mut request = format!(
                "{method} {path} HTTP/1.1\r\nHost: mock\r\nContent-Length: {}\r\n",
                body.len()
            );
            for (name, value) in headers {
                request.push_str(&format!("{name}: {value}\r\n"));
            }
            request.push_str("\r\n");
            request.push_str(body);
            tokio::time::timeout(STEP, self.stream.write_all(request.as_bytes()))
                .await
                .unwrap()
                .unwrap();
        }

        /// Every byte until the mock closes the connection (a reset counts as a close).
        async fn read_until_closed(&mut self) -> Vec<u8> {
            let mut received = Vec::new();
            let read = self.stream.read_to_end(&mut received);
            let _ = tokio::time::timeout(STEP, read)
                .await
                .expect("the mock did not close the connection");
            received
        }
    }

    const FORM_TYPE: [(&str, &str); 1] = [("Content-Type", "application/x-www-form-urlencoded")];
    const JSON_TYPE: [(&str, &str); 1] = [("Content-Type", "application/json; charset=utf-8")];

    /// The 5.1.0 client's runJob: path and form body, field order as it sends them.
    const RUN_JOB: (&str, &str) = (
        "/openApi/runJob",
        "jobId=5&delay=0&appId=1&instanceParams=%7B%22k%22%3A%22v%20w%22%7D",
    );

    async fn run_job(conn: &mut Conn, extra: &[(&str, &str)]) -> Reply {
        let mut headers = FORM_TYPE.to_vec();
        headers.extend_from_slice(extra);
        conn.send("POST", RUN_JOB.0, &headers, RUN_JOB.1).await
    }

    #[tokio::test]
    async fn v510_sends_no_auth_header_and_creates_an_instance_per_run_job() {
        let server = Server::mode(Mode::V510AuthOff).await;
        let mut conn = server.connect().await;
        let auth = conn
            .send("POST", "/openApi/authApp", &JSON_TYPE, AUTH_BODY)
            .await;
        assert!(!auth.has_auth_header(), "{}", auth.head);
        assert_eq!(auth.json().unwrap()["data"]["appId"], 1);

        let first = run_job(&mut conn, &[]).await;
        let second = run_job(&mut conn, &[]).await;
        assert!(!first.has_auth_header() && !second.has_auth_header());
        assert!(
            first.has_line("Content-Type: application/json"),
            "{}",
            first.head
        );
        let (a, b) = (
            first.json().unwrap()["data"].as_i64().unwrap(),
            second.json().unwrap()["data"].as_i64().unwrap(),
        );
        assert!(a > TWO_POW_53 && b > a, "{a} {b}");
        assert_eq!(first.json().unwrap()["code"], Value::Null);

        let stats = server.stats().await;
        assert_eq!(stats["mode"], "v5.1.0-auth-off");
        assert_eq!(stats["instances"], 2);
        assert_eq!(stats["instances_by_job"]["5"], 2);
        assert_eq!(stats["requests_by_path"]["/openApi/runJob"], 2);
        assert_eq!(stats["requests_by_path"]["/openApi/authApp"], 1);
        assert_eq!(stats["tokens_issued"], 1);
        assert!(stats["requests_by_path"].get("/mock/stats").is_none());
    }

    #[tokio::test]
    async fn v511_sends_the_header_in_exact_case_everywhere() {
        let server = Server::mode(Mode::V511AuthOff).await;
        let mut conn = server.connect().await;
        let auth = conn
            .send("POST", "/openApi/authApp", &JSON_TYPE, AUTH_BODY)
            .await;
        assert!(
            auth.has_line("X-POWERJOB-AUTH-PASSED: true"),
            "{}",
            auth.head
        );
        let reply = run_job(&mut conn, &[]).await;
        assert!(
            reply.has_line("X-POWERJOB-AUTH-PASSED: true"),
            "{}",
            reply.head
        );
        assert_eq!(reply.json().unwrap()["success"], true);
    }

    #[tokio::test]
    async fn auth_on_refuses_without_side_effects_and_accepts_a_fresh_token() {
        let server = Server::mode(Mode::AuthOn).await;
        let mut conn = server.connect().await;

        let refused = run_job(&mut conn, &[]).await;
        assert!(
            refused.has_line("X-POWERJOB-AUTH-PASSED: false"),
            "{}",
            refused.head
        );
        assert_eq!(
            refused.json().unwrap(),
            json!({"success": false, "message": "INVALID_REQUEST:lack_of_appId_in_header", "code": "-300"})
        );
        let no_token = run_job(&mut conn, &[(APP_ID, "1"), (ACCESS_TOKEN, "null")]).await;
        assert_eq!(no_token.json().unwrap()["code"], "-1002");
        let forged = run_job(&mut conn, &[(APP_ID, "1"), (ACCESS_TOKEN, "forged")]).await;
        assert_eq!(forged.json().unwrap()["code"], "-401");
        assert_eq!(server.stats().await["instances"], 0);

        let auth = conn
            .send("POST", "/openApi/authApp", &JSON_TYPE, AUTH_BODY)
            .await;
        assert!(!auth.has_auth_header(), "{}", auth.head);
        let token = auth.json().unwrap()["data"]["token"]
            .as_str()
            .unwrap()
            .to_owned();

        let other_app = run_job(&mut conn, &[(APP_ID, "2"), (ACCESS_TOKEN, &token)]).await;
        assert_eq!(
            other_app.json().unwrap()["message"],
            "INVALID_REQUEST:Inconsistent_appId_from_token_and_header"
        );
        let accepted = run_job(&mut conn, &[(APP_ID, "1"), (ACCESS_TOKEN, &token)]).await;
        assert!(
            accepted.has_line("X-POWERJOB-AUTH-PASSED: true"),
            "{}",
            accepted.head
        );
        assert!(accepted.json().unwrap()["data"].as_i64().unwrap() > TWO_POW_53);
        assert_eq!(server.stats().await["instances"], 1);

        let expired = server.send("POST", "/mock/expire-tokens", &[], "").await;
        assert_eq!(expired.json().unwrap()["expired"], 1);
        let late = run_job(&mut conn, &[(APP_ID, "1"), (ACCESS_TOKEN, &token)]).await;
        assert!(
            late.has_line("X-POWERJOB-AUTH-PASSED: false"),
            "{}",
            late.head
        );
        assert_eq!(late.json().unwrap()["code"], "-403");
        assert!(late.json().unwrap()["message"]
            .as_str()
            .unwrap()
            .starts_with("TOKEN_EXPIRED:JWT expired at "));
        assert_eq!(server.stats().await["instances"], 1);
    }

    #[tokio::test]
    async fn auth_app_failures_follow_the_table() {
        let server = Server::mode(Mode::AuthOn).await;
        let cases = [
            (
                r#"{"appName":"nope","encryptedPassword":"x","encryptType":"md5"}"#,
                "INVALID_APP:nope",
                "-402",
            ),
            (
                r#"{"appName":"my-app","encryptedPassword":"x","encryptType":"md5"}"#,
                "INCORRECT_PASSWORD",
                "-400",
            ),
            (
                r#"{"appName":"my-app","encryptedPassword":"x","encryptType":"sha1"}"#,
                "INVALID_REQUEST:unknown_encryptType:sha1",
                "-300",
            ),
        ];
        for (body, message, code) in cases {
            let reply = server
                .send("POST", "/openApi/authApp", &JSON_TYPE, body)
                .await;
            assert_eq!(
                reply.json().unwrap(),
                json!({"success": false, "data": null, "message": message, "code": code})
            );
        }
        let upper = AUTH_BODY.replace(
            "e10adc3949ba59abbe56e057f20f883e",
            "E10ADC3949BA59ABBE56E057F20F883E",
        );
        let reply = server
            .send("POST", "/openApi/authApp", &JSON_TYPE, &upper)
            .await;
        assert_eq!(reply.json().unwrap()["success"], true);
    }

    #[tokio::test]
    async fn v4_has_no_auth_app_but_assert_works() {
        let server = Server::mode(Mode::V4).await;
        let auth = server
            .send("POST", "/openApi/authApp", &JSON_TYPE, AUTH_BODY)
            .await;
        assert_eq!(auth.status, 404);
        let body = "appName=my-app&password=123456";
        let assert = server
            .send("POST", "/openApi/assert", &FORM_TYPE, body)
            .await;
        assert_eq!(assert.status, 200);
        assert!(!assert.has_auth_header());
        assert_eq!(
            assert.json().unwrap(),
            json!({"success": true, "data": 1, "message": null})
        );
        let body = "appName=my-app&password=wrong";
        let wrong = server
            .send("POST", "/openApi/assert", &FORM_TYPE, body)
            .await;
        assert_eq!(
            wrong.json().unwrap()["message"],
            "PowerJobException: password error!"
        );
        assert!(wrong.json().unwrap().get("code").is_none());
    }

    #[tokio::test]
    async fn run_job_validation_matches_the_server() {
        let server = Server::mode(Mode::V511AuthOff).await;
        let cases = [
            (
                "jobId=999&appId=1",
                "IllegalArgumentException: can't find job by jobId: 999",
            ),
            (
                "jobId=5&appId=2",
                "IllegalArgumentException: this job is not belong to the app whose appId is 2",
            ),
            (
                "appId=1",
                "IllegalArgumentException: The given id must not be null!",
            ),
        ];
        for (body, message) in cases {
            let reply = server
                .send("POST", "/openApi/runJob", &FORM_TYPE, body)
                .await;
            assert_eq!(reply.status, 200);
            assert_eq!(reply.json().unwrap()["message"], message, "{body}");
        }
        let body = "jobId=abc&appId=1";
        let reply = server
            .send("POST", "/openApi/runJob", &FORM_TYPE, body)
            .await;
        let message = reply.json().unwrap()["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            message.starts_with("MethodArgumentTypeMismatchException: "),
            "{message}"
        );
        let body = "jobId=5";
        let reply = server
            .send("POST", "/openApi/runJob", &FORM_TYPE, body)
            .await;
        assert!(reply.json().unwrap()["message"]
            .as_str()
            .unwrap()
            .starts_with("NullPointerException: "));

        let get = server
            .send("GET", "/openApi/runJob?jobId=5&appId=1", &[], "")
            .await;
        assert_eq!(get.status, 200);
        assert_eq!(
            get.json().unwrap()["message"],
            "HttpRequestMethodNotSupportedException: Request method 'GET' not supported"
        );
        // Parameters may also come in the query string, and a path prefix is allowed.
        let query = server
            .send("POST", "/pj/openApi/runJob?jobId=6&appId=1", &[], "")
            .await;
        assert_eq!(query.json().unwrap()["success"], true);
        assert_eq!(server.stats().await["instances_by_job"], json!({"6": 1}));
    }

    #[tokio::test]
    async fn instances_can_be_fetched_and_other_endpoints_answer() {
        let server = Server::mode(Mode::V511AuthOff).await;
        let body = "jobId=5&appId=1&delay=0&instanceParams=p";
        let id = server
            .send("POST", "/openApi/runJob", &FORM_TYPE, body)
            .await
            .json()
            .unwrap()["data"]
            .as_i64()
            .unwrap();
        let body = format!("instanceId={id}&appId=1");
        let info = server
            .send("POST", "/openApi/fetchInstanceInfo", &FORM_TYPE, &body)
            .await
            .json()
            .unwrap();
        assert_eq!(info["data"]["instanceId"], id);
        assert_eq!(info["data"]["jobId"], 5);
        assert_eq!(info["data"]["instanceParams"], "p");
        assert_eq!(info["data"]["status"], status::SUCCEED);
        let status = server
            .send("POST", "/openApi/fetchInstanceStatus", &FORM_TYPE, &body)
            .await
            .json()
            .unwrap();
        assert_eq!(status["data"], status::SUCCEED);
        let body = "instanceId=42";
        let unknown = server
            .send("POST", "/openApi/fetchInstanceInfo", &FORM_TYPE, body)
            .await
            .json()
            .unwrap();
        assert_eq!(
            unknown["message"],
            "IllegalArgumentException: invalid instanceId: 42"
        );

        let created = server
            .send(
                "POST",
                "/openApi/saveJob",
                &JSON_TYPE,
                r#"{"appId":1,"jobName":"j"}"#,
            )
            .await
            .json()
            .unwrap();
        assert!(created["data"].as_i64().unwrap() >= FIRST_NEW_JOB_ID);
        let updated = server
            .send(
                "POST",
                "/openApi/saveJob",
                &JSON_TYPE,
                r#"{"id":77,"appId":1}"#,
            )
            .await
            .json()
            .unwrap();
        assert_eq!(updated["data"], 77);
        let body = "workflowId=3&appId=1";
        let wf = server
            .send("POST", "/openApi/runWorkflow", &FORM_TYPE, body)
            .await
            .json()
            .unwrap();
        assert!(wf["data"].as_i64().unwrap() > TWO_POW_53);
        let stopped = server
            .send("POST", "/openApi/stopInstance", &FORM_TYPE, body)
            .await
            .json()
            .unwrap();
        assert_eq!(
            stopped,
            json!({"success": true, "data": null, "message": null, "code": null})
        );
        let unsupported = server
            .send("POST", "/openApi/copyJob", &[], "")
            .await
            .json()
            .unwrap();
        assert!(unsupported["message"]
            .as_str()
            .unwrap()
            .contains("not supported by the runonce PowerJob mock"));
        assert_eq!(
            server.send("GET", "/server/hello", &[], "").await.status,
            404
        );
        assert_eq!(server.stats().await["workflow_instances"], 1);
    }

    #[tokio::test]
    async fn requests_are_recorded_and_reset_clears_them() {
        let server = Server::mode(Mode::V510AuthOff).await;
        let mut conn = server.connect().await;
        run_job(
            &mut conn,
            &[(ACCESS_TOKEN, "t1"), ("X-Forwarded-For", "10.0.0.1")],
        )
        .await;
        let recorded = server
            .send("GET", "/mock/requests", &[], "")
            .await
            .json()
            .unwrap();
        let first = &recorded[0];
        assert_eq!(recorded.as_array().unwrap().len(), 1);
        assert_eq!(first["method"], "POST");
        assert_eq!(first["path"], "/openApi/runJob");
        assert_eq!(first["headers"]["x-powerjob-access-token"], "t1");
        assert_eq!(first["headers"]["x-forwarded-for"], "10.0.0.1");
        assert!(first["body"]
            .as_str()
            .unwrap()
            .starts_with("jobId=5&delay=0"));

        assert_eq!(
            server.send("POST", "/mock/reset", &[], "").await.status,
            200
        );
        let stats = server.stats().await;
        assert_eq!(stats["instances"], 0);
        assert_eq!(stats["requests_by_path"], json!({}));
        assert_eq!(
            server
                .send("GET", "/mock/requests", &[], "")
                .await
                .json()
                .unwrap(),
            json!([])
        );
        assert_eq!(server.send("GET", "/mock/reset", &[], "").await.status, 405);
    }

    #[tokio::test]
    async fn latency_comes_after_the_instance_exists() {
        let server = Server::start(MockOptions {
            latency: Duration::from_millis(600),
            ..MockOptions::default()
        })
        .await;
        let mut conn = server.connect().await;
        let slow = tokio::spawn(async move { run_job(&mut conn, &[]).await });
        let deadline = tokio::time::Instant::now() + STEP;
        while server.stats().await["instances"] != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no instance was created"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!slow.is_finished(), "the answer came before the latency");
        assert_eq!(
            tokio::time::timeout(STEP, slow)
                .await
                .unwrap()
                .unwrap()
                .json()
                .unwrap()["success"],
            true
        );
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_closes_idle_connections() {
        let mut server = Server::mode(Mode::V511AuthOff).await;
        let mut idle = server.connect().await;
        run_job(&mut idle, &[]).await;
        server.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(STEP, &mut server.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(server.addr).await.is_err());
        let mut rest = [0u8; 16];
        let read = tokio::time::timeout(STEP, idle.stream.read(&mut rest))
            .await
            .unwrap();
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "idle connection still open: {read:?}"
        );
    }

    // ---- Faults on instance-creating calls ----

    async fn set_fault(server: &Server, body: &str) -> Reply {
        server.send("POST", "/mock/fault", &JSON_TYPE, body).await
    }

    /// Polls `/mock/stats` until `check` holds, for at most [`STEP`].
    async fn stats_until(server: &Server, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let stats = server.stats().await;
            if check(&stats) {
                return stats;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}: {stats}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn with_fault(mode: Mode, kind: FaultKind, count: Option<u64>) -> MockOptions {
        MockOptions {
            mode,
            fault: Fault::new(kind, count),
            ..MockOptions::default()
        }
    }

    #[tokio::test]
    async fn timeout_after_create_creates_then_answers_success_false_once() {
        let server = Server::mode(Mode::V511AuthOff).await;
        let set = set_fault(&server, r#"{"kind":"timeout-after-create","count":1}"#).await;
        assert_eq!(
            set.json().unwrap()["fault"],
            json!({"kind": "timeout-after-create", "remaining": 1, "message": null})
        );
        let mut conn = server.connect().await;
        let faulted = run_job(&mut conn, &[]).await;
        assert_eq!(faulted.status, 200);
        assert!(
            faulted.has_line("X-POWERJOB-AUTH-PASSED: true"),
            "{}",
            faulted.head
        );
        assert_eq!(
            faulted.text(),
            r#"{"code":null,"data":null,"message":"TimeoutException: null","success":false}"#
        );
        let stats = server.stats().await;
        assert_eq!(stats["instances"], 1);
        assert_eq!(stats["instances_by_job"], json!({"5": 1}));
        assert_eq!(stats["faults_injected"], 1);
        assert_eq!(stats["fault"]["kind"], "none", "count 1 is used up");

        let normal = run_job(&mut conn, &[]).await;
        assert!(normal.json().unwrap()["data"].as_i64().unwrap() > TWO_POW_53);
        assert_eq!(server.stats().await["instances"], 2);
    }

    #[tokio::test]
    async fn success_false_faults_take_the_v4_shape_and_a_message_override() {
        let mut options = with_fault(Mode::V4, FaultKind::TimeoutAfterCreate, None);
        options.fault.message = Some("UndeclaredThrowableException: ".to_owned());
        let server = Server::start(options).await;
        for _ in 0..2 {
            let reply = run_job(&mut server.connect().await, &[]).await;
            assert!(!reply.has_auth_header(), "{}", reply.head);
            assert_eq!(
                reply.json().unwrap(),
                json!({"success": false, "data": null, "message": "UndeclaredThrowableException: "})
            );
        }
        let body = "workflowId=3&appId=1";
        let workflow = server
            .send("POST", "/openApi/runWorkflow", &FORM_TYPE, body)
            .await;
        assert_eq!(workflow.json().unwrap()["success"], false);
        let stats = server.stats().await;
        assert_eq!(stats["instances"], 2);
        assert_eq!(stats["workflow_instances"], 1);
        assert_eq!(stats["faults_injected"], 3);
        assert_eq!(
            stats["fault"]["remaining"],
            Value::Null,
            "no count: every call"
        );
    }

    #[tokio::test]
    async fn error_after_create_leaves_the_row_behind() {
        let options = with_fault(Mode::V511AuthOff, FaultKind::ErrorAfterCreate, Some(1));
        let server = Server::start(options).await;
        let reply = run_job(&mut server.connect().await, &[]).await;
        assert_eq!(reply.status, 200);
        assert!(
            reply.has_line("X-POWERJOB-AUTH-PASSED: true"),
            "{}",
            reply.head
        );
        assert_eq!(
            reply.json().unwrap(),
            json!({"success": false, "data": null, "message": "PowerJobException: dispatch failed", "code": null})
        );
        assert_eq!(server.stats().await["instances_by_job"], json!({"5": 1}));
        // The row is there for anyone who looks.
        let found = query(&server, r#"{"jobIdEq":5}"#).await;
        assert_eq!(found["data"]["totalItems"], 1);
        assert_eq!(found["data"]["data"][0]["instanceParams"], r#"{"k":"v w"}"#);
    }

    #[tokio::test]
    async fn server_error_after_create_answers_500_without_the_auth_header() {
        let options = with_fault(
            Mode::V511AuthOff,
            FaultKind::ServerErrorAfterCreate,
            Some(1),
        );
        let server = Server::start(options).await;
        let reply = run_job(&mut server.connect().await, &[]).await;
        assert_eq!(reply.status, 500);
        assert!(
            reply
                .head
                .starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
            "{}",
            reply.head
        );
        assert!(!reply.has_auth_header(), "{}", reply.head);
        let body = reply.json().unwrap();
        assert_eq!(body["status"], 500);
        assert_eq!(body["error"], "Internal Server Error");
        assert_eq!(body["path"], "/openApi/runJob");
        assert_eq!(server.stats().await["instances"], 1);
    }

    #[tokio::test]
    async fn gateway_faults_answer_nginx_pages_after_creating() {
        let server = Server::mode(Mode::V511AuthOff).await;
        let cases = [
            ("502-after-create", "502 Bad Gateway"),
            ("504-after-create", "504 Gateway Time-out"),
        ];
        for (n, (kind, status_line)) in cases.into_iter().enumerate() {
            set_fault(&server, &format!(r#"{{"kind":"{kind}","count":1}}"#)).await;
            let reply = run_job(&mut server.connect().await, &[]).await;
            assert!(
                reply
                    .head
                    .starts_with(&format!("HTTP/1.1 {status_line}\r\n")),
                "{}",
                reply.head
            );
            assert!(reply.has_line("Server: nginx"), "{}", reply.head);
            assert!(reply.has_line("Content-Type: text/html"), "{}", reply.head);
            assert!(!reply.has_auth_header());
            assert_eq!(
                reply.text(),
                format!(
                    "<html>\r\n<head><title>{status_line}</title></head>\r\n<body>\r\n<center><h1>{status_line}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
                )
            );
            assert_eq!(server.stats().await["instances"], n + 1);
        }
    }

    #[tokio::test]
    async fn stall_after_create_holds_the_connection_until_the_client_leaves() {
        let options = with_fault(Mode::V511AuthOff, FaultKind::StallAfterCreate, Some(1));
        let server = Server::start(options).await;
        let mut conn = server.connect().await;
        let (_, body) = RUN_JOB;
        conn.write("POST", "/openApi/runJob", &FORM_TYPE, body)
            .await;
        let stats = stats_until(&server, "stalled", |s| s["stalled"] == 1).await;
        assert_eq!(stats["instances"], 1, "created before stalling");
        let mut byte = [0u8; 1];
        let early =
            tokio::time::timeout(Duration::from_millis(300), conn.stream.read(&mut byte)).await;
        assert!(early.is_err(), "the stalled call answered: {early:?}");

        drop(conn);
        stats_until(&server, "released after the client left", |s| {
            s["stalled"] == 0
        })
        .await;
        // The fault was for one call only: the next one is answered.
        let reply = run_job(&mut server.connect().await, &[]).await;
        assert_eq!(reply.json().unwrap()["success"], true);
    }

    #[tokio::test]
    async fn stall_ends_without_an_answer_when_the_mock_stops() {
        let options = with_fault(Mode::V511AuthOff, FaultKind::StallAfterCreate, None);
        let mut server = Server::start(options).await;
        let mut conn = server.connect().await;
        let (_, body) = RUN_JOB;
        conn.write("POST", "/openApi/runJob", &FORM_TYPE, body)
            .await;
        stats_until(&server, "stalled", |s| s["stalled"] == 1).await;
        server.stop.take().unwrap().send(()).unwrap();
        assert_eq!(conn.read_until_closed().await, b"");
        tokio::time::timeout(STEP, &mut server.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn close_without_create_closes_and_creates_nothing() {
        let server = Server::mode(Mode::V511AuthOff).await;
        let set = server
            .send(
                "POST",
                "/mock/fault",
                &FORM_TYPE,
                "kind=close-without-create&count=1",
            )
            .await;
        assert_eq!(set.json().unwrap()["fault"]["kind"], "close-without-create");
        let mut conn = server.connect().await;
        let (_, body) = RUN_JOB;
        conn.write("POST", "/openApi/runJob", &FORM_TYPE, body)
            .await;
        assert_eq!(conn.read_until_closed().await, b"");
        let stats = server.stats().await;
        assert_eq!(stats["instances"], 0);
        assert_eq!(stats["faults_injected"], 1);
        // The request did arrive: only the answer is missing.
        assert_eq!(stats["requests_by_path"]["/openApi/runJob"], 1);
        let reply = run_job(&mut server.connect().await, &[]).await;
        assert_eq!(reply.json().unwrap()["success"], true);
        assert_eq!(server.stats().await["instances"], 1);
    }

    #[tokio::test]
    async fn refused_calls_leave_the_fault_for_the_next_accepted_one() {
        let options = with_fault(Mode::AuthOn, FaultKind::CloseWithoutCreate, Some(1));
        let server = Server::start(options).await;
        let mut conn = server.connect().await;
        let refused = run_job(&mut conn, &[]).await;
        assert!(refused.has_line("X-POWERJOB-AUTH-PASSED: false"));
        let auth = conn
            .send("POST", "/openApi/authApp", &JSON_TYPE, AUTH_BODY)
            .await;
        let token = auth.json().unwrap()["data"]["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let auth_headers = [(APP_ID, "1"), (ACCESS_TOKEN, token.as_str())];
        let mut headers = FORM_TYPE.to_vec();
        headers.extend_from_slice(&auth_headers);
        let missing = conn
            .send("POST", "/openApi/runJob", &headers, "jobId=999&appId=1")
            .await;
        assert_eq!(missing.json().unwrap()["success"], false);
        assert_eq!(server.stats().await["fault"]["remaining"], 1);

        let mut conn = server.connect().await;
        conn.write("POST", "/openApi/runJob", &headers, RUN_JOB.1)
            .await;
        assert_eq!(conn.read_until_closed().await, b"");
        let stats = server.stats().await;
        assert_eq!(stats["fault"]["kind"], "none");
        assert_eq!(stats["instances"], 0);
    }

    #[tokio::test]
    async fn fault_endpoint_validates_and_reset_keeps_the_fault() {
        let server = Server::mode(Mode::V511AuthOff).await;
        let bad_kind = set_fault(&server, r#"{"kind":"slow"}"#).await;
        assert_eq!(bad_kind.status, 400);
        let error = bad_kind.json().unwrap()["error"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            error.contains("close-without-create") && error.contains("5xx-after-create"),
            "{error}"
        );
        assert_eq!(
            set_fault(&server, r#"{"kind":"timeout-after-create","count":-1}"#)
                .await
                .status,
            400
        );
        assert_eq!(set_fault(&server, r#"{"count":1}"#).await.status, 400);
        assert_eq!(set_fault(&server, "{").await.status, 400);
        assert_eq!(server.send("PUT", "/mock/fault", &[], "").await.status, 405);

        let set = server
            .send(
                "POST",
                "/mock/fault?kind=502-after-create",
                &[],
                "count=2&message=m",
            )
            .await;
        let expected = json!({"kind": "502-after-create", "remaining": 2, "message": "m"});
        assert_eq!(set.json().unwrap()["fault"], expected);
        server.send("POST", "/mock/reset", &[], "").await;
        let shown = server.send("GET", "/mock/fault", &[], "").await;
        assert_eq!(shown.json().unwrap()["fault"], expected);
        assert_eq!(server.stats().await["fault"], expected);

        let none = json!({"kind": "none", "remaining": null, "message": null});
        let zero = set_fault(&server, r#"{"kind":"504-after-create","count":0}"#).await;
        assert_eq!(zero.json().unwrap()["fault"], none);
        set_fault(&server, r#"{"kind":"504-after-create","count":"3"}"#).await;
        let cleared = set_fault(&server, r#"{"kind":"none"}"#).await;
        assert_eq!(cleared.json().unwrap()["fault"], none);
        let reply = run_job(&mut server.connect().await, &[]).await;
        assert_eq!(reply.json().unwrap()["success"], true);
        assert_eq!(server.stats().await["faults_injected"], 0);
    }

    #[test]
    fn fault_kinds_round_trip_and_errors_name_the_choices() {
        for kind in FaultKind::ALL {
            assert_eq!(kind.as_str().parse::<FaultKind>(), Ok(kind));
        }
        let err = "timeout".parse::<FaultKind>().unwrap_err();
        assert!(
            err.contains("timeout-after-create") && err.contains("none"),
            "{err}"
        );
    }

    #[test]
    fn a_counted_fault_runs_out() {
        let mut fault = Fault::new(FaultKind::ErrorAfterCreate, Some(2));
        assert_eq!(fault.take().kind, FaultKind::ErrorAfterCreate);
        assert_eq!(fault.remaining, Some(1));
        assert_eq!(fault.take().kind, FaultKind::ErrorAfterCreate);
        assert_eq!(fault, Fault::default());
        assert_eq!(fault.take().kind, FaultKind::None);
        let mut zero = Fault::new(FaultKind::ErrorAfterCreate, Some(0));
        assert_eq!(zero.take().kind, FaultKind::None);
    }

    // ---- /queryInstance and instances created outside the client ----

    async fn query(server: &Server, body: &str) -> Value {
        server
            .send("POST", "/openApi/queryInstance", &JSON_TYPE, body)
            .await
            .json()
            .unwrap()
    }

    fn ids(answer: &Value) -> Vec<i64> {
        answer["data"]["data"]
            .as_array()
            .unwrap_or_else(|| panic!("no page: {answer}"))
            .iter()
            .map(|info| info["instanceId"].as_i64().unwrap())
            .collect()
    }

    async fn create_outside(server: &Server, form: &str) -> i64 {
        let reply = server
            .send("POST", "/mock/create-instance", &FORM_TYPE, form)
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json().unwrap()["instanceId"].as_i64().unwrap()
    }

    async fn run_job_with(server: &Server, body: &str) -> i64 {
        let reply = server
            .send("POST", "/openApi/runJob", &FORM_TYPE, body)
            .await;
        reply.json().unwrap()["data"]
            .as_i64()
            .unwrap_or_else(|| panic!("runJob failed: {}", reply.text()))
    }

    #[tokio::test]
    async fn query_instance_filters_like_5_1_1() {
        let server = Server::mode(Mode::V511AuthOff).await;
        let before = now_ms();
        let a = run_job_with(&server, "jobId=5&appId=1").await;
        let b = run_job_with(&server, "jobId=5&appId=1&instanceParams=p").await;
        let c = run_job_with(&server, "jobId=6&appId=1").await;
        let other_app = create_outside(&server, "jobId=5&appId=2").await;
        let waiting = create_outside(&server, "jobId=5&delay=600000").await;
        let after = now_ms();
        assert!(a < b && b < c && c < other_app && other_app < waiting);

        let everything = query(&server, "{}").await;
        assert_eq!(everything["success"], true);
        assert!(
            everything.get("code").is_none(),
            "a ResultDTO: {everything}"
        );
        assert_eq!(ids(&everything), [a, b, c, other_app, waiting]);
        assert_eq!(
            ids(&query(&server, r#"{"appIdEq":1}"#).await),
            [a, b, c, waiting]
        );
        assert_eq!(
            ids(&query(&server, r#"{"appIdEq":1,"jobIdEq":5}"#).await),
            [a, b, waiting]
        );
        let range = format!(r#"{{"instanceIdGt":{a},"instanceIdLt":{other_app}}}"#);
        assert_eq!(ids(&query(&server, &range).await), [b, c], "strict bounds");
        let one = format!(r#"{{"instanceIdEq":"{c}"}}"#);
        assert_eq!(ids(&query(&server, &one).await), [c]);
        assert_eq!(ids(&query(&server, r#"{"statusIn":[1]}"#).await), [waiting]);
        assert_eq!(
            ids(&query(&server, r#"{"statusIn":[5],"jobIdEq":5,"appIdEq":1}"#).await),
            [a, b]
        );
        let window = format!(
            r#"{{"gmtCreateGt":{},"gmtCreateLt":{}}}"#,
            before - 1,
            after + 1
        );
        assert_eq!(ids(&query(&server, &window).await).len(), 5);
        let before_all = format!(r#"{{"gmtCreateLt":{before}}}"#);
        assert_eq!(ids(&query(&server, &before_all).await), Vec::<i64>::new());
        // A send window is an id range: ids carry their creation time.
        let low = (before - SNOWFLAKE_EPOCH_MS) << 22;
        let high = (after + 1 - SNOWFLAKE_EPOCH_MS) << 22;
        let id_window = format!(r#"{{"instanceIdGt":{},"instanceIdLt":{high}}}"#, low - 1);
        assert_eq!(ids(&query(&server, &id_window).await).len(), 5);

        let infos = &query(&server, &format!(r#"{{"instanceIdEq":{b}}}"#)).await["data"]["data"];
        assert_eq!(infos[0]["instanceParams"], "p");
        assert_eq!(infos[0]["jobId"], 5);
        assert_eq!(infos[0]["appId"], 1);
        let bad = query(&server, r#"{"jobIdEq":"five"}"#).await;
        assert_eq!(bad["success"], false);
        assert!(bad["message"]
            .as_str()
            .unwrap()
            .starts_with("HttpMessageNotReadableException: JSON parse error: Cannot deserialize value of type `java.lang.Long`"));
    }

    #[tokio::test]
    async fn query_instance_pages_in_ascending_order() {
        let server = Server::mode(Mode::V511AuthOff).await;
        let mut created = Vec::new();
        for job in [9, 8, 7, 8, 9] {
            created.push(run_job_with(&server, &format!("jobId={job}&appId=1")).await);
        }
        let first = query(&server, r#"{"pageSize":2}"#).await;
        assert_eq!(
            first["data"],
            json!({
                "index": 0, "pageSize": 2, "totalPages": 3, "totalItems": 5,
                "data": first["data"]["data"].clone(),
            })
        );
        assert_eq!(ids(&first), created[..2]);
        assert_eq!(
            ids(&query(&server, r#"{"pageSize":2,"index":1}"#).await),
            created[2..4]
        );
        assert_eq!(
            ids(&query(&server, r#"{"pageSize":2,"index":2}"#).await),
            created[4..]
        );
        let past = query(&server, r#"{"pageSize":2,"index":7}"#).await;
        assert_eq!(ids(&past), Vec::<i64>::new());
        assert_eq!(past["data"]["totalItems"], 5);
        let defaults = query(&server, r#"{"index":null,"asc":false}"#).await;
        assert_eq!(
            (
                defaults["data"]["index"].clone(),
                defaults["data"]["pageSize"].clone()
            ),
            (json!(0), json!(10))
        );
        assert_eq!(ids(&defaults), created);
        let by_job = query(&server, r#"{"sortBy":"jobId"}"#).await;
        assert_eq!(
            ids(&by_job),
            [created[2], created[1], created[3], created[0], created[4]]
        );
        let empty = query(&server, r#"{"jobIdEq":1}"#).await;
        assert_eq!(empty["data"]["totalPages"], 0);

        let cases = [
            (
                r#"{"index":-1}"#,
                "IllegalArgumentException: Page index must not be less than zero",
            ),
            (
                r#"{"pageSize":0}"#,
                "IllegalArgumentException: Page size must not be less than one",
            ),
            (
                r#"{"sortBy":"nope"}"#,
                "PropertyReferenceException: No property 'nope' found for type 'InstanceInfoDO'",
            ),
        ];
        for (body, message) in cases {
            let failed = query(&server, body).await;
            assert_eq!(
                failed,
                json!({"success": false, "data": null, "message": message, "code": null}),
                "{body}"
            );
        }
        let missing = query(&server, "").await;
        assert!(missing["message"]
            .as_str()
            .unwrap()
            .starts_with("HttpMessageNotReadableException: Required request body is missing: "));
    }

    #[tokio::test]
    async fn query_instance_cannot_bind_before_5_1_1() {
        let server = Server::mode(Mode::V510AuthOff).await;
        run_job_with(&server, "jobId=5&appId=1").await;
        let reply = server
            .send(
                "POST",
                "/openApi/queryInstance",
                &JSON_TYPE,
                r#"{"appIdEq":1}"#,
            )
            .await;
        assert_eq!(reply.status, 200);
        assert!(!reply.has_auth_header());
        assert_eq!(
            reply.json().unwrap(),
            json!({
                "success": false, "data": null, "code": null,
                "message": "HttpMessageConversionException: Type definition error: [simple type, class tech.powerjob.common.PowerQuery]",
            })
        );
        let empty = query(&server, "").await;
        assert!(empty["message"]
            .as_str()
            .unwrap()
            .starts_with("HttpMessageNotReadableException: Required request body is missing: "));
        let malformed = query(&server, "{appIdEq").await;
        assert!(malformed["message"]
            .as_str()
            .unwrap()
            .starts_with("HttpMessageNotReadableException: JSON parse error: "));

        let v4 = Server::mode(Mode::V4).await;
        let answer = query(&v4, "{}").await;
        assert_eq!(answer["success"], false);
        assert!(answer.get("code").is_none(), "ResultDTO in 4.x: {answer}");
    }

    #[tokio::test]
    async fn query_instance_checks_the_token_with_auth_on() {
        let server = Server::mode(Mode::AuthOn).await;
        let mut conn = server.connect().await;
        let refused = conn
            .send("POST", "/openApi/queryInstance", &JSON_TYPE, "{}")
            .await;
        assert!(
            refused.has_line("X-POWERJOB-AUTH-PASSED: false"),
            "{}",
            refused.head
        );
        assert_eq!(refused.json().unwrap()["code"], "-300");
        let mut headers = JSON_TYPE.to_vec();
        headers.push((APP_ID, "1"));
        let no_token = conn
            .send("POST", "/openApi/queryInstance", &headers, "{}")
            .await;
        assert_eq!(no_token.json().unwrap()["code"], "-1002");

        let auth = conn
            .send("POST", "/openApi/authApp", &JSON_TYPE, AUTH_BODY)
            .await;
        let token = auth.json().unwrap()["data"]["token"]
            .as_str()
            .unwrap()
            .to_owned();
        headers.push((ACCESS_TOKEN, &token));
        let id = create_outside(&server, "jobId=5").await;
        let answer = conn
            .send(
                "POST",
                "/openApi/queryInstance",
                &headers,
                r#"{"appIdEq":1}"#,
            )
            .await;
        assert!(
            answer.has_line("X-POWERJOB-AUTH-PASSED: true"),
            "{}",
            answer.head
        );
        assert_eq!(ids(&answer.json().unwrap()), [id]);
    }

    #[tokio::test]
    async fn instances_carry_their_creation_time_delay_and_params() {
        let server = Server::mode(Mode::V511AuthOff).await;
        let before = now_ms();
        let delayed = run_job_with(&server, "jobId=5&appId=1&delay=5000").await;
        let negative = run_job_with(&server, "jobId=5&appId=1&delay=-7&instanceParams=").await;
        let after = now_ms();
        for id in [delayed, negative] {
            let created = snowflake_ms(id);
            assert!(
                (before..=after).contains(&created),
                "{before} {created} {after}"
            );
            assert_eq!(id >> 22, created - SNOWFLAKE_EPOCH_MS);
        }
        let infos = query(&server, "{}").await;
        let infos = infos["data"]["data"].as_array().unwrap();
        let created = snowflake_ms(delayed);
        assert_eq!(infos[0]["gmtCreate"], iso_millis(created));
        assert_eq!(infos[0]["expectedTriggerTime"], created + 5000);
        assert_eq!(infos[0]["instanceParams"], Value::Null, "absent stays null");
        assert_eq!(infos[0]["status"], status::WAITING_DISPATCH);
        assert_eq!(infos[1]["expectedTriggerTime"], snowflake_ms(negative));
        assert_eq!(infos[1]["instanceParams"], "", "empty is stored as sent");
    }

    #[tokio::test]
    async fn create_instance_counts_like_run_job_and_needs_a_job_id() {
        let server = Server::mode(Mode::V511AuthOff).await;
        let missing = server
            .send("POST", "/mock/create-instance", &FORM_TYPE, "appId=1")
            .await;
        assert_eq!(missing.status, 400);
        let bad = server
            .send("POST", "/mock/create-instance", &[], "jobId=x")
            .await;
        assert_eq!(bad.status, 400);
        assert_eq!(
            server
                .send("GET", "/mock/create-instance", &[], "")
                .await
                .status,
            405
        );

        let id = create_outside(&server, "jobId=5&instanceParams=%7B%22k%22%3A1%7D&delay=0").await;
        let body = format!("instanceId={id}");
        let info = server
            .send("POST", "/openApi/fetchInstanceInfo", &FORM_TYPE, &body)
            .await
            .json()
            .unwrap();
        assert_eq!(info["data"]["appId"], 1);
        assert_eq!(info["data"]["instanceParams"], r#"{"k":1}"#);
        let stats = server.stats().await;
        assert_eq!(stats["instances"], 1);
        assert_eq!(stats["instances_by_job"], json!({"5": 1}));
        assert!(
            stats["requests_by_path"]
                .get("/mock/create-instance")
                .is_none(),
            "admin calls are not recorded"
        );
    }

    #[tokio::test]
    async fn handle_works_without_sockets() {
        let mock = Mock::new(MockOptions::default()).await.unwrap();
        let request = Request::post("/openApi/assert?appName=my-app&password=123456")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = mock.handle(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["data"], 1);
    }

    #[test]
    fn form_decoding() {
        let value = |encoded: &str| parse_form(&format!("k={encoded}"))[0].1.clone();
        assert_eq!(value("%7B%22k%22%3A%22v%20w%22%7D"), r#"{"k":"v w"}"#);
        assert_eq!(value("a+b%2Bc"), "a b+c");
        assert_eq!(value("%E4%BD%A0%zz%4"), "你%zz%4");
        assert_eq!(value("%FF"), "\u{FFFD}");
        assert_eq!(
            parse_form("jobId=5&&flag&instanceParams=x%3Dy"),
            vec![
                ("jobId".to_owned(), "5".to_owned()),
                ("flag".to_owned(), String::new()),
                ("instanceParams".to_owned(), "x=y".to_owned()),
            ]
        );
    }

    #[test]
    fn ids_are_above_2_pow_53_and_strictly_increasing() {
        let ids = IdGenerator::default();
        let mut last = 0;
        for _ in 0..10_000 {
            let id = ids.next();
            assert!(id > TWO_POW_53 && id > last);
            last = id;
        }
    }

    #[test]
    fn modes_round_trip_and_errors_name_the_choices() {
        for mode in Mode::ALL {
            assert_eq!(mode.as_str().parse::<Mode>(), Ok(mode));
        }
        let err = "v5".parse::<Mode>().unwrap_err();
        assert!(
            err.contains("v5.1.0-auth-off") && err.contains("auth-on") && err.contains("v4"),
            "{err}"
        );
    }

    #[test]
    fn dates_render_like_jackson_and_jjwt() {
        assert_eq!(
            iso_millis(1_723_431_845_678),
            "2024-08-12T03:04:05.678+00:00"
        );
        assert_eq!(iso_seconds(0), "1970-01-01T00:00:00Z");
        assert_eq!(md5_hex("123456"), "e10adc3949ba59abbe56e057f20f883e");
    }
}
