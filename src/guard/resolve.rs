//! When runonce cannot know, PowerJob decides: what an unknown `runJob` created, read from the server's own
//! database (POWERJOB.md §11, `POST /openApi/queryInstance`, 5.1.1 and later).
//!
//! A `runJob` whose outcome is unknown (a timeout, a 5xx, a hop's 504, an unfamiliar `success:false`) created
//! one instance or none. Its instance, if any, belongs to the call's app and job, has the call's
//! `instanceParams` (absent ≡ empty), an `expectedTriggerTime` of insert time + `delay`, and a snowflake id
//! whose top bits are the insert time, inside the leader's send window. runonce asks for the app's and job's
//! instances in that window (an id range: the table's index serves it), pages through them and matches:
//! - exactly one → the call created it: the key is done with `{"success":true,"data":<id>,"message":null}`;
//! - none → nothing was created (asked once the server can no longer create it: `resolve_after` after the
//!   call turned unknown): the key is released, and the next duplicate reaches the server, once;
//! - more than one (an identical call outside runonce, or one this key's window cannot tell apart) → it stays
//!   unknown.
//!
//! This module holds the pure parts: the lookup a call leaves on its record, the query, and the verdict on
//! the server's answer. The engine asks ([`crate::guard`]), one request at a time per key on every replica
//! (the store's turn, `Store::ask_turn`).

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// `SnowFlakeIdGenerator`'s epoch (2019-04-21, in ms): an id's top bits are milliseconds since it.
const SNOWFLAKE_EPOCH_MS: i64 = 1_555_776_000_000;
/// Bits below the timestamp in an instance id.
const SNOWFLAKE_TIME_SHIFT: u32 = 22;
/// How far runonce's clock and the servers' may disagree; the window is widened by this on each side.
pub const CLOCK_SKEW_MS: i64 = 5_000;
/// Instances read per page, and the most pages read: a job with more instances in one call's window is not
/// resolved (it stays unknown).
pub const PAGE_SIZE: u64 = 100;
pub const MAX_PAGES: u64 = 20;
/// How long one request may take to ask (every page): its turn's lease; a waiter on another replica tries
/// again after it, should the asker have died.
pub const ASK_LEASE: Duration = Duration::from_secs(10);

/// What a resolver needs to find a `runJob`'s instance: read from the call's own payload (a duplicate's is
/// its leader's), with the send window. Kept with an unknown record as JSON (for `POST /keys/{key}/resolve`),
/// so it holds no parameters, only their digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lookup {
    pub app: i64,
    pub job: i64,
    /// The SHA-256 of `instanceParams` as sent (absent ≡ empty), in hex.
    pub params_sha256: String,
    /// `delay` in ms as the server binds it (absent or empty ≡ 0; negative ≡ 0 for the trigger time).
    pub delay: i64,
    /// The path before `/openApi/` the call addressed the server with (`powerjob::served_prefix`).
    #[serde(default)]
    pub prefix: String,
    /// The leader's send window, wall clock ms: from just before sending to when the call ended.
    pub sent_from: i64,
    pub sent_to: i64,
}

/// The digest a lookup holds of `instanceParams`.
pub fn params_digest(params: &str) -> String {
    crate::store::hex(&Sha256::digest(params.as_bytes()))
}

impl Lookup {
    /// The lookup of a `runJob` call from its bound fields, or `None` when they do not name one app and job
    /// as numbers (then there is nothing to look up: the server refused the call before the insert).
    pub fn run_job(
        principal: &str,
        fields: &[(String, String)],
    ) -> Option<(i64, i64, String, i64)> {
        let field = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        // The instance is the job's app's: the form's `appId`, which the controller checks the job against;
        // the principal (the header's app) when the form names none.
        let app = field("appId").unwrap_or(principal).trim().parse().ok()?;
        let job = field("jobId")?.trim().parse().ok()?;
        let params = field("instanceParams").unwrap_or("").to_string();
        let delay = match field("delay").map(str::trim) {
            None | Some("") => 0,
            Some(text) => text.parse().ok()?,
        };
        Some((app, job, params, delay))
    }

    /// The `queryInstance` body for page `index` of the instances created between `sent_from` and `now_ms`
    /// (with the clock skew on each side): the app's and job's, in the id range of that time window.
    pub fn query(&self, now_ms: i64, index: u64) -> Value {
        json!({
            "appIdEq": self.app,
            "jobIdEq": self.job,
            "instanceIdGt": id_floor(self.sent_from - CLOCK_SKEW_MS) - 1,
            "instanceIdLt": id_floor(now_ms + CLOCK_SKEW_MS + 1),
            "index": index,
            "pageSize": PAGE_SIZE,
            "sortBy": "instanceId",
        })
    }

    /// Whether `instance` (an `InstanceInfoDTO`) can be this call's: same app, job and parameters, and
    /// triggered for a time this call could have asked for.
    pub fn matches(&self, instance: &Value, now_ms: i64) -> bool {
        let long = |name: &str| instance.get(name).and_then(Value::as_i64);
        let params = instance
            .get("instanceParams")
            .and_then(Value::as_str)
            .unwrap_or("");
        let Some(trigger) = long("expectedTriggerTime") else {
            return false;
        };
        let inserted = trigger - self.delay.max(0);
        long("appId") == Some(self.app)
            && long("jobId") == Some(self.job)
            && params_digest(params) == self.params_sha256
            && (self.sent_from - CLOCK_SKEW_MS..=now_ms + CLOCK_SKEW_MS).contains(&inserted)
    }
}

/// The smallest instance id created at wall clock `ms`.
pub fn id_floor(ms: i64) -> i64 {
    (ms - SNOWFLAKE_EPOCH_MS).max(0) << SNOWFLAKE_TIME_SHIFT
}

/// What one page of `queryInstance` said.
#[derive(Debug, PartialEq, Eq)]
pub enum Page {
    /// The matching instance ids on this page, and whether more pages follow.
    Found { ids: Vec<i64>, more: bool },
    /// `success:false`: the server cannot answer this query (a 5.1.0 server cannot bind its body), or
    /// refused it.
    Unsupported(String),
    /// Not a `PageResult` answer.
    Malformed,
}

/// Reads one page of the answer to [`Lookup::query`].
pub fn read_page(lookup: &Lookup, body: &[u8], index: u64, now_ms: i64) -> Page {
    let Ok(answer) = serde_json::from_slice::<Value>(body) else {
        return Page::Malformed;
    };
    match answer.get("success").and_then(Value::as_bool) {
        Some(true) => {}
        Some(false) => {
            let message = answer
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            return Page::Unsupported(message);
        }
        None => return Page::Malformed,
    }
    let Some(page) = answer.get("data") else {
        return Page::Malformed;
    };
    let Some(items) = page.get("data").and_then(Value::as_array) else {
        return Page::Malformed;
    };
    let total_pages = page.get("totalPages").and_then(Value::as_u64).unwrap_or(0);
    let ids = items
        .iter()
        .filter(|instance| lookup.matches(instance, now_ms))
        .filter_map(|instance| instance.get("instanceId").and_then(Value::as_i64))
        .collect();
    Page::Found {
        ids,
        more: index + 1 < total_pages,
    }
}

/// The answer a resolved call replays: what PowerJob would have answered, had the answer not been lost.
pub fn resolved_answer(id: i64) -> (bytes::Bytes, bytes::Bytes) {
    let body = format!(r#"{{"success":true,"data":{id},"message":null}}"#);
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{}: true\r\nX-Runonce-Resolved: true\r\nContent-Length: {}\r\n\r\n",
        crate::powerjob::AUTH_PASSED,
        body.len()
    );
    (bytes::Bytes::from(head), bytes::Bytes::from(body))
}

/// The instance ids this process's leaders received around a store's loss: a quarantine's lookup reaches
/// [`CLOCK_SKEW_MS`] past the loss, and an instance created there through runonce belongs to the key that
/// stored it, not to a forgotten call. Noted only from a loss to twice the skew after it: a handful of ids.
#[derive(Default)]
pub struct HandedOut(Mutex<(i64, HashSet<i64>)>);

/// Most ids noted after one loss; beyond, a quarantine's lookup does not trust itself (see [`HandedOut::complete`]).
const MAX_HANDED_OUT: usize = 100_000;

impl HandedOut {
    /// Notes the instance id in a leader's answer `body`, when the answer comes at `now_ms` within twice the
    /// skew after the loss at `lost_ms`.
    pub fn note(&self, lost_ms: i64, now_ms: i64, body: &[u8]) {
        if now_ms - lost_ms > 2 * CLOCK_SKEW_MS {
            return;
        }
        let Some(id) = instance_id(body) else {
            return;
        };
        let mut noted = self.lock();
        if noted.0 != lost_ms {
            *noted = (lost_ms, HashSet::new());
        }
        if noted.1.len() <= MAX_HANDED_OUT {
            noted.1.insert(id);
        }
    }

    /// Whether `id` went to a leader of this process after the loss at `lost_ms`.
    pub fn contains(&self, lost_ms: i64, id: i64) -> bool {
        let noted = self.lock();
        noted.0 == lost_ms && noted.1.contains(&id)
    }

    /// Whether every id handed out after the loss at `lost_ms` is noted (not over the bound).
    pub fn complete(&self, lost_ms: i64) -> bool {
        let noted = self.lock();
        noted.0 != lost_ms || noted.1.len() <= MAX_HANDED_OUT
    }

    fn lock(&self) -> MutexGuard<'_, (i64, HashSet<i64>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The `data` of a PowerJob answer when it is an instance id (`runJob`'s).
pub fn instance_id(body: &[u8]) -> Option<i64> {
    let value: Value = serde_json::from_slice(body).ok()?;
    (value.get("success")? == true).then_some(())?;
    value.get("data")?.as_i64()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_764_000_000_000;

    fn lookup() -> Lookup {
        Lookup {
            app: 1,
            job: 5,
            params_sha256: params_digest(r#"{"k":"v"}"#),
            prefix: String::new(),
            delay: 0,
            sent_from: T0,
            sent_to: T0 + 2_000,
        }
    }

    fn instance(id_ms: i64, params: Option<&str>, trigger: i64) -> Value {
        json!({"jobId": 5, "appId": 1, "instanceId": id_floor(id_ms) | 7, "instanceParams": params,
               "expectedTriggerTime": trigger})
    }

    #[test]
    fn ids_handed_out_around_a_loss_are_noted_and_nothing_else() {
        let noted = HandedOut::default();
        let answer = |id: i64| format!(r#"{{"success":true,"data":{id},"message":null}}"#);
        noted.note(T0, T0 + 100, answer(11).as_bytes());
        noted.note(T0, T0 + 2 * CLOCK_SKEW_MS + 1, answer(12).as_bytes());
        noted.note(
            T0,
            T0 + 100,
            br#"{"success":false,"data":13,"message":"x"}"#,
        );
        noted.note(T0, T0 + 100, b"<html>");
        assert!(noted.contains(T0, 11));
        assert!(!noted.contains(T0, 12), "too long after the loss");
        assert!(!noted.contains(T0, 13), "not an instance");
        assert!(!noted.contains(T0 + 1, 11), "another loss");
        noted.note(T0 + 1, T0 + 100, answer(14).as_bytes());
        assert!(!noted.contains(T0, 11), "a new loss starts afresh");
        assert!(noted.contains(T0 + 1, 14));
        assert!(noted.complete(T0 + 1));
    }

    #[test]
    fn ids_are_snowflakes_of_the_insert_time() {
        // POWERJOB.md §2.1: (nowMs - 1555776000000) << 22 | dc << 20 | machine << 6 | seq.
        let id = 754_612_332_134_400_064_i64;
        let ms = (id >> 22) + SNOWFLAKE_EPOCH_MS;
        assert!(id_floor(ms) <= id && id < id_floor(ms + 1));
        let query = lookup().query(T0 + 20_000, 0);
        assert_eq!(query["appIdEq"], 1);
        assert_eq!(query["jobIdEq"], 5);
        assert_eq!(query["instanceIdGt"], id_floor(T0 - CLOCK_SKEW_MS) - 1);
        assert_eq!(
            query["instanceIdLt"],
            id_floor(T0 + 20_000 + CLOCK_SKEW_MS + 1)
        );
    }

    #[test]
    fn an_instance_matches_by_app_job_params_and_trigger_time() {
        let l = lookup();
        let now = T0 + 20_000;
        assert!(l.matches(&instance(T0 + 10, Some(r#"{"k":"v"}"#), T0 + 10), now));
        assert!(!l.matches(&instance(T0 + 10, Some("other"), T0 + 10), now));
        assert!(
            !l.matches(&instance(T0 + 10, None, T0 + 10), now),
            "absent ≠ these params"
        );
        let mut other_job = instance(T0 + 10, Some(r#"{"k":"v"}"#), T0 + 10);
        other_job["jobId"] = json!(6);
        assert!(!l.matches(&other_job, now));
        assert!(
            !l.matches(
                &instance(T0 - 60_000, Some(r#"{"k":"v"}"#), T0 - 60_000),
                now
            ),
            "long before the call"
        );
        // Absent params equal empty ones; a delay moves the trigger time, not the insert time.
        let delayed = Lookup {
            params_sha256: params_digest(""),
            delay: 60_000,
            ..lookup()
        };
        assert!(delayed.matches(&instance(T0 + 10, None, T0 + 60_010), now));
        assert!(delayed.matches(&instance(T0 + 10, Some(""), T0 + 60_010), now));
        assert!(
            !delayed.matches(&instance(T0 + 10, None, T0 + 10), now),
            "no delay: another call"
        );
    }

    #[test]
    fn pages_are_read_and_odd_answers_are_told_apart() {
        let l = lookup();
        let now = T0 + 20_000;
        let page = json!({"success": true, "data": {"index": 0, "pageSize": 100, "totalPages": 2, "totalItems": 101,
            "data": [instance(T0 + 10, Some(r#"{"k":"v"}"#), T0 + 10), instance(T0 + 11, Some("x"), T0 + 11)]}});
        assert_eq!(
            read_page(&l, page.to_string().as_bytes(), 0, now),
            Page::Found {
                ids: vec![id_floor(T0 + 10) | 7],
                more: true
            }
        );
        let v510 = r#"{"success":false,"data":null,"message":"HttpMessageConversionException: Type definition error","code":null}"#;
        assert!(matches!(
            read_page(&l, v510.as_bytes(), 0, now),
            Page::Unsupported(m) if m.starts_with("HttpMessageConversionException")
        ));
        assert_eq!(read_page(&l, b"<html>", 0, now), Page::Malformed);
        assert_eq!(
            read_page(&l, br#"{"success":true,"data":1}"#, 0, now),
            Page::Malformed
        );
    }

    #[test]
    fn a_run_jobs_lookup_comes_from_its_bound_fields() {
        let fields = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            Lookup::run_job(
                "1",
                &fields(&[("jobId", "5"), ("delay", ""), ("instanceParams", "p")])
            ),
            Some((1, 5, "p".to_string(), 0))
        );
        assert_eq!(
            Lookup::run_job("1", &fields(&[("delay", "0")])),
            None,
            "no job"
        );
        assert_eq!(
            Lookup::run_job("", &fields(&[("jobId", "5")])),
            None,
            "no app"
        );
        let (head, body) = resolved_answer(42);
        assert!(String::from_utf8_lossy(&head).contains("X-POWERJOB-AUTH-PASSED: true\r\n"));
        assert_eq!(&body[..], br#"{"success":true,"data":42,"message":null}"#);
    }
}
