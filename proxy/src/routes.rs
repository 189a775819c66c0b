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

/// The public API that the proxy forwards to executors: (method, path
/// template, audit action). Any other method on a template's path is
/// forwarded too (the executor answers it 405 `method_not_allowed`), named
/// by the first entry of that path. `/healthz` and `/metrics` are the
/// proxy's own. `cli/tests/e2e/routes.rs` checks this table against the
/// executor's router (`executor/src/http.rs`).
pub const PUBLIC_ROUTES: &[(&str, &str, &str)] = &[
    ("GET", "/functions", "functions.list"),
    ("POST", "/functions", "functions.create"),
    ("GET", "/functions/{id}", "functions.get"),
    ("DELETE", "/functions/{id}", "functions.delete"),
    ("GET", "/functions/{id}/logs", "functions.logs"),
    ("POST", "/functions/{id}/invoke", "functions.invoke"),
    (
        "POST",
        "/functions/{id}/invoke-async",
        "functions.invoke_async",
    ),
    ("GET", "/jobs", "jobs.list"),
    ("GET", "/jobs/{id}", "jobs.get"),
    ("DELETE", "/jobs/{id}", "jobs.cancel"),
];

/// Whether `path` has the shape of `template` (`{…}` takes one segment).
fn fits(template: &str, path: &str) -> bool {
    let mut t = template.trim_matches('/').split('/');
    let mut p = path.trim_matches('/').split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(t), Some(p)) if t.starts_with('{') || t == p => {}
            _ => return false,
        }
    }
}

/// Names the route of `method` `path` (query string excluded).
pub fn classify(method: &str, path: &str) -> RouteName {
    let (template, action) = match path.trim_matches('/') {
        "healthz" => ("/healthz", "healthz"),
        "metrics" => ("/metrics", "metrics"),
        _ => {
            let mut same_path = PUBLIC_ROUTES.iter().filter(|(_, t, _)| fits(t, path));
            let first = same_path.next();
            same_path
                .find(|(m, ..)| *m == method)
                .or(first)
                .map_or(("other", "other"), |&(_, t, a)| (t, a))
        }
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

    #[test]
    fn the_table_names_every_method_on_its_paths() {
        for &(method, template, action) in PUBLIC_ROUTES {
            let path = template.replace("{id}", "x1");
            assert_eq!(
                classify(method, &path),
                RouteName { template, action },
                "{method} {path}"
            );
            // Other methods keep the template, named by its first entry.
            let first = PUBLIC_ROUTES.iter().find(|r| r.1 == template).unwrap();
            assert_eq!(classify("PUT", &path).action, first.2, "PUT {path}");
        }
        assert_eq!(classify("GET", "/functions/a/b").template, "other");
        assert_eq!(classify("GET", "/internal/info").template, "other");
        assert_eq!(classify("GET", "/").template, "other");
        assert_eq!(
            classify("GET", "/functions//logs").template,
            "/functions/{id}/logs"
        );
    }
}
