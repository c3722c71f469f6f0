//! Which requests are guarded, and with what settings (DESIGN.md "Guarded routes").
//!
//! Guarded by default: `POST …/openApi/{runJob, runWorkflow, retryInstance, retryWfInstance, copyJob,
//! copyWorkflow}`, and `saveJob`, `saveWorkflow`, `addWorkflowNode` when their body names no existing record
//! (without an `id` they create one). `[routes.NAME]` turns any OpenAPI endpoint on or off and overrides the
//! window, the fingerprint fields, `after_delivery` and `on_store_error` for it. Everything else passes through.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::Method;

use crate::config::{AfterDelivery, OnStoreError, Settings};

/// Endpoints that create an instance or a record on every accepted call.
pub const CREATING: &[&str] = &[
    "runJob",
    "runWorkflow",
    "retryInstance",
    "retryWfInstance",
    "copyJob",
    "copyWorkflow",
];

/// The one endpoint whose instances PowerJob's OpenAPI can look up (`queryInstance`).
pub const RESOLVABLE: &str = "runJob";

/// Endpoints that create a record only when the body names none (`id` absent).
pub const SAVING: &[&str] = &["saveJob", "saveWorkflow", "addWorkflowNode"];

/// The effective settings of one guarded endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Shared, so that metrics label a request with it without copying it.
    pub name: Arc<str>,
    pub window: Duration,
    /// The body fields of the fingerprint; `None`: all of them.
    pub fields: Option<Vec<String>>,
    pub after_delivery: AfterDelivery,
    pub on_store_error: OnStoreError,
    /// Guarded only when the body names no existing record.
    pub only_creating: bool,
    /// An unknown outcome is resolved by asking PowerJob (`guard::resolve`): `runJob` only, the one route
    /// the OpenAPI can look up.
    pub resolve: bool,
}

/// Every guarded endpoint by name.
#[derive(Debug, Default)]
pub struct Routes {
    by_name: HashMap<String, Arc<Route>>,
}

impl Routes {
    pub fn new(settings: &Settings) -> Routes {
        let mut by_name = HashMap::new();
        let defaults = CREATING.iter().chain(SAVING).map(|name| name.to_string());
        let named = settings.routes.keys().cloned();
        for name in defaults.chain(named) {
            let custom = settings.routes.get(&name).cloned().unwrap_or_default();
            let guarded_by_default =
                CREATING.contains(&name.as_str()) || SAVING.contains(&name.as_str());
            if !custom.enabled.unwrap_or(guarded_by_default) {
                continue;
            }
            let route = Route {
                window: custom.window.map_or(settings.window.0, |w| w.0),
                fields: custom.fields,
                after_delivery: custom.after_delivery.unwrap_or(settings.after_delivery),
                on_store_error: custom.on_store_error.unwrap_or(settings.on_store_error),
                only_creating: SAVING.contains(&name.as_str()),
                resolve: name == RESOLVABLE && custom.resolve.unwrap_or(true),
                name: Arc::from(name.as_str()),
            };
            by_name.insert(name, Arc::new(route));
        }
        Routes { by_name }
    }

    /// The route guarding `method` on an OpenAPI `endpoint` ([`crate::powerjob::served_endpoint`]), if any.
    pub fn find(&self, method: &Method, endpoint: &str) -> Option<Arc<Route>> {
        if method != Method::POST {
            return None;
        }
        self.by_name.get(endpoint).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The route for a request path, as the proxy finds it.
    fn find(routes: &Routes, method: &Method, path: &str) -> Option<Arc<Route>> {
        crate::powerjob::served_endpoint(path).and_then(|endpoint| routes.find(method, &endpoint))
    }
    use crate::config::{RouteSettings, Settings};

    fn settings(routes: &[(&str, RouteSettings)]) -> Settings {
        Settings {
            routes: routes
                .iter()
                .map(|(n, r)| (n.to_string(), r.clone()))
                .collect(),
            ..Settings::default()
        }
    }

    #[test]
    fn instance_creating_posts_are_guarded_by_default_and_nothing_else() {
        let routes = Routes::new(&settings(&[]));
        for path in [
            "/openApi/runJob",
            "/pj/openApi/runWorkflow",
            "/openApi/saveJob",
            "/openApi/copyJob",
        ] {
            assert!(find(&routes, &Method::POST, path).is_some(), "{path}");
        }
        assert!(find(&routes, &Method::GET, "/openApi/runJob").is_none());
        for path in [
            "/openApi/runJob/",
            "/openApi/runJob;jsessionid=1",
            "/openApi/run%4Aob",
            "/openApi/%72unJob//",
        ] {
            assert!(
                find(&routes, &Method::POST, path).is_some(),
                "{path} is runJob to Spring"
            );
        }
        assert!(find(&routes, &Method::POST, "/openApi/run%zzJob").is_none());
        for path in [
            "/openApi/fetchInstanceStatus",
            "/openApi/authApp",
            "/openApi/runJobX",
            "/runJob",
            "/",
        ] {
            assert!(find(&routes, &Method::POST, path).is_none(), "{path}");
        }
        assert!(
            find(&routes, &Method::POST, "/openApi/saveJob")
                .unwrap()
                .only_creating
        );
        assert!(
            !find(&routes, &Method::POST, "/openApi/runJob")
                .unwrap()
                .only_creating
        );
    }

    #[test]
    fn routes_can_be_turned_off_added_and_tuned() {
        let off = RouteSettings {
            enabled: Some(false),
            ..Default::default()
        };
        let added = RouteSettings {
            enabled: Some(true),
            ..Default::default()
        };
        let tuned = RouteSettings {
            window: Some(crate::config::Dur(Duration::from_secs(5))),
            fields: Some(vec!["jobId".into()]),
            after_delivery: Some(AfterDelivery::Replay),
            ..Default::default()
        };
        let routes = Routes::new(&settings(&[
            ("copyJob", off),
            ("stopInstance", added),
            ("runJob", tuned),
        ]));
        assert!(find(&routes, &Method::POST, "/openApi/copyJob").is_none());
        assert!(find(&routes, &Method::POST, "/openApi/stopInstance").is_some());
        let run = find(&routes, &Method::POST, "/openApi/runJob").unwrap();
        assert_eq!(run.window, Duration::from_secs(5));
        assert_eq!(run.fields.as_deref(), Some(&["jobId".to_string()][..]));
        assert_eq!(run.after_delivery, AfterDelivery::Replay);
        assert_eq!(run.on_store_error, OnStoreError::FailClosed);
    }
}
