//! runonce's own access control, for PowerJob servers that run with OpenAPI auth off (the default, where anyone
//! who reaches the server may run any job). Off unless configured; each rule refuses with 403, a
//! PowerJob-shaped body with its own `RUNONCE_*` code, and one log line (the `rescue`); nothing is forwarded.
//!
//! Checked in this order:
//! 1. `allow_networks`: the client's address (IPv4-mapped IPv6 addresses count as IPv4) must be in one of the
//!    networks. Every request on the proxy listener. `RUNONCE_NETWORK_NOT_ALLOWED`.
//! 2. `shared_secret_header` / `shared_secret`: every `/openApi/**` request must carry the header, once, with
//!    the secret as its value, compared in constant time (SHA-256 digests of both, then `subtle`). The header is
//!    removed from every request before it goes upstream. `RUNONCE_SECRET_REQUIRED`.
//! 3. `allow_apps`: every app id a `/openApi/**` request names must be allowed, and it must name one: the
//!    `X-POWERJOB-APP-ID` header, and `appId` in the query, the form body, or the JSON body (`appId` or `appIdEq`
//!    at the top, or `appId` of each element of an array). Ids are read strictly as decimal numbers; anything
//!    else is refused rather than guessed at (Spring would also read `0x2` or `+2`). To read them, `/openApi/**`
//!    bodies are held whole (within `body_limit`) before they are forwarded while this rule is on. The login
//!    endpoints `/assert` and `/authApp` name the app by name and password, not by id: only rules 1 and 2 apply
//!    to them. `RUNONCE_APP_NOT_ALLOWED`.
//!
//! Paths outside `/openApi/**` (worker endpoints, the console) are subject to rule 1 only. Which paths are
//! inside is decided as the server would see them ([`Scope::of`]): `%XX` decoded, `;params` cut, empty and
//! `.`/`..` segments resolved; any path with an `openApi` segment is inside. So `/%6FpenApi/runJob` or
//! `/openApi;x/runJob` cannot slip past the rules, at the price of also checking odd paths the server would
//! refuse anyway.
//!
//! Security caveats: the secret is never logged, echoed or forwarded, but without `tls_cert` it crosses the
//! network in clear text. An app id in a request is whatever the caller writes; `allow_apps` limits which apps
//! can be acted for, not who acts (that is what the networks, the secret, or the server's own auth are for).

use std::collections::HashSet;
use std::net::IpAddr;

use http::{request, HeaderMap, HeaderName};
use serde_json::Value;

use super::error::ProxyError;
use crate::config::{Secret, Settings};
use crate::powerjob;

/// Longest part of a rejected value shown in an answer or a log line.
const SHOWN: usize = 40;

/// Where a request path falls, as far as the rules go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// No `openApi` segment: rule 1 only.
    Outside,
    /// `…/openApi/assert` or `…/openApi/authApp`: rules 1 and 2.
    Login,
    /// Any other path with an `openApi` segment: every rule.
    OpenApi,
}

impl Scope {
    /// The scope of `path` (the request target's path, as sent).
    pub fn of(path: &str) -> Scope {
        let segments = powerjob::served_segments(path);
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        if !segments.contains(&"openApi") {
            return Scope::Outside;
        }
        match segments.as_slice() {
            [.., "openApi", "assert" | powerjob::AUTH_APP] => Scope::Login,
            _ => Scope::OpenApi,
        }
    }
}

/// The configured rules.
pub struct Access {
    networks: Vec<ipnet::IpNet>,
    apps: HashSet<u64>,
    secret: Option<SharedSecret>,
}

struct SharedSecret {
    header: HeaderName,
    /// SHA-256 of the secret: comparing digests takes the same time whatever the length of the guess.
    digest: [u8; 32],
}

impl Access {
    pub fn new(settings: &Settings) -> Access {
        let secret = HeaderName::from_bytes(settings.shared_secret_header.trim().as_bytes())
            .ok()
            .filter(|_| !settings.shared_secret.0.is_empty())
            .map(|header| SharedSecret {
                header,
                digest: settings.shared_secret.digest(),
            });
        Access {
            networks: settings.allow_networks.iter().map(|n| n.0).collect(),
            apps: settings.allow_apps.iter().map(|a| a.0).collect(),
            secret,
        }
    }

    /// Whether no rule is set (the default).
    pub fn is_off(&self) -> bool {
        self.networks.is_empty() && self.apps.is_empty() && self.secret.is_none()
    }

    /// The scope of `path` for these rules. Only the shared secret and `allow_apps` look at it, so with neither
    /// set (the default) the path is not decoded: that would cost allocations on every request.
    pub fn scope(&self, path: &str) -> Scope {
        if self.secret.is_none() && self.apps.is_empty() {
            return Scope::Outside;
        }
        Scope::of(path)
    }

    /// Rules 1 and 2, on the request head.
    pub fn check_head(
        &self,
        client: IpAddr,
        scope: Scope,
        headers: &HeaderMap,
    ) -> Result<(), ProxyError> {
        let client = client.to_canonical();
        if !self.networks.is_empty() && !self.networks.iter().any(|net| net.contains(&client)) {
            return Err(forbidden(
                "RUNONCE_NETWORK_NOT_ALLOWED",
                "the client address is not in allow_networks".into(),
            ));
        }
        if let (Some(secret), Scope::Login | Scope::OpenApi) = (&self.secret, scope) {
            let mut values = headers.get_all(&secret.header).iter();
            let matches = match (values.next(), values.next()) {
                (Some(value), None) => Secret::matches(&secret.digest, value.as_bytes()),
                _ => false,
            };
            if !matches {
                return Err(forbidden(
                    "RUNONCE_SECRET_REQUIRED",
                    format!(
                        "the {} header is missing, repeated or wrong",
                        secret.header.as_str()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Removes the shared secret's header, so that it never goes upstream.
    pub fn remove_secret(&self, headers: &mut HeaderMap) {
        if let Some(secret) = &self.secret {
            headers.remove(&secret.header);
        }
    }

    /// Whether rule 3 needs this request's body whole (then call [`Access::check_apps`] with it).
    pub fn reads_body(&self, scope: Scope) -> bool {
        !self.apps.is_empty() && scope == Scope::OpenApi
    }

    /// Rule 3 (a no-op unless [`Access::reads_body`] said yes).
    pub fn check_apps(
        &self,
        scope: Scope,
        parts: &request::Parts,
        body: &[u8],
    ) -> Result<(), ProxyError> {
        if !self.reads_body(scope) {
            return Ok(());
        }
        // Spring binds a multipart body's parts as request parameters (`appId` among them); this rule does
        // not read multipart, so such a request is refused rather than let through unread.
        let multipart = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|kind| {
                kind.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("multipart/")
            });
        if multipart {
            return Err(ProxyError::UnsupportedMediaType {
                reason: "allow_apps is set and the body is multipart, whose parts the server reads as request parameters; send a form or JSON".into(),
            });
        }
        let named = named_apps(parts, body);
        if named.is_empty() {
            return Err(forbidden(
                "RUNONCE_APP_NOT_ALLOWED",
                "allow_apps is set and the request names no app (X-POWERJOB-APP-ID header or appId field)"
                    .into(),
            ));
        }
        for text in named {
            match parse_id(&text) {
                Some(id) if self.apps.contains(&id) => {}
                Some(id) => {
                    return Err(forbidden(
                        "RUNONCE_APP_NOT_ALLOWED",
                        format!("app {id} is not in allow_apps"),
                    ))
                }
                None => {
                    let shown: String = text.chars().take(SHOWN).collect();
                    return Err(forbidden(
                        "RUNONCE_APP_NOT_ALLOWED",
                        format!("the app id {shown:?} is not a decimal number"),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn forbidden(code: &'static str, reason: String) -> ProxyError {
    ProxyError::Forbidden { code, reason }
}

/// A strictly decimal app id.
fn parse_id(text: &str) -> Option<u64> {
    let text = text.trim_matches('"');
    (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse().ok())
        .flatten()
}

/// Every app id the request names: the header (unless `null`/`undefined`), and `appId` in the query, the form
/// or the JSON body.
fn named_apps(parts: &request::Parts, body: &[u8]) -> Vec<String> {
    let mut named: Vec<String> = parts
        .headers
        .get_all(powerjob::APP_ID)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .filter(|v| powerjob::header_present(v))
        .collect();
    let form_ids = |encoded: &[u8]| -> Vec<String> {
        form_urlencoded::parse(encoded)
            .filter(|(name, _)| name == "appId")
            .map(|(_, value)| value.into_owned())
            .collect()
    };
    if let Some(query) = parts.uri.query() {
        named.extend(form_ids(query.as_bytes()));
    }
    let kind = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if kind.starts_with("application/x-www-form-urlencoded") {
        named.extend(form_ids(body));
    } else if kind.contains("json") {
        if let Ok(json) = serde_json::from_slice::<Value>(body) {
            let objects: Vec<&Value> = match &json {
                Value::Array(items) => items.iter().collect(),
                other => vec![other],
            };
            for object in objects {
                for field in ["appId", "appIdEq"] {
                    match object.get(field) {
                        None | Some(Value::Null) => {}
                        Some(Value::String(s)) => named.push(s.clone()),
                        Some(other) => named.push(other.to_string()),
                    }
                }
            }
        }
    }
    named
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AppId, Network, Secret};
    use http::Request;

    fn access(configure: impl FnOnce(&mut Settings)) -> Access {
        let mut settings = Settings::default();
        configure(&mut settings);
        Access::new(&settings)
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> request::Parts {
        let mut request = Request::post(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    fn code(result: Result<(), ProxyError>) -> &'static str {
        match result {
            Ok(()) => "ok",
            Err(err) => err.code(),
        }
    }

    const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
    const JSON: (&str, &str) = ("content-type", "application/json; charset=utf-8");

    #[test]
    fn networks_match_cidrs_and_mapped_addresses() {
        let access = access(|s| {
            s.allow_networks = vec![
                "10.0.0.0/8".parse::<Network>().unwrap(),
                "::1".parse().unwrap(),
            ]
        });
        let headers = HeaderMap::new();
        let check =
            |ip: &str| code(access.check_head(ip.parse().unwrap(), Scope::Outside, &headers));
        assert_eq!(check("10.1.2.3"), "ok");
        assert_eq!(check("::ffff:10.1.2.3"), "ok", "IPv4-mapped");
        assert_eq!(check("::1"), "ok");
        assert_eq!(check("11.0.0.1"), "RUNONCE_NETWORK_NOT_ALLOWED");
        assert_eq!(check("127.0.0.1"), "RUNONCE_NETWORK_NOT_ALLOWED");
    }

    #[test]
    fn the_secret_must_come_once_and_exactly() {
        let access = access(|s| {
            s.shared_secret_header = "X-Runonce-Secret".into();
            s.shared_secret = Secret("0123456789abcdef-secret".into());
        });
        let check = |values: &[&str], scope: Scope| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append("x-runonce-secret", v.parse().unwrap());
            }
            code(access.check_head("127.0.0.1".parse().unwrap(), scope, &headers))
        };
        let run = Scope::OpenApi;
        assert_eq!(check(&["0123456789abcdef-secret"], run), "ok");
        assert_eq!(check(&[], run), "RUNONCE_SECRET_REQUIRED");
        assert_eq!(
            check(&["0123456789abcdef-secreT"], run),
            "RUNONCE_SECRET_REQUIRED"
        );
        assert_eq!(
            check(&["0123456789abcdef-secret "], run),
            "RUNONCE_SECRET_REQUIRED"
        );
        assert_eq!(
            check(&["0123456789abcdef-secret", "0123456789abcdef-secret"], run),
            "RUNONCE_SECRET_REQUIRED"
        );
        assert_eq!(check(&[], Scope::Login), "RUNONCE_SECRET_REQUIRED");
        assert_eq!(check(&[], Scope::Outside), "ok", "outside /openApi/**");
        let mut headers = HeaderMap::new();
        headers.insert("x-runonce-secret", "x".parse().unwrap());
        access.remove_secret(&mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn every_app_the_request_names_must_be_allowed() {
        let access = access(|s| s.allow_apps = vec![AppId(1), AppId(7)]);
        let check = |uri: &str, headers: &[(&str, &str)], body: &str| {
            let scope = Scope::of(uri.split('?').next().unwrap());
            code(access.check_apps(scope, &parts(uri, headers), body.as_bytes()))
        };
        let no = "RUNONCE_APP_NOT_ALLOWED";
        assert_eq!(check("/openApi/runJob", &[FORM], "jobId=5&appId=1"), "ok");
        assert_eq!(check("/openApi/runJob", &[FORM], "jobId=5&appId=2"), no);
        assert_eq!(check("/openApi/runJob", &[FORM], "appId=1&appId=2"), no);
        assert_eq!(check("/openApi/runJob", &[FORM], "appId=0x1"), no);
        assert_eq!(check("/openApi/runJob", &[FORM], "appId=007"), "ok");
        assert_eq!(
            check("/openApi/runJob", &[FORM], "jobId=5"),
            no,
            "names none"
        );
        assert_eq!(check("/openApi/runJob?appId=2", &[FORM], "appId=1"), no);
        assert_eq!(
            check(
                "/openApi/runJob",
                &[FORM, ("X-POWERJOB-APP-ID", "2")],
                "appId=1"
            ),
            no,
            "the header too"
        );
        assert_eq!(
            check(
                "/openApi/fetchInstanceStatus",
                &[FORM, ("X-POWERJOB-APP-ID", "7")],
                "instanceId=3"
            ),
            "ok"
        );
        assert_eq!(
            check("/openApi/saveJob", &[JSON], r#"{"appId":7,"jobName":"x"}"#),
            "ok"
        );
        assert_eq!(check("/openApi/saveJob", &[JSON], r#"{"appId":"2"}"#), no);
        assert_eq!(
            check("/openApi/queryJob", &[JSON], r#"{"appIdEq":1}"#),
            "ok"
        );
        assert_eq!(
            check(
                "/openApi/addWorkflowNode",
                &[JSON],
                r#"[{"appId":1},{"appId":2}]"#
            ),
            no
        );
        assert_eq!(check("/openApi/saveJob", &[JSON], "not json"), no);
        // Spring binds a multipart body's parts as request parameters: unread here, so refused.
        let multipart = ("content-type", "multipart/form-data; boundary=b");
        let parts_body =
            "--b\r\nContent-Disposition: form-data; name=\"appId\"\r\n\r\n2\r\n--b--\r\n";
        assert_eq!(
            check(
                "/openApi/deleteJob",
                &[multipart, ("X-POWERJOB-APP-ID", "1")],
                parts_body
            ),
            "RUNONCE_UNSUPPORTED_MEDIA_TYPE"
        );
        // Logins name the app by name; paths outside /openApi/** are not this rule's.
        assert_eq!(
            check("/openApi/authApp", &[JSON], r#"{"appName":"a"}"#),
            "ok"
        );
        assert_eq!(check("/openApi/assert", &[FORM], "appName=a"), "ok");
        assert_eq!(check("/server/hello", &[], ""), "ok");
        assert!(!access.reads_body(Scope::Login));
        assert!(access.reads_body(Scope::OpenApi));
    }

    #[test]
    fn the_scope_is_the_path_as_the_server_reads_it() {
        for path in [
            "/openApi/runJob",
            "/pj/openApi/runJob",
            "/%6FpenApi/runJob",
            "/openApi;x=1/runJob",
            "//openApi//runJob/",
            "/x/../openApi/runJob",
            "/openApi/authApp/../runJob",
            "/openApi/authApp/x",
            "\\openApi\\runJob",
        ] {
            assert_eq!(Scope::of(path), Scope::OpenApi, "{path}");
        }
        for path in [
            "/openApi/authApp",
            "/openApi/assert/",
            "/pj/openApi/%61uthApp;x",
        ] {
            assert_eq!(Scope::of(path), Scope::Login, "{path}");
        }
        for path in [
            "/",
            "/server/hello",
            "/openapi/runJob",
            "/openApiX/runJob",
            "/openApi%2",
        ] {
            assert_eq!(Scope::of(path), Scope::Outside, "{path}");
        }
    }

    #[test]
    fn rules_are_off_unless_configured() {
        let access = access(|_| {});
        assert_eq!(
            code(access.check_head(
                "192.0.2.1".parse().unwrap(),
                Scope::OpenApi,
                &HeaderMap::new()
            )),
            "ok"
        );
        assert!(!access.reads_body(Scope::OpenApi));
        assert_eq!(
            code(access.check_apps(Scope::OpenApi, &parts("/openApi/runJob", &[]), b"")),
            "ok"
        );
    }
}
