//! The engine's rules without sockets: a real memory store, a stand-in server behind the [`Exchange`] seam, and
//! paused time. The same rules run against real processes in `tests/` (at_most_once, resolve, engine); here
//! each decision is seen on its own, and time moves only when the test says.

use std::collections::HashMap;
use std::sync::Mutex;

use http::Method;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use super::*;
use crate::store::memory::MemoryStore;

const FORM: &str = "jobId=5&appId=1&delay=0&instanceParams=p";

/// How the stand-in answers a `runJob`.
#[derive(Clone, Copy)]
enum Reply {
    /// Creates the instance and answers after this long.
    Created(Duration),
    /// Creates the instance and never answers.
    CreatedSilent,
    /// Creates the instance and answers HTTP 500.
    CreatedThen500,
    /// Never reached the server: nothing created.
    NotSent,
}

/// A PowerJob server in memory: `runJob` creates an instance (with a snowflake id of the wall clock) and
/// answers as `reply` says; `queryInstance` pages them as 5.1.1 does.
struct Stand {
    reply: Mutex<Reply>,
    /// The endpoints called, in order.
    calls: Mutex<Vec<String>>,
    /// Instances created: `(id, instanceParams, expectedTriggerTime)`.
    instances: Mutex<Vec<(i64, String, i64)>>,
    timeout: Duration,
}

impl Stand {
    fn new(reply: Reply, timeout: Duration) -> Arc<Stand> {
        Arc::new(Stand {
            reply: Mutex::new(reply),
            calls: Mutex::default(),
            instances: Mutex::default(),
            timeout,
        })
    }

    fn called(&self, endpoint: &str) -> usize {
        let calls = self.calls.lock().unwrap();
        calls.iter().filter(|c| *c == endpoint).count()
    }

    fn create(&self, form: &[u8]) -> i64 {
        let fields: HashMap<String, String> = form_urlencoded::parse(form).into_owned().collect();
        let now = wall_ms();
        let mut instances = self.instances.lock().unwrap();
        let id = resolve::id_floor(now) | instances.len() as i64;
        let params = fields.get("instanceParams").cloned().unwrap_or_default();
        instances.push((id, params, now));
        id
    }

    fn page(&self) -> String {
        let instances = self.instances.lock().unwrap();
        let data: Vec<Value> = instances
            .iter()
            .map(|(id, params, trigger)| {
                json!({"instanceId": id, "appId": 1, "jobId": 5, "instanceParams": params,
                       "expectedTriggerTime": trigger})
            })
            .collect();
        json!({"success": true, "data": {"index": 0, "pageSize": 100, "totalPages": 1,
               "totalItems": data.len(), "data": data}})
        .to_string()
    }
}

fn answer(status: u16, body: String) -> Exchanged {
    let mut parts = Response::new(()).into_parts().0;
    parts.status = http::StatusCode::from_u16(status).unwrap();
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Exchanged {
        parts,
        body: Bytes::from(body),
        head: None,
    }
}

impl Exchange for Stand {
    fn exchange(
        &self,
        request: Request<Bytes>,
        _arm: Arm,
        _limit: usize,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Exchanged, ProxyError>> + Send + '_>> {
        let endpoint = request.uri().path().rsplit('/').next().unwrap_or("");
        self.calls.lock().unwrap().push(endpoint.to_string());
        let reply = *self.reply.lock().unwrap();
        let created = |stand: &Stand| stand.create(request.body());
        let outcome = match endpoint {
            "queryInstance" => Ok((Duration::ZERO, 200, self.page())),
            _ => match reply {
                Reply::NotSent => Err(ProxyError::Unreachable {
                    upstream: self.current(),
                    cause: "connection refused".into(),
                }),
                Reply::Created(after) => {
                    let id = created(self);
                    Ok((
                        after,
                        200,
                        format!(r#"{{"success":true,"data":{id},"message":null}}"#),
                    ))
                }
                Reply::CreatedThen500 => {
                    created(self);
                    Ok((Duration::ZERO, 500, r#"{"status":500}"#.to_string()))
                }
                Reply::CreatedSilent => {
                    created(self);
                    Ok((Duration::MAX, 0, String::new()))
                }
            },
        };
        Box::pin(async move {
            let (after, status, body) = outcome?;
            if after == Duration::MAX {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(after).await;
            Ok(answer(status, body))
        })
    }

    fn response_timeout(&self) -> Duration {
        self.timeout
    }

    fn current(&self) -> String {
        "http://stand:7700".into()
    }
}

/// The engine on a fresh memory store in front of `stand`, with `settings`.
fn engine(settings: &Settings, stand: &Arc<Stand>) -> Arc<Guard> {
    let store = AnyStore::Memory(Arc::new(MemoryStore::new(1000, settings.wait_timeout.0)));
    let upstream: Arc<dyn Exchange> = stand.clone();
    Arc::new(Guard::new(settings, store, upstream))
}

fn settings() -> Settings {
    let mut settings = Settings::default();
    settings.upstream_timeout.0 = Duration::from_secs(2);
    settings.wait_timeout.0 = Duration::from_secs(5);
    settings.resolve_after.0 = Duration::from_secs(15);
    settings.quarantine.0 = false;
    settings
}

/// One guarded `runJob` from the client at `127.0.0.1:port`: its status and JSON body.
async fn run_job(guard: &Arc<Guard>, port: u16) -> (u16, Value) {
    let route = guard
        .route(&Method::POST, "runJob")
        .expect("runJob is guarded");
    let mut parts = Request::new(()).into_parts().0;
    parts.method = Method::POST;
    parts.uri = "/openApi/runJob".parse().unwrap();
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    let client = SocketAddr::from(([127, 0, 0, 1], port));
    let body = Bytes::from_static(FORM.as_bytes());
    match guard.handle(route, parts, body, client, false, None).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
        }
        Err(err) => (err.status().as_u16(), json!({"code": err.code()})),
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_duplicates_share_one_call() {
    let stand = Stand::new(
        Reply::Created(Duration::from_millis(500)),
        Duration::from_secs(2),
    );
    let guard = engine(&settings(), &stand);
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let guard = Arc::clone(&guard);
            tokio::spawn(async move { run_job(&guard, 40_000 + i).await })
        })
        .collect();
    let mut ids = Vec::new();
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, 200, "{body}");
        ids.push(body["data"].as_i64().unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one instance for all: {ids:?}");
    assert_eq!(stand.called("runJob"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_call_that_never_left_is_released_and_the_retry_runs_once() {
    let stand = Stand::new(Reply::NotSent, Duration::from_secs(2));
    let guard = engine(&settings(), &stand);
    let (status, body) = run_job(&guard, 40_001).await;
    assert_eq!(status, 502, "{body}");
    *stand.reply.lock().unwrap() = Reply::Created(Duration::ZERO);
    let (status, body) = run_job(&guard, 40_001).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(stand.instances.lock().unwrap().len(), 1);
    assert_eq!(
        stand.called("runJob"),
        2,
        "the second one was the only one sent"
    );
}

/// A call that timed out after the server created its instance (or got a 5xx) is never sent again; its
/// duplicates get 409 until `resolve_after`, when PowerJob's lookup settles the key with that instance.
async fn unknown_then_resolved(reply: Reply, first_status: u16) {
    let stand = Stand::new(reply, Duration::from_secs(2));
    let guard = engine(&settings(), &stand);
    let (status, body) = run_job(&guard, 40_002).await;
    assert_eq!(status, first_status, "{body}");
    let (status, body) = run_job(&guard, 40_003).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "RUNONCE_OUTCOME_UNKNOWN");
    assert_eq!(stand.called("queryInstance"), 0, "not before resolve_after");
    // The leader asks by itself, resolve_after after the call turned unknown.
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(stand.called("queryInstance"), 1);
    let (status, body) = run_job(&guard, 40_004).await;
    assert_eq!(status, 200, "{body}");
    let created = stand.instances.lock().unwrap()[0].0;
    assert_eq!(body["data"].as_i64(), Some(created));
    assert_eq!(stand.called("runJob"), 1, "never sent again");
}

#[tokio::test(start_paused = true)]
async fn a_timeout_after_create_turns_unknown_then_resolves_to_its_instance() {
    unknown_then_resolved(Reply::CreatedSilent, 504).await;
}

#[tokio::test(start_paused = true)]
async fn a_5xx_after_create_turns_unknown_then_resolves_to_its_instance() {
    unknown_then_resolved(Reply::CreatedThen500, 500).await;
}

/// Sent and never created (the server dropped it): the lookup finds nothing, the key is released, and the
/// retry reaches the server once.
#[tokio::test(start_paused = true)]
async fn nothing_found_releases_the_key_for_one_more_call() {
    let stand = Stand::new(Reply::CreatedSilent, Duration::from_secs(2));
    let guard = engine(&settings(), &stand);
    assert_eq!(run_job(&guard, 40_005).await.0, 504);
    // The server lost it after all.
    stand.instances.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(16)).await;
    *stand.reply.lock().unwrap() = Reply::Created(Duration::ZERO);
    let (status, body) = run_job(&guard, 40_006).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(stand.called("runJob"), 2);
    assert_eq!(stand.instances.lock().unwrap().len(), 1);
}
