//! A PowerJob-compatible fake server for tests and the demo.
//!
//! It owns: the `/openApi/**` endpoints a PowerJob client uses (`/assert`, `/authApp`, `/runJob`, `/runWorkflow`,
//! `/saveJob`, `/fetchInstanceInfo`, `/fetchInstanceStatus`, `/retryInstance`, `/stopInstance`), the server modes
//! that decide whether `X-POWERJOB-AUTH-PASSED` is sent (see [`Mode`] and `shared/POWERJOB.md` §3.5 and §7), a
//! record of every request, and the `/mock/*` admin endpoints that expose that record:
//!
//! - `GET /mock/stats`: instance and request counters as JSON.
//! - `GET /mock/requests`: every recorded request in arrival order.
//! - `POST /mock/reset`: clears counters and records (issued tokens and created instances stay valid).
//! - `POST /mock/expire-tokens`: makes every issued token expired, to exercise the `TOKEN_EXPIRED` path.
//!
//! Like the real server, it creates a new instance for every accepted `runJob`: there is no de-duplication here,
//! which is what lets tests count duplicates.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
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
use tracing::{debug, info, warn};

use super::{
    header_present, result_json, result_json_v4, served_endpoint, status, ACCESS_TOKEN, APP_ID,
    AUTH_PASSED,
};
use crate::proxy::headers::exact_case_head;
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
        Mode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == s)
            .ok_or_else(|| {
                let allowed: Vec<&str> = Mode::ALL.iter().map(Mode::as_str).collect();
                format!(
                    "unknown mock mode `{s}`; expected one of: {}",
                    allowed.join(", ")
                )
            })
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the mock behaves and which single app it knows.
#[derive(Clone, Debug)]
pub struct MockOptions {
    pub mode: Mode,
    /// Added before answering `runJob` and `runWorkflow`, after the instance exists: a client that times out
    /// meanwhile has still created it, as against a real server that commits and then answers slowly.
    pub latency: Duration,
    pub app_name: String,
    pub password: String,
    pub app_id: i64,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            mode: Mode::V510AuthOff,
            latency: Duration::ZERO,
            app_name: "my-app".to_owned(),
            password: "123456".to_owned(),
            app_id: 1,
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
        let service = service_fn(move |req| {
            let mock = Arc::clone(&mock);
            async move { Ok::<_, Infallible>(mock.handle(req).await) }
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
}

/// Response heads whose header names must leave in exact case; built once, cloned per response.
struct Heads {
    plain: response::Parts,
    passed: response::Parts,
    refused: response::Parts,
}

impl Heads {
    async fn build() -> Result<Self, hyper::Error> {
        const JSON: (&str, &str) = ("Content-Type", "application/json");
        Ok(Self {
            plain: exact_case_head(StatusCode::OK, &[JSON]).await?,
            passed: exact_case_head(StatusCode::OK, &[JSON, (AUTH_PASSED, "true")]).await?,
            refused: exact_case_head(StatusCode::OK, &[JSON, (AUTH_PASSED, "false")]).await?,
        })
    }
}

#[derive(Default)]
struct State {
    requests: Vec<RecordedRequest>,
    requests_by_path: BTreeMap<String, u64>,
    instances_created: u64,
    instances_by_job: BTreeMap<i64, u64>,
    workflow_instances: u64,
    tokens_issued: u64,
    /// The "database": survives `/mock/reset` so that ids a client already holds stay valid.
    instances: HashMap<i64, Instance>,
    tokens: HashMap<String, Token>,
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
        Ok(Arc::new(Self {
            options,
            heads: Heads::build().await?,
            ids: IdGenerator::default(),
            next_job_id: AtomicI64::new(FIRST_NEW_JOB_ID),
            state: Mutex::default(),
        }))
    }

    /// Answers one request; never fails, every problem becomes a response.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => return unreadable_body(&parts, err),
        };
        let path = parts.uri.path();
        if let Some(admin) = path.strip_prefix("/mock/") {
            return self.admin(&parts.method, admin);
        }
        self.record(&parts, &body);
        match served_endpoint(path).as_deref() {
            Some(endpoint) => self.openapi(&parts, endpoint, &body).await,
            None => not_found(path),
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
    ) -> Response<Full<Bytes>> {
        if self.options.mode == Mode::V4 && endpoint == "authApp" {
            return not_found(parts.uri.path());
        }
        if parts.method != Method::POST {
            // Raised while mapping the handler, so no interceptor runs and no auth header is added.
            let message = format!(
                "HttpRequestMethodNotSupportedException: Request method '{}' not supported",
                parts.method
            );
            return self.reply(&self.heads.plain, self.result(Err(Failure::new(message))));
        }
        let head = match self.intercept(endpoint, &parts.headers) {
            Ok(head) => head,
            Err(refusal) => return self.reply(&self.heads.refused, refusal),
        };
        let outcome = self.controller(endpoint, parts, body).await;
        self.reply(head, self.result(outcome))
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

    async fn controller(&self, endpoint: &str, parts: &request::Parts, body: &[u8]) -> Outcome {
        match endpoint {
            "authApp" => self.auth_app(body),
            "saveJob" => self.save_job(body),
            _ => {
                let form = Form::from_request(parts, body);
                match endpoint {
                    "assert" => self.assert_app(&form),
                    "runJob" => self.run_job(&form).await,
                    "runWorkflow" => self.run_workflow(&form).await,
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

    /// `runJob(appId, jobId, instanceParams, delay)`: binding, `checkJobIdValid`, then the instance.
    async fn run_job(&self, form: &Form) -> Outcome {
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
        let id = self.create_instance(job_id, app_id, form.get("instanceParams"), delay);
        self.answer_slowly().await;
        Ok(id.into())
    }

    /// `runWorkflow(workflowId, appId, initParams, delay)`: the server checks nothing beyond binding.
    async fn run_workflow(&self, form: &Form) -> Outcome {
        let workflow_id = form.long("workflowId")?;
        form.long("appId")?;
        form.long("delay")?;
        let workflow_id = workflow_id.ok_or_else(null_id)?;
        let id = self.ids.next();
        self.state().workflow_instances += 1;
        debug!(
            workflow_id,
            wf_instance_id = id,
            "mock created a workflow instance"
        );
        self.answer_slowly().await;
        Ok(id.into())
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

    fn create_instance(
        &self,
        job_id: i64,
        app_id: i64,
        instance_params: Option<&str>,
        delay: i64,
    ) -> i64 {
        let id = self.ids.next();
        let created_ms = now_ms();
        let mut state = self.state();
        state.instances_created += 1;
        *state.instances_by_job.entry(job_id).or_default() += 1;
        state.instances.insert(
            id,
            Instance {
                job_id,
                app_id,
                instance_params: instance_params.map(str::to_owned),
                created_ms,
                expected_trigger_ms: created_ms.saturating_add(delay.max(0)),
            },
        );
        debug!(job_id, instance_id = id, "mock created an instance");
        id
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

    fn admin(&self, method: &Method, what: &str) -> Response<Full<Bytes>> {
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
            (_, "stats" | "requests" | "reset" | "expire-tokens") => plain_json(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({ "error": format!("method {method} not allowed on /mock/{what}") }),
            ),
            _ => not_found(&format!("/mock/{what}")),
        }
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
        "gmtModified": iso_millis(if done { trigger } else { instance.created_ms }),
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
            tokio::time::timeout(STEP, rawhttp::read_response(&mut self.stream))
                .await
                .unwrap()
                .unwrap()
        }
    }

    const FORM_TYPE: [(&str, &str); 1] = [("Content-Type", "application/x-www-form-urlencoded")];
    const JSON_TYPE: [(&str, &str); 1] = [("Content-Type", "application/json; charset=utf-8")];

    async fn run_job(conn: &mut Conn, extra: &[(&str, &str)]) -> Reply {
        let body = "jobId=5&delay=0&appId=1&instanceParams=%7B%22k%22%3A%22v%20w%22%7D";
        let mut headers = FORM_TYPE.to_vec();
        headers.extend_from_slice(extra);
        conn.send("POST", "/openApi/runJob", &headers, body).await
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

    #[tokio::test]
    async fn handle_works_without_sockets() {
        let mock = Mock::new(MockOptions::default()).await.unwrap();
        let request = Request::post("/openApi/assert?appName=my-app&password=123456")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = mock.handle(request).await;
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
