//! The proxy's route table (`PUBLIC_ROUTES` in proxy/src/routes.rs) against
//! the executor's router (`router` in executor/src/http.rs): every route the
//! proxy forwards reaches an executor route, and every public route of the
//! executor is forwarded — checked on the source of both and on running
//! processes.

use std::collections::BTreeSet;
use std::time::Duration;

use tensor_wasm_proxy::routes::{PUBLIC_ROUTES, classify};

use crate::harness::{ProxyOptions, TOKEN, TestFleet, raw_request};

/// The executor's router, as compiled into this test.
const EXECUTOR_HTTP: &str = include_str!("../../../executor/src/http.rs");

/// Methods the checks try on every path.
const METHODS: [&str; 5] = ["GET", "POST", "DELETE", "PUT", "PATCH"];

/// Paths the proxy answers itself instead of forwarding.
const PROXY_OWN: [&str; 2] = ["/healthz", "/metrics"];

/// The `(method, template)` routes that `router` in executor/src/http.rs
/// declares with `.route(path, method_router)`, internal ones included. The
/// test below checks this reading against a running executor, so that a
/// route it misses or invents fails the test.
fn executor_routes() -> BTreeSet<(String, String)> {
    let start = EXECUTOR_HTTP
        .find("pub fn router(")
        .expect("executor/src/http.rs defines `pub fn router(`");
    let body = &EXECUTOR_HTTP[start..];
    let body = &body[..body.find("\n}\n").expect("the end of `router`")];
    for other in [".nest(", ".nest_service(", ".route_service("] {
        assert!(
            !body.contains(other),
            "`router` uses {other}: teach executor_routes in cli/tests/e2e/routes.rs to read it"
        );
    }
    // Routers merged in are built in `router` itself, so read here too.
    for (at, _) in body.match_indices(".merge(") {
        let arg = &body[at + ".merge(".len()..];
        let arg = arg[..closing_paren(arg)].trim();
        assert!(
            body.contains(&format!("let {arg} = Router::new()"))
                || body.contains(&format!("let {arg} = {arg}")),
            "`router` merges `{arg}`, not built in `router`: teach executor_routes to read it"
        );
    }
    let mut routes = BTreeSet::new();
    let mut rest = body;
    let mut declared = 0;
    while let Some(at) = rest.find(".route(") {
        declared += 1;
        let args = &rest[at + ".route(".len()..];
        let args = &args[..closing_paren(args)];
        let path = args
            .trim_start()
            .strip_prefix('"')
            .and_then(|p| p.split('"').next())
            .unwrap_or_else(|| panic!("a route whose path is not a literal: {args}"));
        let before = routes.len();
        for method in METHODS {
            let call = format!("{}(", method.to_ascii_lowercase());
            let called = args.match_indices(&call).any(|(i, _)| {
                !args[..i]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_')
            });
            if called {
                routes.insert((method.to_string(), path.to_string()));
            }
        }
        assert!(routes.len() > before, "no method read for {path}: {args}");
        rest = &rest[at + 1..];
    }
    assert!(declared > 0, "no `.route(` in `router`");
    routes
}

/// The index of the `)` that closes the call whose arguments `s` starts.
fn closing_paren(s: &str) -> usize {
    let mut depth = 0usize;
    let mut in_str = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => in_str = !in_str,
            _ if in_str => {}
            '(' | '{' => depth += 1,
            ')' | '}' if depth == 0 => return i,
            ')' | '}' => depth -= 1,
            _ => {}
        }
    }
    panic!("unbalanced route arguments: {s}")
}

/// A concrete path for `template`.
fn path_of(template: &str) -> String {
    template
        .replace("{id}", "nope-1")
        .replace("{tenant}", "acme")
}

/// The executor's answers to a route it does not have.
fn no_such_route(status: u16, body: &[u8]) -> Option<String> {
    let code = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_default();
    (code == "not_found" || code == "method_not_allowed")
        .then(|| format!("{status} {}", String::from_utf8_lossy(body)))
}

#[test]
fn the_proxy_forwards_exactly_the_executors_public_routes() {
    let executor = executor_routes();
    let public: BTreeSet<(String, String)> = executor
        .iter()
        .filter(|(_, t)| !t.starts_with("/internal/") && !PROXY_OWN.contains(&t.as_str()))
        .cloned()
        .collect();
    let forwarded: BTreeSet<(String, String)> = PUBLIC_ROUTES
        .iter()
        .map(|&(m, t, _)| (m.to_string(), t.to_string()))
        .collect();
    assert_eq!(
        forwarded.difference(&public).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "routes the proxy forwards that no executor route serves"
    );
    assert_eq!(
        public.difference(&forwarded).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "public executor routes the proxy does not forward"
    );
    // The proxy names each of them as the table does, and refuses the
    // internal ones.
    for (method, template) in &executor {
        let name = classify(method, &path_of(template));
        if template.starts_with("/internal/") {
            assert_eq!(name.template, "other", "{method} {template}");
        } else {
            assert_eq!(name.template, template, "{method} {template}");
        }
    }

    let fleet = TestFleet::start(1, ProxyOptions::default());
    let ex = &fleet.executors[0];
    let timeout = Duration::from_secs(30);
    let internal_auth = format!("Bearer {TOKEN}");

    // The reading of executor/src/http.rs is the running router: each route
    // read is served, and every other method on its path is 405.
    let paths: BTreeSet<&String> = executor.iter().map(|(_, t)| t).collect();
    for template in paths {
        let internal = template.starts_with("/internal/");
        let mut headers = vec![
            ("authorization", internal_auth.as_str()),
            ("content-type", "application/json"),
        ];
        if !internal {
            headers.push(("x-tensor-wasm-tenant", "acme"));
        }
        for method in METHODS {
            let (status, body) = raw_request(
                &ex.addr,
                method,
                &path_of(template),
                &headers,
                b"{}",
                timeout,
            )
            .unwrap_or_else(|e| panic!("{method} {template} on the executor: {e:?}"));
            let served = executor.contains(&(method.to_string(), template.to_string()));
            let missing = no_such_route(status, &body);
            if served {
                assert_eq!(
                    missing, None,
                    "{method} {template}: read from executor/src/http.rs, not served"
                );
            } else {
                assert!(
                    status == 405 && missing.is_some(),
                    "{method} {template}: not read from executor/src/http.rs, yet answered {status} {}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
    }

    // Through the proxy, every route of its table reaches an executor route.
    let proxy = fleet
        .proxy
        .api
        .base
        .trim_start_matches("http://")
        .to_string();
    for &(method, template, _) in PUBLIC_ROUTES {
        let (status, body) = raw_request(
            &proxy,
            method,
            &path_of(template),
            &[
                ("authorization", "Bearer tok-acme"),
                ("content-type", "application/json"),
            ],
            b"{}",
            timeout,
        )
        .unwrap_or_else(|e| panic!("{method} {template} through the proxy: {e:?}"));
        assert_eq!(
            no_such_route(status, &body),
            None,
            "{method} {template} through the proxy"
        );
    }
}
