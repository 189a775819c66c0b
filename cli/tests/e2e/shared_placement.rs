//! More than one proxy in front of one fleet, sharing the placement table
//! through a real etcd (`--placement etcd://…`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::harness::*;

const TENANTS: usize = 12;

fn tokens() -> String {
    (0..TENANTS)
        .map(|i| format!("tok-t{i}:t{i}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `n` proxies on `etcd` in front of `executors`.
fn proxies(
    dir: &std::path::Path,
    etcd: &EtcdProcess,
    executors: &[&ExecutorProcess],
    n: usize,
) -> Vec<ProxyProcess> {
    (0..n)
        .map(|i| {
            ProxyProcess::start(
                &dir.join(format!("proxy{i}")),
                executors,
                ProxyOptions {
                    tokens: tokens(),
                    extra_args: vec!["--placement".into(), etcd.placement()],
                    ..ProxyOptions::default()
                },
            )
        })
        .collect()
}

fn deploy_counter(p: &ProxyProcess, token: &str) -> String {
    let wasm = wat::parse_str(COUNTER).unwrap();
    let r = p.call(
        token,
        "POST",
        "/functions?name=counter",
        Some(("application/wasm", &wasm)),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn count(p: &ProxyProcess, token: &str, id: &str) -> Resp {
    p.call(
        token,
        "POST",
        &format!("/functions/{id}/invoke"),
        Some(("text/plain", b"")),
    )
}

fn placements(p: &ProxyProcess) -> serde_json::Value {
    let r = p.admin("GET", "/admin/placements", None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["placements"].clone()
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_proxies_on_one_etcd_send_each_tenant_to_one_executor() {
    let etcd = EtcdProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let a = ExecutorProcess::start("cpu0", &dir.path().join("cpu0"));
    let b = ExecutorProcess::start("cpu1", &dir.path().join("cpu1"));
    let ps = proxies(dir.path(), &etcd, &[&a, &b], 2);

    // Every tenant's first requests reach both proxies at once: one
    // placement wins, and both proxies route by it.
    let threads: Vec<_> = (0..TENANTS)
        .flat_map(|i| ps.iter().map(move |p| (i, p.options.listen_port)))
        .map(|(i, port)| {
            std::thread::spawn(move || {
                let api = Api::new(&format!("http://127.0.0.1:{port}"));
                let auth = format!("Bearer tok-t{i}");
                let r = api.call("GET", "/functions", &[("authorization", &auth)], None);
                assert_eq!(r.status, 200, "{}", r.text());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    wait_until(
        "both proxies hold every placement",
        Duration::from_secs(10),
        || {
            placements(&ps[1]).as_object().unwrap().len() == TENANTS
                && placements(&ps[0]).as_object().unwrap().len() == TENANTS
        },
    );
    assert_eq!(placements(&ps[0]), placements(&ps[1]));
    let used: std::collections::BTreeSet<String> = placements(&ps[0])
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(used.len(), 2, "tenants are spread over both executors");

    // A counter deployed through one proxy counts on through the other:
    // the same copy of the tenant answers both.
    let ids: Vec<String> = (0..TENANTS)
        .map(|i| deploy_counter(&ps[i % 2], &format!("tok-t{i}")))
        .collect();
    for round in 1..=6u32 {
        for (i, id) in ids.iter().enumerate() {
            let r = count(&ps[(i + round as usize) % 2], &format!("tok-t{i}"), id);
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(parse_counter(&r.body).0, round, "tenant t{i}");
        }
    }

    // A move made by one proxy is followed by the other.
    let home = ps[0].placement("t0").unwrap();
    let other = if home == "cpu0" { "cpu1" } else { "cpu0" };
    let r = ps[0].migrate("t0", other);
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until(
        "the other proxy sees the move",
        Duration::from_secs(10),
        || ps[1].placement("t0").as_deref() == Some(other),
    );
    for n in 7..=10u32 {
        let r = count(&ps[(n % 2) as usize], "tok-t0", &ids[0]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(parse_counter(&r.body).0, n, "state moved with the tenant");
    }
    let moved_to = if other == "cpu0" { &a } else { &b };
    assert!(tenants_on(moved_to).contains(&"t0".to_string()));
}

#[test]
fn with_etcd_down_placed_tenants_are_served_and_new_ones_refused_until_it_is_back() {
    let mut etcd = EtcdProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let a = ExecutorProcess::start("cpu0", &dir.path().join("cpu0"));
    let b = ExecutorProcess::start("cpu1", &dir.path().join("cpu1"));
    let ps = Arc::new(proxies(dir.path(), &etcd, &[&a, &b], 2));
    let id = deploy_counter(&ps[0], "tok-t0");

    // A client alternating between the proxies, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let load = {
        let (ps, stop, failures, id) = (ps.clone(), stop.clone(), failures.clone(), id.clone());
        std::thread::spawn(move || {
            let mut expected = 0u32;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let r = count(&ps[i % 2], "tok-t0", &id);
                i += 1;
                if r.status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("failed: {} {}", r.status, r.text());
                    continue;
                }
                expected += 1;
                assert_eq!(parse_counter(&r.body).0, expected, "counts are continuous");
                std::thread::sleep(Duration::from_millis(20));
            }
            expected
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    etcd.stop();
    let down = Instant::now();

    // A new tenant cannot be placed, nor a tenant moved: 503, said why.
    let r = ps[1].call("tok-t1", "GET", "/functions", None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.code(), "placement_unavailable");
    assert!(r.header("retry-after").is_some());
    let r = ps[0].migrate(
        "t0",
        if ps[0].placement("t0").unwrap() == "cpu0" {
            "cpu1"
        } else {
            "cpu0"
        },
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.code(), "placement_unavailable");

    // Ten seconds without etcd, then it is back: the proxies recover by
    // themselves.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(down.elapsed()));
    etcd.run();
    wait_until(
        "a new tenant is placed again",
        Duration::from_secs(30),
        || ps[1].call("tok-t1", "GET", "/functions", None).status == 200,
    );
    assert_eq!(ps[0].placement("t1"), ps[1].placement("t1"));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let served = load.join().unwrap();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no request of a placed tenant failed"
    );
    assert!(
        served > 100,
        "the client was served all along: {served} calls"
    );
}
