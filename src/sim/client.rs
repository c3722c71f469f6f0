//! An emulation of the request path of the PowerJob 5.1.0 Java client (`tech.powerjob:powerjob-client:5.1.0`).
//!
//! The real client cannot be built here, so tests drive this emulation instead. It reproduces, from reading the
//! PowerJob sources at tag `v5.1.0` (see `shared/POWERJOB.md` §4 and §8; no PowerJob code is copied):
//!
//! - `ClusterRequestService.clusterHaRequest`: try the current address; only on a transport error or timeout, try
//!   every other configured address in order; the first one that answers at all becomes the current address.
//! - `AppAuthClusterRequestService.request`: fetch a token from `/openApi/authApp`, send with it, and when the
//!   response lacks the exact-case header `X-POWERJOB-AUTH-PASSED: true`, re-authenticate and **send the same
//!   request again**. Against a v5.1.0 server with auth off this runs every call twice: the duplicate this
//!   project guards against.
//! - `ClusterRequestServiceOkHttp3Impl`: OkHttp 3.14.9 with a whole-call timeout (default 2 s), `FormBody`
//!   encoding, and a response header map keyed by the names *exactly as received*.
//! - `PowerJobClient`: the constructor's `/authApp` request and the form fields of `runJob`, `runWorkflow` and
//!   `fetchInstanceStatus` in the iteration order of the Java `HashMap` that holds them.
//!
//! # Why raw bytes instead of hyper
//! The whole bug hinges on the *case* of a response header name: the Java client looks up
//! `X-POWERJOB-AUTH-PASSED` with a plain `HashMap.get`, so `x-powerjob-auth-passed` is not found. hyper
//! normalises header names to lower case and hides the original spelling, so it cannot tell these apart. This
//! module therefore renders the request bytes itself and sends them with [`crate::rawhttp`], which reads the
//! response with header names as they appeared on the wire.
//!
//! # Known simplifications
//! One TCP connection per exchange (OkHttp would pool and reuse it, and could transparently re-send a POST on a
//! stale pooled connection); plain HTTP only; no `Accept-Encoding: gzip` (OkHttp adds it and decompresses
//! transparently, but we have no inflater and PowerJob's server does not compress by default); no
//! `defaultHeaders` and no `ClientExtension.addressProvider`.

use std::fmt::Write as _;
use std::time::Duration;

use md5::{Digest, Md5};
use serde::Serialize;
use serde_json::Value;

use crate::powerjob::{ACCESS_TOKEN, APP_ID, AUTH_PASSED, WEB_PATH};
use crate::rawhttp::{self, Response};

/// The client's default connect/read/write/call timeout (`ClusterRequestService.DEFAULT_TIMEOUT_SECONDS`).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// OkHttp's `Version.userAgent()` for the version PowerJob pins.
const USER_AGENT: &str = "okhttp/3.14.9";
/// `OmsConstant.JSON_MEDIA_TYPE`, which OkHttp sends verbatim as the request `Content-Type`.
const JSON_MEDIA_TYPE: &str = "application/json; charset=utf-8";
/// `FormBody`'s content type (no charset).
const FORM_MEDIA_TYPE: &str = "application/x-www-form-urlencoded";
/// OkHttp `HttpUrl.FORM_ENCODE_SET`: ASCII characters a form name or value must percent-encode.
const FORM_ENCODE_SET: &[u8] = b" \"':;<=>@[]^`{}|/\\?#&!$(),~";

const AUTH_APP: &str = "/authApp";
const RUN_JOB: &str = "/runJob";
const RUN_WORKFLOW: &str = "/runWorkflow";
const FETCH_INSTANCE_STATUS: &str = "/fetchInstanceStatus";

/// The subset of the Java `ClientConfig` the emulation needs.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port`, optionally followed by a path prefix (`host:port/prefix`); tried in this order.
    pub addresses: Vec<String>,
    pub app_name: String,
    pub password: String,
    /// Whole-call timeout of one HTTP exchange (connect + write + read), OkHttp's `callTimeout`.
    pub timeout: Duration,
}

impl ClientConfig {
    /// A config with the client's default 2 s timeout.
    pub fn new(addresses: Vec<String>, app_name: &str, password: &str) -> Self {
        ClientConfig {
            addresses,
            app_name: app_name.to_owned(),
            password: password.to_owned(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// The exceptions the Java client throws, with the same messages.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Every address failed with a transport error or timeout.
    #[error("no server available when send post request")]
    NoServer,
    /// `/authApp` answered with a status other than 200.
    #[error("AUTH_APP_EXCEPTION!")]
    AuthApp,
    /// `/authApp` answered `success=false`; holds the server's message (`null` if absent, as Java prints it).
    #[error("AUTH_FAILED_{0}")]
    AuthFailed(String),
    /// A business request answered with a status other than 200.
    #[error("REMOTE_SERVER_INNER_EXCEPTION")]
    RemoteServer,
    /// The constructor's `/authApp` request answered `success=false`; the Java client throws the bare message.
    #[error("{0}")]
    Rejected(String),
    /// A body the Java client could not have used (empty, not JSON, or missing fields).
    #[error("bad response body: {0}")]
    BadBody(String),
}

/// One HTTP exchange as the emulation saw it.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// The configured address the request went to.
    pub address: String,
    /// The request target, e.g. `/openApi/runJob` (with the address's path prefix, if any).
    pub path: String,
    /// The final response status, if a response arrived.
    pub status: Option<u16>,
    /// The value the Java client finds under the exact name `X-POWERJOB-AUTH-PASSED`.
    pub auth_passed_exact: Option<String>,
    /// Why the exchange failed (transport error or timeout); `None` if a response arrived.
    pub error: Option<String>,
}

/// `ResultDTO` / `PowerResultDTO` as the client parses it.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ResultDto {
    /// fastjson leaves a missing `success` at `false`; so do we.
    #[serde(default)]
    pub success: bool,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub code: Option<Value>,
}

impl ResultDto {
    /// `data` as an int64 (instance ids exceed 2^53, so never via f64). Numeric strings count, as in fastjson.
    pub fn data_i64(&self) -> Option<i64> {
        json_i64(&self.data)
    }
}

/// The stored `AppAuthResult`.
#[derive(Clone, Debug)]
struct AppAuth {
    app_id: i64,
    token: String,
}

/// `AppAuthRequest` as Jackson (`NON_NULL`) writes it: declaration order, `null` fields left out.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AuthAppBody<'a> {
    app_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    encrypted_password: Option<String>,
    encrypt_type: &'static str,
}

/// A request body and its `Content-Type`.
#[derive(Clone, Debug)]
struct Payload {
    content_type: &'static str,
    bytes: Vec<u8>,
}

/// The emulated `PowerJobClient` (5.1.0) together with its `ClusterRequestServiceOkHttp3Impl`.
pub struct Client510 {
    config: ClientConfig,
    current_address: String,
    auth: Option<AppAuth>,
    app_id: i64,
    exchanges: Vec<Exchange>,
    log: Vec<String>,
}

impl Client510 {
    /// The constructor: `request("/authApp", json)`, then `data.appId` from the body. This costs 2 `/authApp`
    /// POSTs when the second one carries `X-POWERJOB-AUTH-PASSED: true`, and 4 when it does not (§4.5).
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        let Some(first) = config.addresses.first().cloned() else {
            return Err(ClientError::NoServer);
        };
        let mut client = Client510 {
            config,
            current_address: first,
            auth: None,
            app_id: 0,
            exchanges: Vec::new(),
            log: Vec::new(),
        };
        let auth_app = client.auth_app_payload();
        let body = client.request(AUTH_APP, &auth_app).await?;
        client.app_id = app_id_from_constructor_body(&body)?;
        Ok(client)
    }

    /// The appId the constructor parsed; it goes into every form.
    pub fn app_id(&self) -> i64 {
        self.app_id
    }

    /// `runJob(jobId, instanceParams, delayMS)`.
    pub async fn run_job(
        &mut self,
        job_id: i64,
        instance_params: &str,
        delay_ms: i64,
    ) -> Result<ResultDto, ClientError> {
        // HashMap order of the keys (see `form_payload`): jobId, delay, appId, instanceParams.
        let mut fields = vec![
            ("jobId", job_id.to_string()),
            ("delay", delay_ms.to_string()),
            ("appId", self.app_id.to_string()),
        ];
        if !instance_params.is_empty() {
            fields.push(("instanceParams", instance_params.to_owned()));
        }
        self.call(RUN_JOB, &fields).await
    }

    /// `runWorkflow(workflowId, initParams, delayMS)`.
    pub async fn run_workflow(
        &mut self,
        workflow_id: i64,
        init_params: &str,
        delay_ms: i64,
    ) -> Result<ResultDto, ClientError> {
        // HashMap order: `delay` and `initParams` share bucket 3 (delay inserted first), appId 7, workflowId 14.
        let mut fields = vec![("delay", delay_ms.to_string())];
        if !init_params.is_empty() {
            fields.push(("initParams", init_params.to_owned()));
        }
        fields.push(("appId", self.app_id.to_string()));
        fields.push(("workflowId", workflow_id.to_string()));
        self.call(RUN_WORKFLOW, &fields).await
    }

    /// `fetchInstanceStatus(instanceId)`; unlike 4.x, the 5.1.0 client also sends `appId`.
    pub async fn fetch_instance_status(
        &mut self,
        instance_id: i64,
    ) -> Result<ResultDto, ClientError> {
        let fields = [
            ("instanceId", instance_id.to_string()),
            ("appId", self.app_id.to_string()),
        ];
        self.call(FETCH_INSTANCE_STATUS, &fields).await
    }

    /// Every HTTP exchange attempted so far, in order, failed ones included.
    pub fn exchanges(&self) -> &[Exchange] {
        &self.exchanges
    }

    /// The client's log lines worth asserting on (§8.7), verbatim.
    pub fn log(&self) -> &[String] {
        &self.log
    }

    /// The address the next request goes to first: the last one that answered.
    pub fn current_address(&self) -> &str {
        &self.current_address
    }

    /// A business call: form body through `request`, then the body parsed as `ResultDTO` (never raising on
    /// `success=false`, which the Java client hands to the caller as is).
    async fn call(
        &mut self,
        path: &str,
        fields: &[(&str, String)],
    ) -> Result<ResultDto, ClientError> {
        let body = self.request(path, &form_payload(fields)).await?;
        parse_result(&body)
    }

    /// `AppAuthClusterRequestService.request`: the path that sends a call twice when the auth header is missing.
    async fn request(&mut self, path: &str, payload: &Payload) -> Result<Vec<u8>, ClientError> {
        if self.auth.is_none() {
            self.refresh().await?;
        }
        let first = self.do_request(path, payload).await?;
        let auth_status = exact_header(&first.headers, AUTH_PASSED);
        if auth_status.is_some_and(|value| value.eq_ignore_ascii_case("true")) {
            return Ok(first.body);
        }
        self.note(format!(
            "[PowerJobClient] auth failed[authStatus: {}], try to refresh the auth info",
            auth_status.unwrap_or("null")
        ));
        self.refresh().await?;
        // The second answer is returned whatever it says: no header check, no third attempt.
        Ok(self.do_request(path, payload).await?.body)
    }

    /// `doRequest`: the call with the stored credentials; any status but 200 is fatal, with no retry.
    async fn do_request(&mut self, path: &str, payload: &Payload) -> Result<Response, ClientError> {
        let auth = self.auth.clone();
        let response = self.send(path, payload, auth.as_ref()).await?;
        if response.status != 200 {
            return Err(ClientError::RemoteServer);
        }
        Ok(response)
    }

    /// `refreshAppAuthResult`: a fresh `/authApp` without credentials; stores the new appId and token.
    async fn refresh(&mut self) -> Result<(), ClientError> {
        let auth_app = self.auth_app_payload();
        let response = self.send(AUTH_APP, &auth_app, None).await?;
        if response.status != 200 {
            return Err(ClientError::AuthApp);
        }
        let result = parse_result(&response.body)?;
        if !result.success {
            let message = result.message.unwrap_or_else(|| "null".to_owned());
            return Err(ClientError::AuthFailed(message));
        }
        let auth = app_auth_from_data(&result.data)?;
        self.note("[PowerJobClient] refresh auth info successfully!".to_owned());
        self.auth = Some(auth);
        Ok(())
    }

    /// `clusterHaRequest`: the current address first; only a transport error or timeout moves on to the others.
    ///
    /// A timeout counts as a failure even if the server already committed the request, so a slow `runJob` is
    /// run again on the next address: faithful, because that is one of the duplicate sources being guarded.
    async fn send(
        &mut self,
        path: &str,
        payload: &Payload,
        auth: Option<&AppAuth>,
    ) -> Result<Response, ClientError> {
        let current = self.current_address.clone();
        if let Ok(response) = self.attempt(&current, path, payload, auth).await {
            return Ok(response);
        }
        let others: Vec<String> = self
            .config
            .addresses
            .iter()
            .filter(|address| **address != current)
            .cloned()
            .collect();
        for address in others {
            if let Ok(response) = self.attempt(&address, path, payload, auth).await {
                self.note(format!(
                    "[ClusterRequestService] server change: from({current}) -> to({address})."
                ));
                self.current_address = address;
                return Ok(response);
            }
        }
        tracing::error!(
            path,
            addresses = ?self.config.addresses,
            "[ClusterRequestService] no server available"
        );
        Err(ClientError::NoServer)
    }

    /// One HTTP exchange with one address under the whole-call timeout, recorded in `exchanges`.
    async fn attempt(
        &mut self,
        address: &str,
        path: &str,
        payload: &Payload,
        auth: Option<&AppAuth>,
    ) -> Result<Response, String> {
        // Java would throw `IllegalArgumentException` for an unparsable URL without failing over; treating it as
        // a transport error instead keeps one bad entry from hiding the healthy addresses behind it.
        let target = Target::parse(address);
        let request_path = match &target {
            Ok(target) => format!("{}{WEB_PATH}{path}", target.prefix),
            Err(_) => format!("{WEB_PATH}{path}"),
        };
        let outcome = match target {
            Ok(target) => {
                // Every failure of the exchange is what OkHttp reports as an `IOException` (the whole-call
                // timeout included), so the caller fails over on any `Err`.
                let request = render_request(&target, &request_path, payload, auth);
                let peer = (target.host.as_str(), target.port);
                rawhttp::exchange(peer, &request, self.config.timeout)
                    .await
                    .map_err(|error| error.to_string())
            }
            Err(error) => Err(error),
        };
        let record = match &outcome {
            Ok(response) => Exchange {
                address: address.to_owned(),
                path: request_path,
                status: Some(response.status),
                auth_passed_exact: exact_header(&response.headers, AUTH_PASSED).map(str::to_owned),
                error: None,
            },
            Err(error) => {
                tracing::warn!(address, path = %request_path, %error, "[ClusterRequestService] request failed");
                Exchange {
                    address: address.to_owned(),
                    path: request_path,
                    status: None,
                    auth_passed_exact: None,
                    error: Some(error.clone()),
                }
            }
        };
        self.exchanges.push(record);
        outcome
    }

    /// The `/authApp` JSON body: `DigestUtils.md5` gives `null` (so no field) for an empty password.
    fn auth_app_payload(&self) -> Payload {
        let password = &self.config.password;
        let body = AuthAppBody {
            app_name: &self.config.app_name,
            encrypted_password: (!password.is_empty()).then(|| md5_hex(password)),
            encrypt_type: "md5",
        };
        Payload {
            content_type: JSON_MEDIA_TYPE,
            // Serialising a struct of strings cannot fail.
            bytes: serde_json::to_vec(&body).unwrap_or_default(),
        }
    }

    /// Records a client log line and emits it, at WARN like the Java client.
    fn note(&mut self, line: String) {
        tracing::warn!("{line}");
        self.log.push(line);
    }
}

/// The constructor's reading of its `/authApp` body: an empty body leaves appId null, which the Java client
/// reports as a config error; `success=false` throws the bare message.
fn app_id_from_constructor_body(body: &[u8]) -> Result<i64, ClientError> {
    const APP_ID_NULL: &str = "appId is null, please check your config";
    if body.is_empty() {
        return Err(ClientError::BadBody(APP_ID_NULL.to_owned()));
    }
    let result = parse_result(body)?;
    if !result.success {
        let message = result.message.unwrap_or_else(|| "null".to_owned());
        return Err(ClientError::Rejected(message));
    }
    result
        .data
        .get("appId")
        .and_then(json_i64)
        .ok_or_else(|| ClientError::BadBody(APP_ID_NULL.to_owned()))
}

/// `AppAuthResult{appId, token}` from `data`. The token becomes a header value, so it must be one OkHttp
/// would accept (`Headers.checkValue`); anything else could never have been sent.
fn app_auth_from_data(data: &Value) -> Result<AppAuth, ClientError> {
    let app_id = data
        .get("appId")
        .and_then(json_i64)
        .ok_or_else(|| ClientError::BadBody("authApp data has no appId".to_owned()))?;
    let token = data
        .get("token")
        .and_then(Value::as_str)
        .ok_or_else(|| ClientError::BadBody("authApp data has no token".to_owned()))?;
    if token
        .chars()
        .any(|c| (c < ' ' && c != '\t') || c >= '\u{7f}')
    {
        return Err(ClientError::BadBody(
            "authApp token is not a valid header value".to_owned(),
        ));
    }
    Ok(AppAuth {
        app_id,
        token: token.to_owned(),
    })
}

/// A body parsed as `ResultDTO`; fastjson yields `null` for an empty body, which callers cannot use.
fn parse_result(body: &[u8]) -> Result<ResultDto, ClientError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ClientError::BadBody("empty body".to_owned()));
    }
    serde_json::from_slice(body).map_err(|error| ClientError::BadBody(error.to_string()))
}

/// An int64 from a JSON number or numeric string (fastjson converts both into `Long`).
fn json_i64(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// `DigestUtils.md5`: 32 lowercase hex digits.
fn md5_hex(text: &str) -> String {
    Md5::digest(text.as_bytes())
        .iter()
        .fold(String::with_capacity(32), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

/// A form body as OkHttp 3.14 `FormBody` writes it, fields in the order given.
///
/// The 5.1.0 client collects fields in a `HashMap<String, String>` (16 buckets), so callers pass them in
/// bucket order of `(h ^ h >>> 16) & 15` over Java's `String.hashCode`, ties in insertion order.
fn form_payload(fields: &[(&str, String)]) -> Payload {
    let body = fields
        .iter()
        .map(|(name, value)| format!("{}={}", form_encode(name), form_encode(value)))
        .collect::<Vec<_>>()
        .join("&");
    Payload {
        content_type: FORM_MEDIA_TYPE,
        bytes: body.into_bytes(),
    }
}

/// OkHttp `HttpUrl.canonicalize(s, FORM_ENCODE_SET, alreadyEncoded=false, strict=false, plusIsSpace=true,
/// asciiOnly=true)`: controls, DEL, non-ASCII (as UTF-8), `%`, `+` and the form encode set become `%XX`.
fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &byte in text.as_bytes() {
        let encode = !(0x20..0x7f).contains(&byte)
            || byte == b'%'
            || byte == b'+'
            || FORM_ENCODE_SET.contains(&byte);
        if encode {
            let _ = write!(out, "%{byte:02X}");
        } else {
            out.push(char::from(byte));
        }
    }
    out
}

/// OkHttp's lookup as the 5.1.0 client does it: the value found under `name` spelled *exactly* so.
///
/// `ClusterRequestServiceOkHttp3Impl` copies `Headers.names()` (a case-insensitive `TreeSet` that keeps the
/// first spelling seen) into a `HashMap` with `Headers.get(name)` (the last value, matched ignoring case), then
/// does `map.get("X-POWERJOB-AUTH-PASSED")`. So only the first spelling of the name counts, and the value is
/// the last one of any spelling.
fn exact_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let (first_spelling, _) = headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))?;
    if first_spelling != name {
        return None;
    }
    headers
        .iter()
        .rev()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

/// Where an address points: the TCP peer, the `Host` header and the path prefix.
#[derive(Debug)]
struct Target {
    host: String,
    port: u16,
    host_header: String,
    prefix: String,
}

impl Target {
    /// Splits `host[:port][/prefix]` the way the URL `http://{address}/openApi/...` would be read.
    fn parse(address: &str) -> Result<Target, String> {
        let invalid = || format!("invalid address: {address:?}");
        let (authority, prefix) = match address.find('/') {
            Some(at) => address.split_at(at),
            None => (address, ""),
        };
        let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(invalid)?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid());
        }
        let port = match port {
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(invalid)?,
            None => 80,
        };
        if prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid());
        }
        // OkHttp's `Util.hostHeader`: brackets for IPv6, the port only when it is not the scheme default.
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let host_header = if port == 80 {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        Ok(Target {
            host: host.to_owned(),
            port,
            host_header,
            prefix: prefix.to_owned(),
        })
    }
}

/// The request bytes in OkHttp's header order: the application's headers (here the auth pair, in `HashMap`
/// order: ACCESS-TOKEN before APP-ID), then what `BridgeInterceptor` adds.
fn render_request(
    target: &Target,
    path: &str,
    payload: &Payload,
    auth: Option<&AppAuth>,
) -> Vec<u8> {
    let mut head = format!("POST {path} HTTP/1.1\r\n");
    if let Some(auth) = auth {
        let _ = write!(head, "{ACCESS_TOKEN}: {}\r\n", auth.token);
        let _ = write!(head, "{APP_ID}: {}\r\n", auth.app_id);
    }
    let _ = write!(
        head,
        "Content-Type: {}\r\nContent-Length: {}\r\nHost: {}\r\nConnection: Keep-Alive\r\nUser-Agent: {USER_AGENT}\r\n\r\n",
        payload.content_type,
        payload.bytes.len(),
        target.host_header,
    );
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&payload.bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// Upper bound for any single test.
    const TEST_LIMIT: Duration = Duration::from_secs(10);

    /// A request as the fake server received it.
    #[derive(Clone, Debug)]
    struct Seen {
        path: String,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }
    }

    type Log = Arc<Mutex<Vec<Seen>>>;

    /// A raw-TCP fake server: one request per connection; `respond` returns the response bytes, or `None` to
    /// accept and never answer.
    async fn fake_server<F>(respond: F) -> (String, Log)
    where
        F: Fn(&Seen, usize) -> Option<Vec<u8>> + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let seen: Log = Arc::default();
        let respond = Arc::new(respond);
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (respond, log) = (respond.clone(), log.clone());
                tokio::spawn(async move {
                    let Ok(Ok(Some(request))) =
                        tokio::time::timeout(TEST_LIMIT, rawhttp::read_request(&mut stream)).await
                    else {
                        return;
                    };
                    let request = Seen {
                        path: request.target,
                        headers: request.headers,
                        body: String::from_utf8_lossy(&request.body).into_owned(),
                    };
                    let index = {
                        let mut log = log.lock().unwrap();
                        log.push(request.clone());
                        log.len() - 1
                    };
                    match respond(&request, index) {
                        Some(bytes) => {
                            let _ = stream.write_all(&bytes).await;
                            let _ = stream.shutdown().await;
                        }
                        None => tokio::time::sleep(TEST_LIMIT).await,
                    }
                });
            }
        });
        (address, seen)
    }

    /// A 200 JSON response with an optional extra header line (e.g. `X-POWERJOB-AUTH-PASSED: true`).
    fn ok_json(extra_header: Option<&str>, body: &str) -> Vec<u8> {
        let extra = extra_header.map(|h| format!("{h}\r\n")).unwrap_or_default();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn auth_body(index: usize) -> String {
        format!(
            r#"{{"success":true,"data":{{"appId":1,"token":"T{index}","extra":null}},"message":null,"code":null}}"#
        )
    }

    const INSTANCE: &str =
        r#"{"success":true,"data":754612332134400064,"message":null,"code":null}"#;

    /// A server that answers `/authApp` with a token and everything else with an instance id, putting
    /// `header` (if any) on every response.
    async fn server_with_header(header: Option<&'static str>) -> (String, Log) {
        fake_server(move |seen, index| {
            let body = if seen.path.ends_with("/authApp") {
                auth_body(index)
            } else {
                INSTANCE.to_owned()
            };
            Some(ok_json(header, &body))
        })
        .await
    }

    fn count(log: &Log, path: &str) -> usize {
        log.lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .count()
    }

    async fn limited<F: std::future::Future>(future: F) -> F::Output {
        tokio::time::timeout(TEST_LIMIT, future)
            .await
            .expect("test timed out")
    }

    #[test]
    fn form_encoding_matches_okhttp_form_body() {
        assert_eq!(form_encode(r#"{"k":"v w"}"#), "%7B%22k%22%3A%22v%20w%22%7D");
        assert_eq!(form_encode("a+b=c&d/e?f,g"), "a%2Bb%3Dc%26d%2Fe%3Ff%2Cg");
        assert_eq!(form_encode("100%-._*"), "100%25-._*");
        assert_eq!(form_encode("é"), "%C3%A9");
        let payload = form_payload(&[
            ("jobId", "5".into()),
            ("instanceParams", r#"{"k":"v w"}"#.into()),
        ]);
        assert_eq!(
            payload.bytes,
            b"jobId=5&instanceParams=%7B%22k%22%3A%22v%20w%22%7D"
        );
    }

    #[test]
    fn exact_header_lookup_is_case_sensitive_like_the_java_hash_map() {
        let headers = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let exact = headers(&[(AUTH_PASSED, "TRUE")]);
        assert_eq!(exact_header(&exact, AUTH_PASSED), Some("TRUE"));
        let lower = headers(&[("x-powerjob-auth-passed", "true")]);
        assert_eq!(exact_header(&lower, AUTH_PASSED), None);
        // The first spelling names the map key; the value is the last one of any spelling.
        let mixed = headers(&[(AUTH_PASSED, "false"), ("x-powerjob-auth-passed", "true")]);
        assert_eq!(exact_header(&mixed, AUTH_PASSED), Some("true"));
        let mixed = headers(&[("x-powerjob-auth-passed", "true"), (AUTH_PASSED, "true")]);
        assert_eq!(exact_header(&mixed, AUTH_PASSED), None);
    }

    #[test]
    fn addresses_parse_into_peer_host_header_and_prefix() {
        let target = Target::parse("127.0.0.1:7700/pj").unwrap();
        assert_eq!((target.host.as_str(), target.port), ("127.0.0.1", 7700));
        assert_eq!(
            (target.host_header.as_str(), target.prefix.as_str()),
            ("127.0.0.1:7700", "/pj")
        );
        let target = Target::parse("[::1]:80").unwrap();
        assert_eq!(
            (target.host.as_str(), target.host_header.as_str()),
            ("::1", "[::1]")
        );
        assert_eq!(Target::parse("powerjob.example").unwrap().port, 80);
        assert!(Target::parse("host:notaport").is_err());
        assert!(Target::parse("").is_err());
    }

    #[test]
    fn auth_app_body_is_jackson_non_null_in_field_order() {
        let client = |password: &str| Client510 {
            config: ClientConfig::new(vec!["127.0.0.1:1".into()], "my-app", password),
            current_address: String::new(),
            auth: None,
            app_id: 0,
            exchanges: Vec::new(),
            log: Vec::new(),
        };
        let payload = client("123").auth_app_payload();
        assert_eq!(payload.content_type, "application/json; charset=utf-8");
        assert_eq!(
            String::from_utf8(payload.bytes).unwrap(),
            r#"{"appName":"my-app","encryptedPassword":"202cb962ac59075b964b07152d234b70","encryptType":"md5"}"#
        );
        let payload = client("").auth_app_payload();
        assert_eq!(
            payload.bytes,
            br#"{"appName":"my-app","encryptType":"md5"}"#
        );
    }

    #[tokio::test]
    async fn exact_case_auth_passed_true_sends_run_job_once() {
        let (address, seen) = server_with_header(Some("X-POWERJOB-AUTH-PASSED: true")).await;
        let mut client = limited(Client510::connect(ClientConfig::new(
            vec![address],
            "my-app",
            "123",
        )))
        .await
        .unwrap();
        assert_eq!(client.app_id(), 1);
        let result = limited(client.run_job(5, "", 0)).await.unwrap();
        assert_eq!(result.data_i64(), Some(754_612_332_134_400_064));

        assert_eq!(count(&seen, "/openApi/authApp"), 2);
        assert_eq!(count(&seen, "/openApi/runJob"), 1);
        let run = seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(run.body, "jobId=5&delay=0&appId=1");
        assert_eq!(run.header(APP_ID), Some("1"));
        assert_eq!(run.header(ACCESS_TOKEN), Some("T0"));
        assert_eq!(run.header("User-Agent"), Some("okhttp/3.14.9"));
        assert_eq!(
            run.header("Content-Type"),
            Some("application/x-www-form-urlencoded")
        );
        assert!(client
            .log()
            .iter()
            .all(|line| !line.contains("auth failed")));
        assert_eq!(client.exchanges().len(), 3);
    }

    async fn assert_run_job_is_sent_twice(header: Option<&'static str>) {
        let (address, seen) = server_with_header(header).await;
        let mut client = limited(Client510::connect(ClientConfig::new(
            vec![address],
            "my-app",
            "123",
        )))
        .await
        .unwrap();
        // Constructor: refresh, send (no header found), refresh, send again.
        assert_eq!(count(&seen, "/openApi/authApp"), 4);
        let result = limited(client.run_job(5, r#"{"k":"v w"}"#, 0))
            .await
            .unwrap();
        assert!(result.success);

        assert_eq!(count(&seen, "/openApi/runJob"), 2);
        assert_eq!(count(&seen, "/openApi/authApp"), 5);
        let requests = seen.lock().unwrap().clone();
        let paths: Vec<&str> = requests[4..].iter().map(|s| s.path.as_str()).collect();
        assert_eq!(
            paths,
            ["/openApi/runJob", "/openApi/authApp", "/openApi/runJob"]
        );
        let (first, second) = (&requests[4], &requests[6]);
        assert_eq!(first.body, second.body);
        assert_eq!(
            first.body,
            "jobId=5&delay=0&appId=1&instanceParams=%7B%22k%22%3A%22v%20w%22%7D"
        );
        assert_ne!(first.header(ACCESS_TOKEN), second.header(ACCESS_TOKEN));
        assert_eq!(second.header(ACCESS_TOKEN), Some("T5"));
        assert!(
            requests[5].header(ACCESS_TOKEN).is_none(),
            "refresh carries no credentials"
        );

        let failed = "[PowerJobClient] auth failed[authStatus: null], try to refresh the auth info";
        assert_eq!(
            client.log().iter().filter(|line| *line == failed).count(),
            2
        );
        let refreshed = "[PowerJobClient] refresh auth info successfully!";
        assert_eq!(
            client
                .log()
                .iter()
                .filter(|line| *line == refreshed)
                .count(),
            3
        );
    }

    #[tokio::test]
    async fn lower_case_auth_passed_header_is_not_found_and_run_job_is_resent() {
        assert_run_job_is_sent_twice(Some("x-powerjob-auth-passed: true")).await;
    }

    #[tokio::test]
    async fn absent_auth_passed_header_resends_run_job() {
        assert_run_job_is_sent_twice(None).await;
    }

    #[tokio::test]
    async fn auth_passed_false_is_logged_with_its_value() {
        let (address, _seen) = server_with_header(Some("X-POWERJOB-AUTH-PASSED: false")).await;
        let client = limited(Client510::connect(ClientConfig::new(
            vec![address],
            "my-app",
            "123",
        )))
        .await
        .unwrap();
        assert_eq!(
            client.log()[1],
            "[PowerJobClient] auth failed[authStatus: false], try to refresh the auth info"
        );
        assert_eq!(
            client.exchanges()[1].auth_passed_exact.as_deref(),
            Some("false")
        );
    }

    #[tokio::test]
    async fn silent_first_address_times_out_and_fails_over() {
        let (silent, silent_seen) = fake_server(|_, _| None).await;
        let (live, _) = server_with_header(Some("X-POWERJOB-AUTH-PASSED: true")).await;
        let mut config = ClientConfig::new(vec![silent.clone(), live.clone()], "my-app", "123");
        config.timeout = Duration::from_millis(200);
        let mut client = limited(Client510::connect(config)).await.unwrap();

        assert_eq!(client.current_address(), live);
        let change =
            format!("[ClusterRequestService] server change: from({silent}) -> to({live}).");
        assert_eq!(client.log()[0], change);
        let first = &client.exchanges()[0];
        assert_eq!(
            (first.address.as_str(), first.status),
            (silent.as_str(), None)
        );
        assert!(first.error.as_deref().unwrap().contains("timeout"));
        // The silent server did receive the request: a timeout does not mean "not executed".
        assert_eq!(count(&silent_seen, "/openApi/authApp"), 1);

        // The live address is now sticky.
        limited(client.run_job(5, "", 0)).await.unwrap();
        assert_eq!(client.exchanges().last().unwrap().address, live);
        assert_eq!(count(&silent_seen, "/openApi/runJob"), 0);
    }

    #[tokio::test]
    async fn no_reachable_address_is_no_server() {
        let closed = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap().to_string()
        };
        let error = limited(Client510::connect(ClientConfig::new(
            vec![closed],
            "a",
            "p",
        )))
        .await
        .err()
        .unwrap();
        assert_eq!(
            error.to_string(),
            "no server available when send post request"
        );
    }

    #[tokio::test]
    async fn chunked_bodies_decode() {
        let (address, _seen) = fake_server(|seen, index| {
            let body = if seen.path.ends_with("/authApp") {
                auth_body(index)
            } else {
                INSTANCE.to_owned()
            };
            let (a, b) = body.split_at(10);
            let chunked = format!(
                "HTTP/1.1 200 OK\r\nX-POWERJOB-AUTH-PASSED: true\r\nTransfer-Encoding: chunked\r\n\r\n\
                 {:x};ext=1\r\n{a}\r\n{:X}\r\n{b}\r\n0\r\nX-Trailer: x\r\n\r\n",
                a.len(),
                b.len()
            );
            Some(chunked.into_bytes())
        })
        .await;
        let mut client = limited(Client510::connect(ClientConfig::new(
            vec![address],
            "my-app",
            "123",
        )))
        .await
        .unwrap();
        let result = limited(client.run_job(5, "", 0)).await.unwrap();
        assert_eq!(result.data_i64(), Some(754_612_332_134_400_064));
    }

    #[tokio::test]
    async fn interim_response_and_body_until_close_are_handled() {
        let (address, _seen) = fake_server(|seen, index| {
            let body = if seen.path.ends_with("/authApp") {
                auth_body(index)
            } else {
                INSTANCE.to_owned()
            };
            let raw = format!(
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-POWERJOB-AUTH-PASSED: true\r\nConnection: close\r\n\r\n{body}"
            );
            Some(raw.into_bytes())
        })
        .await;
        let mut client = limited(Client510::connect(ClientConfig::new(
            vec![address],
            "my-app",
            "123",
        )))
        .await
        .unwrap();
        let result = limited(client.fetch_instance_status(754_612_332_134_400_064))
            .await
            .unwrap();
        assert!(result.success);
    }

    #[tokio::test]
    async fn auth_errors_and_non_200_map_to_the_java_messages() {
        let (address, _) = fake_server(|_, _| {
            Some(ok_json(
                None,
                r#"{"success":false,"data":null,"message":"INCORRECT_PASSWORD","code":"-400"}"#,
            ))
        })
        .await;
        let error = limited(Client510::connect(ClientConfig::new(
            vec![address],
            "a",
            "p",
        )))
        .await
        .err()
        .unwrap();
        assert_eq!(error.to_string(), "AUTH_FAILED_INCORRECT_PASSWORD");

        let (address, _) = fake_server(|_, _| {
            Some(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec())
        })
        .await;
        let error = limited(Client510::connect(ClientConfig::new(
            vec![address],
            "a",
            "p",
        )))
        .await
        .err()
        .unwrap();
        assert_eq!(error.to_string(), "AUTH_APP_EXCEPTION!");

        let (address, _) = fake_server(|seen, index| {
            Some(if seen.path.ends_with("/authApp") {
                ok_json(Some("X-POWERJOB-AUTH-PASSED: true"), &auth_body(index))
            } else {
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\n{}".to_vec()
            })
        })
        .await;
        let mut client = limited(Client510::connect(ClientConfig::new(
            vec![address],
            "a",
            "p",
        )))
        .await
        .unwrap();
        let error = limited(client.run_workflow(7, "x", 0)).await.err().unwrap();
        assert_eq!(error.to_string(), "REMOTE_SERVER_INNER_EXCEPTION");
        assert_eq!(client.exchanges().last().unwrap().status, Some(500));
    }
}
