//! What an upstream answer means for the key (DESIGN.md "Outcomes"): keep it, release it, or mark it unknown.
//!
//! The rule: **release only what provably created nothing** (POWERJOB.md §10). Everything else that may follow
//! a created instance is `Unknown`: kept, never sent again.
//!
//! | upstream answer                                               | outcome   | reason             |
//! |---------------------------------------------------------------|-----------|--------------------|
//! | 2xx, auth passed or absent, `success:true`                    | `Done`    | `success`          |
//! | 2xx with `X-POWERJOB-AUTH-PASSED: false`                      | `Release` | `auth_refused`     |
//! | 2xx, `success:false` with a failure of [`BEFORE_INSERT`]      | `Release` | `before_insert`    |
//! | 2xx, any other `success:false` (a forward's `TimeoutException`, a dispatch error after the insert) | `Unknown` | `business_error` |
//! | 2xx, `success:false`, with `keep_business_errors`             | `Done`    | `business_error_kept` |
//! | 2xx whose body is not a PowerJob result                       | `Unknown` | `not_powerjob`     |
//! | 4xx (the servlet container refused the request)               | `Release` | `client_error`     |
//! | 5xx (the server failed, or a hop's 502/504), 1xx, 3xx         | `Unknown` | `server_error`     |
//!
//! Failures of the call itself are decided by the caller from `ProxyError`: never sent → `Release`
//! (`not_sent`), sent → `Unknown` (`no_answer`).

use http::HeaderMap;
use serde::de::{MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::powerjob::AUTH_PASSED;

/// A leader's outcome, with why (the `reason` label of `runonce_leader_outcomes_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done(Reason),
    Release(Reason),
    Unknown(Reason),
}

/// Why a leader's call ended as it did.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelValue,
)]
#[allow(non_camel_case_types)]
pub enum Reason {
    success,
    business_error_kept,
    auth_refused,
    before_insert,
    client_error,
    not_sent,
    business_error,
    not_powerjob,
    server_error,
    no_answer,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::success => "success",
            Reason::business_error_kept => "business_error_kept",
            Reason::auth_refused => "auth_refused",
            Reason::before_insert => "before_insert",
            Reason::client_error => "client_error",
            Reason::not_sent => "not_sent",
            Reason::business_error => "business_error",
            Reason::not_powerjob => "not_powerjob",
            Reason::server_error => "server_error",
            Reason::no_answer => "no_answer",
        }
    }
}

impl Outcome {
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Done(_) => "done",
            Outcome::Release(_) => "released",
            Outcome::Unknown(_) => "unknown",
        }
    }

    pub fn reason(&self) -> Reason {
        match *self {
            Outcome::Done(r) | Outcome::Release(r) | Outcome::Unknown(r) => r,
        }
    }
}

/// PowerJob's failures that happen before anything is inserted, as `message` prefixes of a `success:false`
/// answer (`ExceptionUtils.getMessage`: `"<SimpleClassName>: <message>"`), read from the 5.1.x server source
/// (tag v5.1.1). Each names where it is thrown. A failure thrown inside a `@DesignateServer` method and
/// forwarded to another server comes back wrapped, matches none of these, and stays unknown.
pub const BEFORE_INSERT: &[&str] = &[
    // OpenAPIController.checkJobIdValid (runJob, before JobService.runJob) and JobServiceImpl.copyJob.
    "IllegalArgumentException: can't find job by jobId: ",
    "IllegalArgumentException: this job is not belong to the app whose appId is ",
    // checkJobIdValid / checkInstanceIdValid with no appId (Java 14+ helpful NPE message).
    "NullPointerException: Cannot invoke \"java.lang.Long.equals(Object)\" because \"appId\" is null",
    // OpenAPIController.checkInstanceIdValid (retryInstance).
    "IllegalArgumentException: can't find instance by instanceId: ",
    "IllegalArgumentException: instance is not belong to the app whose appId is ",
    // InstanceService.retryInstance: status checks before the instance is reset.
    "PowerJobException: Only stopped instance can be retry!",
    "PowerJobException: Workflow's instance do not support retry!",
    // WorkflowService.permissionCheck (runWorkflow, copyWorkflow), before the workflow instance is created.
    "IllegalArgumentException: can't find workflow by id: ",
    "PowerJobException: Permission Denied! can't operate other app's workflow!",
    // JobServiceImpl.copyJob / WorkflowService.copyWorkflow on a deleted original.
    "IllegalStateException: can't copy the job which has been deleted!",
    "IllegalStateException: can't copy the workflow which has been deleted!",
    // WorkflowInstanceService.fetchWfInstance and retryWorkflowInstance's checks (retryWfInstance).
    "IllegalArgumentException: can't find workflow instance by wfInstanceId: ",
    "PowerJobException: Permission Denied!",
    "PowerJobException: workflow instance is running",
    "PowerJobException: workflow instance is already successful",
    "PowerJobException: you can't retry the workflow instance ",
    // Spring MVC, before the controller method runs: binding and request mapping.
    "MethodArgumentTypeMismatchException: ",
    "MissingServletRequestParameterException: ",
    "HttpMessageNotReadableException: ",
    "HttpRequestMethodNotSupportedException: ",
    "HttpMediaTypeNotSupportedException: ",
];

/// Whether a `success:false` message is one of [`BEFORE_INSERT`].
pub fn before_insert(message: &str) -> bool {
    BEFORE_INSERT.iter().any(|prefix| {
        // "Permission Denied!" alone is fetchWfInstance's; a longer message is something else.
        if *prefix == "PowerJobException: Permission Denied!" {
            message == *prefix
        } else {
            message.starts_with(prefix)
        }
    })
}

pub fn classify(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    keep_business_errors: bool,
) -> Outcome {
    if (400..500).contains(&status) {
        return Outcome::Release(Reason::client_error);
    }
    if !(200..300).contains(&status) {
        return Outcome::Unknown(Reason::server_error);
    }
    let refused = headers
        .get(AUTH_PASSED)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"));
    if refused {
        return Outcome::Release(Reason::auth_refused);
    }
    let result = Members::read(body);
    let success = result.as_ref().and_then(|r| r.success.as_ref()?.as_bool());
    match success {
        Some(true) => Outcome::Done(Reason::success),
        Some(false) if keep_business_errors => Outcome::Done(Reason::business_error_kept),
        Some(false) => {
            let message = result
                .as_ref()
                .and_then(|r| r.message.as_ref()?.as_str())
                .unwrap_or("");
            if before_insert(message) {
                Outcome::Release(Reason::before_insert)
            } else {
                Outcome::Unknown(Reason::business_error)
            }
        }
        None => Outcome::Unknown(Reason::not_powerjob),
    }
}

/// The members of an answer's JSON object that decide its outcome, read as serde_json reads a `Value` (the
/// same text is accepted or refused, and the last of a member given twice counts) without building the
/// object: a map of every member cost a leader more than the rest of its outcome (callgrind).
#[derive(Default)]
struct Members {
    success: Option<Value>,
    message: Option<Value>,
}

impl Members {
    /// `None` when `body` is not JSON, or not an object (then neither member is there).
    fn read(body: &[u8]) -> Option<Members> {
        let mut json = serde_json::Deserializer::from_slice(body);
        let members = serde::Deserializer::deserialize_any(&mut json, MembersVisitor).ok()?;
        json.end().ok()?;
        Some(members)
    }
}

struct MembersVisitor;

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Members;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
        let mut members = Members::default();
        while let Some(name) = map.next_key::<Name>()? {
            // Every member is read as a `Value` would read it, so that the same bodies parse.
            let value: Value = map.next_value()?;
            match name {
                Name::Success => members.success = Some(value),
                Name::Message => members.message = Some(value),
                Name::Other => {}
            }
        }
        Ok(members)
    }
}

/// A member's name, read as a string (escapes decoded, UTF-8 checked) without keeping it.
enum Name {
    Success,
    Message,
    Other,
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Name, D::Error> {
        struct NameVisitor;
        impl Visitor<'_> for NameVisitor {
            type Value = Name;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }

            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Name, E> {
                Ok(match name {
                    "success" => Name::Success,
                    "message" => Name::Message,
                    _ => Name::Other,
                })
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn auth(value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTH_PASSED, HeaderValue::from_static(value));
        h
    }

    const OK: &[u8] = br#"{"success":true,"data":754612332134400064,"message":null}"#;

    fn failed(message: &str) -> Vec<u8> {
        serde_json::json!({"success": false, "data": null, "message": message, "code": null})
            .to_string()
            .into_bytes()
    }

    /// `Members` reads what a `Value` parse reads: success and message, for every body.
    #[test]
    fn members_are_read_as_a_value_reads_them() {
        let deep = format!(
            "{{\"success\":true,\"data\":{}1{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        let bodies: Vec<&[u8]> = vec![
            br#"{"success":true,"code":null,"data":754612332134400064,"message":null}"#,
            br#"{"success":false,"data":null,"message":"TimeoutException: null","code":null}"#,
            br#"{"success":true,"success":false,"message":"a","message":"b"}"#,
            br#"{"succ\u0065ss":false,"m\u0065ssage":"job \u0041"}"#,
            br#"{"success":"true","message":5}"#,
            br#"{"success":true,"data":{"nested":[1,2,{"success":false}]}}"#,
            br#"{"success":true} trailing"#,
            br#"{"success":true}   "#,
            br#"{"success":true,}"#,
            br#"{"success":true,"data":1e400}"#,
            br#"{"success":true,"data":-0.5e-3}"#,
            b"{\"success\":true,\"message\":\"\xff\"}",
            b"{\"su\xffccess\":true}",
            br#"[{"success":true}]"#,
            br#"true"#,
            br#""success""#,
            br#"{}"#,
            b"",
            b"not json",
            br#"{"success":true"#,
            br#"{"success":true,"message":"\ud800"}"#,
            deep.as_bytes(),
        ];
        for body in bodies {
            let value = serde_json::from_slice::<Value>(body).ok();
            let by_value = (
                value.as_ref().and_then(|v| v.get("success")?.as_bool()),
                value
                    .as_ref()
                    .and_then(|v| Some(v.get("message")?.as_str()?.to_string())),
            );
            let members = Members::read(body);
            let by_members = (
                members.as_ref().and_then(|m| m.success.as_ref()?.as_bool()),
                members
                    .as_ref()
                    .and_then(|m| Some(m.message.as_ref()?.as_str()?.to_string())),
            );
            assert_eq!(by_members, by_value, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn the_outcome_table() {
        let none = HeaderMap::new();
        let timeout = failed("TimeoutException: null");
        assert_eq!(
            classify(200, &none, OK, false),
            Outcome::Done(Reason::success)
        );
        assert_eq!(
            classify(200, &auth("true"), OK, false),
            Outcome::Done(Reason::success)
        );
        for value in ["false", "FALSE"] {
            assert_eq!(
                classify(200, &auth(value), &timeout, false),
                Outcome::Release(Reason::auth_refused)
            );
        }
        assert_eq!(
            classify(200, &none, &timeout, false),
            Outcome::Unknown(Reason::business_error),
            "a forward's timeout may follow a created instance"
        );
        assert_eq!(
            classify(200, &none, &timeout, true),
            Outcome::Done(Reason::business_error_kept)
        );
        for status in [500, 502, 503, 504, 302, 101] {
            assert_eq!(
                classify(status, &none, OK, false),
                Outcome::Unknown(Reason::server_error),
                "{status}"
            );
        }
        for status in [400, 404, 405, 413, 415] {
            assert_eq!(
                classify(status, &none, b"", false),
                Outcome::Release(Reason::client_error),
                "{status}"
            );
        }
        for body in [
            &b"<html>"[..],
            b"",
            br#"{"data":1}"#,
            br#"{"success":"true"}"#,
        ] {
            assert_eq!(
                classify(200, &none, body, false),
                Outcome::Unknown(Reason::not_powerjob)
            );
        }
    }

    /// One case per entry of [`BEFORE_INSERT`]: the message as PowerJob renders it releases the key.
    #[test]
    fn every_failure_before_the_insert_releases_the_key() {
        let messages = [
            "IllegalArgumentException: can't find job by jobId: 999",
            "IllegalArgumentException: this job is not belong to the app whose appId is 2",
            "NullPointerException: Cannot invoke \"java.lang.Long.equals(Object)\" because \"appId\" is null",
            "IllegalArgumentException: can't find instance by instanceId: 7",
            "IllegalArgumentException: instance is not belong to the app whose appId is 2",
            "PowerJobException: Only stopped instance can be retry!",
            "PowerJobException: Workflow's instance do not support retry!",
            "IllegalArgumentException: can't find workflow by id: 3",
            "PowerJobException: Permission Denied! can't operate other app's workflow!",
            "IllegalStateException: can't copy the job which has been deleted!",
            "IllegalStateException: can't copy the workflow which has been deleted!",
            "IllegalArgumentException: can't find workflow instance by wfInstanceId: 9",
            "PowerJobException: Permission Denied!",
            "PowerJobException: workflow instance is running",
            "PowerJobException: workflow instance is already successful",
            "PowerJobException: you can't retry the workflow instance whose DAG is illegal!",
            "MethodArgumentTypeMismatchException: Failed to convert value of type 'java.lang.String' to required type 'java.lang.Long'",
            "MissingServletRequestParameterException: Required request parameter 'jobId' for method parameter type Long is not present",
            "HttpMessageNotReadableException: JSON parse error: Cannot deserialize value of type `java.lang.Long`",
            "HttpRequestMethodNotSupportedException: Request method 'GET' not supported",
            "HttpMediaTypeNotSupportedException: Content type 'text/plain' not supported",
        ];
        assert_eq!(messages.len(), BEFORE_INSERT.len(), "one case per entry");
        for prefix in BEFORE_INSERT {
            assert!(
                messages.iter().any(|m| m.starts_with(prefix)),
                "{prefix} has a case"
            );
        }
        for message in messages {
            assert_eq!(
                classify(200, &HeaderMap::new(), &failed(message), false),
                Outcome::Release(Reason::before_insert),
                "{message}"
            );
        }
    }

    #[test]
    fn failures_that_may_follow_the_insert_stay_unknown() {
        for message in [
            "TimeoutException: null",
            "PowerJobException: remote process failed: IllegalArgumentException: can't find job by jobId: 5",
            "NullPointerException: ",
            "PowerJobException: Permission Denied! and then some",
            "RuntimeException: dispatch failed",
            "",
        ] {
            assert_eq!(
                classify(200, &HeaderMap::new(), &failed(message), false),
                Outcome::Unknown(Reason::business_error),
                "{message:?}"
            );
        }
    }
}
