//! `tensor-wasm observe`: a live view of the fleet, one frame a second.
//!
//! Each frame joins two sources: the admin API's executor list (health,
//! device, memory, instances, jobs, kernel dispatches, tenants) and the
//! proxy's Prometheus text at `/metrics`, from which the API request rate
//! is the change of `tensor_wasm_http_requests_total` (summed over every
//! route but `/metrics` and `/healthz`, so that watching and health probes
//! do not count) between two frames. Rates need two samples: `--once`
//! takes them one interval apart and prints a single frame.
//!
//! The live view survives a fleet that blinks: a failed sample is shown in
//! the frame and the next one is tried a second later. `--once` fails
//! instead, with a non-zero exit.

use std::io::IsTerminal;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tensor_wasm_shared::names::proxy_metrics::HTTP_REQUESTS_TOTAL;

use super::executors::{self, AdminExecutor, AdminExecutors};
use super::http::{Body, Endpoint};
use super::{Conn, output};

/// Routes whose requests are not API traffic.
const NOT_API_ROUTES: [&str; 2] = ["/metrics", "/healthz"];

/// Flags of `tensor-wasm observe`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one frame (rates measured over one interval) and exit.
    #[arg(long)]
    once: bool,
    /// Print frames as JSON, one line each.
    #[arg(long)]
    json: bool,
    /// Time between frames, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    #[command(flatten)]
    conn: Conn,
}

/// One sample line of the Prometheus text format.
#[derive(Clone, Debug, PartialEq)]
pub struct PromSample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl PromSample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `name{k="v",...} value [timestamp]` lines; comments, blank lines
/// and lines that do not parse are skipped (this reads one metric, it does
/// not validate exposition).
pub fn parse_prometheus(text: &str) -> Vec<PromSample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<PromSample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(PromSample {
        name,
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` (what follows the opening brace) into
/// `labels`; the text after the closing brace.
fn parse_labels<'a>(mut s: &'a str, labels: &mut Vec<(String, String)>) -> Option<&'a str> {
    loop {
        s = s.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if let Some(after) = s.strip_prefix('}') {
            return Some(after);
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        let mut chars = s[eq + 1..].char_indices();
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break eq + 1 + i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key, value));
        s = &s[end + 1..];
    }
}

/// API requests answered so far: the sum of `tensor_wasm_http_requests_total`
/// over every route but [`NOT_API_ROUTES`].
pub fn api_requests(samples: &[PromSample]) -> Option<f64> {
    let mut seen = false;
    let total = samples
        .iter()
        .filter(|s| s.name == HTTP_REQUESTS_TOTAL)
        .inspect(|_| seen = true)
        .filter(|s| {
            !s.label("route")
                .is_some_and(|r| NOT_API_ROUTES.contains(&r))
        })
        .map(|s| s.value)
        .sum();
    seen.then_some(total)
}

/// What one moment looked like.
struct Sample {
    at: Instant,
    requests: Option<f64>,
    executors: Vec<AdminExecutor>,
}

fn sample(admin: &Endpoint, public: &Endpoint) -> anyhow::Result<Sample> {
    let requests = public
        .call("GET", "/metrics", &[], Body::None)
        .ok()
        .and_then(|r| api_requests(&parse_prometheus(&String::from_utf8_lossy(&r.body))));
    let list: AdminExecutors = admin.get_json("/admin/executors")?;
    Ok(Sample {
        at: Instant::now(),
        requests,
        executors: list.executors,
    })
}

/// One frame as printed (`--json`: one line of this).
#[derive(Debug, Serialize)]
struct Frame {
    /// RFC 3339, UTC.
    time: String,
    proxy: ProxyView,
    executors: Vec<ExecutorView>,
}

#[derive(Debug, Serialize)]
struct ProxyView {
    url: String,
    /// API requests answered since the proxy started; `null` when its
    /// `/metrics` could not be read.
    requests_total: Option<f64>,
    /// API requests per second since the previous frame.
    requests_per_second: Option<f64>,
}

#[derive(Debug, Serialize)]
struct ExecutorView {
    id: String,
    addr: String,
    healthy: bool,
    draining: bool,
    device_kind: Option<String>,
    device_name: Option<String>,
    /// Bytes.
    memory_used: Option<u64>,
    /// Bytes.
    memory_total: Option<u64>,
    active_instances: Option<u64>,
    jobs_in_flight: Option<u64>,
    kernel_dispatches_total: Option<u64>,
    kernel_dispatches_per_second: Option<f64>,
    tenants: usize,
}

fn frame(url: &str, prev: Option<&Sample>, cur: &Sample) -> Frame {
    let secs = prev.map(|p| cur.at.duration_since(p.at).as_secs_f64());
    let rate = |now: Option<f64>, before: Option<f64>| match (now, before, secs) {
        (Some(n), Some(b), Some(s)) if s > 0.0 => Some(((n - b) / s).max(0.0)),
        _ => None,
    };
    let executors = cur
        .executors
        .iter()
        .map(|e| {
            let before = prev
                .and_then(|p| p.executors.iter().find(|x| x.id == e.id))
                .and_then(|x| x.stats.as_ref())
                .map(|s| s.kernel_dispatches_total as f64);
            let stats = e.stats.as_ref();
            ExecutorView {
                id: e.id.clone(),
                addr: e.addr.clone(),
                healthy: e.healthy,
                draining: e.draining,
                device_kind: e.device.as_ref().map(|d| d.kind.clone()),
                device_name: e.device.as_ref().map(|d| d.name.clone()),
                memory_used: e.device.as_ref().map(|d| d.memory_used),
                memory_total: e.device.as_ref().map(|d| d.memory_total),
                active_instances: stats.map(|s| s.active_instances),
                jobs_in_flight: stats.map(|s| s.jobs_in_flight),
                kernel_dispatches_total: stats.map(|s| s.kernel_dispatches_total),
                kernel_dispatches_per_second: rate(
                    stats.map(|s| s.kernel_dispatches_total as f64),
                    before,
                ),
                tenants: e.tenants.len(),
            }
        })
        .collect();
    Frame {
        time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        proxy: ProxyView {
            url: url.to_string(),
            requests_total: cur.requests,
            requests_per_second: rate(cur.requests, prev.and_then(|p| p.requests)),
        },
        executors,
    }
}

fn rate_text(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.1}"))
}

fn render(f: &Frame, raw: &[AdminExecutor]) -> String {
    let mut out = format!(
        "{}  proxy {}  {} API req/s\n\n",
        f.time,
        f.proxy.url,
        rate_text(f.proxy.requests_per_second)
    );
    let opt = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| v.to_string());
    let rows: Vec<Vec<String>> = f
        .executors
        .iter()
        .zip(raw)
        .map(|(e, r)| {
            vec![
                e.id.clone(),
                executors::health(r),
                executors::device(r),
                r.device
                    .as_ref()
                    .map_or_else(|| "-".into(), executors::memory),
                opt(e.active_instances),
                opt(e.jobs_in_flight),
                opt(e.kernel_dispatches_total),
                rate_text(e.kernel_dispatches_per_second),
                e.tenants.to_string(),
            ]
        })
        .collect();
    out.push_str(&output::table(
        &[
            "EXECUTOR",
            "HEALTHY",
            "DEVICE",
            "MEMORY",
            "INSTANCES",
            "JOBS",
            "DISPATCHES",
            "DISPATCH/S",
            "TENANTS",
        ],
        &rows,
    ));
    out
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let admin = args.conn.admin()?;
    let public = args.conn.public_anonymous()?;
    let interval = Duration::from_millis(args.interval_ms.max(100));
    let print = |f: &Frame, raw: &[AdminExecutor], clear: bool| -> anyhow::Result<()> {
        if args.json {
            output::println(&serde_json::to_string(f)?)?;
        } else {
            let text = render(f, raw);
            output::print(&if clear {
                format!("\x1b[2J\x1b[H{text}")
            } else {
                format!("{text}\n")
            })?;
        }
        Ok(())
    };
    if args.once {
        let first = sample(&admin, &public)?;
        std::thread::sleep(interval);
        let second = sample(&admin, &public)?;
        return print(
            &frame(&public.base, Some(&first), &second),
            &second.executors,
            false,
        );
    }
    let clear = !args.json && std::io::stdout().is_terminal();
    let mut prev: Option<Sample> = None;
    loop {
        match sample(&admin, &public) {
            Ok(cur) => {
                print(
                    &frame(&public.base, prev.as_ref(), &cur),
                    &cur.executors,
                    clear,
                )?;
                prev = Some(cur);
            }
            Err(e) => {
                eprintln!("observe: {e:#}; retrying");
                prev = None;
            }
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP tensor_wasm_http_requests_total Requests answered.
# TYPE tensor_wasm_http_requests_total counter
tensor_wasm_http_requests_total{method="GET",route="/functions",status="200"} 7
tensor_wasm_http_requests_total{method="POST",route="/functions/{id}/invoke",status="200"} 30
tensor_wasm_http_requests_total{method="GET",route="/metrics",status="200"} 100
tensor_wasm_http_requests_total{ method="GET", route="/healthz", status="200" } 5 1700000000000
tensor_wasm_http_requests_in_flight 1
tensor_wasm_build_info{component="proxy",version="0.1.0",note="a \"quoted\" \\ value"} 1
tensor_wasm_http_request_duration_seconds_bucket{le="+Inf"} +Inf
garbage line without value
"#;

    #[test]
    fn parses_the_text_format_minimally() {
        let samples = parse_prometheus(TEXT);
        assert_eq!(samples.len(), 7, "{samples:#?}");
        assert_eq!(samples[0].label("route"), Some("/functions"));
        assert_eq!(samples[3].label("route"), Some("/healthz"));
        assert_eq!(samples[3].value, 5.0);
        assert_eq!(samples[4].name, "tensor_wasm_http_requests_in_flight");
        assert!(samples[4].labels.is_empty());
        assert_eq!(samples[5].label("note"), Some(r#"a "quoted" \ value"#));
        assert_eq!(samples[5].label("version"), Some("0.1.0"));
        assert_eq!(samples[6].value, f64::INFINITY);
    }

    #[test]
    fn the_request_rate_leaves_out_metrics_and_health() {
        assert_eq!(api_requests(&parse_prometheus(TEXT)), Some(37.0));
        assert_eq!(api_requests(&parse_prometheus("other 1\n")), None);
    }

    #[test]
    fn rates_come_from_two_samples() {
        let at = Instant::now();
        let exec = |n| AdminExecutor {
            id: "cpu0".into(),
            addr: "127.0.0.1:7070".into(),
            version: "0.1.0".into(),
            healthy: true,
            draining: false,
            device: None,
            tenants: vec!["acme".into()],
            stats: Some(tensor_wasm_shared::api::ExecutorStats {
                active_instances: 1,
                jobs_in_flight: 0,
                kernel_dispatches_total: n,
            }),
        };
        let a = Sample {
            at,
            requests: Some(10.0),
            executors: vec![exec(100)],
        };
        let b = Sample {
            at: at + Duration::from_secs(2),
            requests: Some(30.0),
            executors: vec![exec(160)],
        };
        let f = frame("http://x", Some(&a), &b);
        assert_eq!(f.proxy.requests_per_second, Some(10.0));
        assert_eq!(f.executors[0].kernel_dispatches_per_second, Some(30.0));
        assert_eq!(f.executors[0].tenants, 1);
        let f = frame("http://x", None, &b);
        assert_eq!(f.proxy.requests_per_second, None);
        let text = render(&f, &b.executors);
        assert!(text.contains("cpu0") && text.contains("160"), "{text}");
    }
}
