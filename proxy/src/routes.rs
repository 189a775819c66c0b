//! The public routes as the proxy names them in metrics and audit records.
//!
//! The proxy forwards the public API to the executor, which owns it; it
//! needs a bounded name for each route (a template for metric labels, an
//! action for the audit log), to know which paths it answers itself, and to
//! refuse every other path (`other`) rather than forward it with the
//! internal token.

/// What a request is, by its method and path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteName {
    /// The path template, e.g. `/functions/{id}/invoke`; `other` for paths
    /// outside the public API (which the proxy answers 404 `not_found`).
    pub template: &'static str,
    /// The audit action, e.g. `functions.invoke`.
    pub action: &'static str,
}

/// Names the route of `method` `path` (query string excluded).
pub fn classify(method: &str, path: &str) -> RouteName {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (template, action) = match (method, segs.as_slice()) {
        (_, ["healthz"]) => ("/healthz", "healthz"),
        (_, ["metrics"]) => ("/metrics", "metrics"),
        ("POST", ["functions"]) => ("/functions", "functions.create"),
        (_, ["functions"]) => ("/functions", "functions.list"),
        ("DELETE", ["functions", _]) => ("/functions/{id}", "functions.delete"),
        (_, ["functions", _]) => ("/functions/{id}", "functions.get"),
        (_, ["functions", _, "logs"]) => ("/functions/{id}/logs", "functions.logs"),
        (_, ["functions", _, "invoke"]) => ("/functions/{id}/invoke", "functions.invoke"),
        (_, ["functions", _, "invoke-async"]) => {
            ("/functions/{id}/invoke-async", "functions.invoke_async")
        }
        (_, ["jobs"]) => ("/jobs", "jobs.list"),
        ("DELETE", ["jobs", _]) => ("/jobs/{id}", "jobs.cancel"),
        (_, ["jobs", _]) => ("/jobs/{id}", "jobs.get"),
        _ => ("other", "other"),
    };
    RouteName { template, action }
}

/// A bounded method label.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "DELETE" => "DELETE",
        "PUT" => "PUT",
        "HEAD" => "HEAD",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_route_has_a_template() {
        let cases = [
            ("POST", "/functions", "/functions", "functions.create"),
            ("GET", "/functions/", "/functions", "functions.list"),
            ("GET", "/functions/f1", "/functions/{id}", "functions.get"),
            (
                "DELETE",
                "/functions/f1",
                "/functions/{id}",
                "functions.delete",
            ),
            (
                "GET",
                "/functions/f1/logs",
                "/functions/{id}/logs",
                "functions.logs",
            ),
            (
                "POST",
                "/functions/f1/invoke",
                "/functions/{id}/invoke",
                "functions.invoke",
            ),
            (
                "POST",
                "/functions/f1/invoke-async",
                "/functions/{id}/invoke-async",
                "functions.invoke_async",
            ),
            ("GET", "/jobs", "/jobs", "jobs.list"),
            ("GET", "/jobs/j1", "/jobs/{id}", "jobs.get"),
            ("DELETE", "/jobs/j1", "/jobs/{id}", "jobs.cancel"),
            ("GET", "/healthz", "/healthz", "healthz"),
            ("GET", "/a/b/c/d", "other", "other"),
        ];
        for (method, path, template, action) in cases {
            assert_eq!(
                classify(method, path),
                RouteName { template, action },
                "{method} {path}"
            );
        }
        assert_eq!(method_label("BREW"), "other");
    }
}
