//! The canary's judgement (`docs/UPGRADE.md`, "Canary"): the requests the
//! proxy routed to one executor in a window, from its metrics
//! (`tensor_wasm_upstream_requests_total` and
//! `tensor_wasm_upstream_request_duration_seconds`), before the upgrade on
//! the old executor and after it on the new one, compared.

use std::time::Duration;

use serde::Serialize;
use tensor_wasm_shared::names::proxy_metrics as m;

use crate::client::observe::PromSample as Sample;

/// A p99 at or under this is never judged slow: one histogram bucket of
/// noise on a busy machine is not a regression.
pub const LATENCY_FLOOR_S: f64 = 0.025;

/// When a canary fails (the flags of `tensor-wasm upgrade`).
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub window: Duration,
    /// Share of requests answered 5xx the canary may add to the baseline's.
    pub max_error_rate: f64,
    /// Factor by which the canary's p99 may exceed the baseline's.
    pub max_latency_ratio: f64,
    /// Fewer requests than this in the window are not judged.
    pub min_requests: u64,
}

/// One executor's requests as the proxy counted them: cumulative at one
/// moment, or the difference over a window ([`Counts::since`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub requests: u64,
    /// Answered 5xx.
    pub errors: u64,
    /// Latency histogram: (upper bound in seconds, requests at or under it).
    pub buckets: Vec<(f64, u64)>,
}

impl Counts {
    /// `executor`'s counts in the samples of the proxy's `/metrics`.
    pub fn of(samples: &[Sample], executor: &str) -> Counts {
        let mine = |s: &&Sample| s.label("executor") == Some(executor);
        let mut c = Counts::default();
        for s in samples.iter().filter(mine) {
            if s.name == m::UPSTREAM_REQUESTS_TOTAL {
                let n = s.value as u64;
                c.requests += n;
                if s.label("status").is_some_and(|st| st.starts_with('5')) {
                    c.errors += n;
                }
            } else if s
                .name
                .strip_prefix(m::UPSTREAM_REQUEST_DURATION_SECONDS)
                .is_some_and(|rest| rest == "_bucket")
                && let Some(le) = s.label("le").and_then(|le| match le {
                    "+Inf" => Some(f64::INFINITY),
                    le => le.parse().ok(),
                })
            {
                c.buckets.push((le, s.value as u64));
            }
        }
        c.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        // Several proxies' samples: one bucket per bound, their counts
        // summed.
        c.buckets.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 += later.1;
            }
            same
        });
        c
    }

    /// What was counted after `earlier` (a reading of the same executor).
    pub fn since(&self, earlier: &Counts) -> Counts {
        let before = |le: f64| {
            earlier
                .buckets
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0, |(_, n)| *n)
        };
        Counts {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            buckets: self
                .buckets
                .iter()
                .map(|&(le, n)| (le, n.saturating_sub(before(le))))
                .collect(),
        }
    }

    /// Share of requests answered 5xx; 0 without requests.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// The upper bound of the bucket that holds the 99th percentile; none
    /// without requests.
    pub fn p99(&self) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = (total as f64 * 0.99).ceil() as u64;
        self.buckets
            .iter()
            .find(|(_, n)| *n >= rank)
            .map(|(le, _)| *le)
    }

    /// For the report.
    pub fn summary(&self) -> Window {
        Window {
            requests: self.requests,
            errors: self.errors,
            error_rate: self.error_rate(),
            p99_s: self.p99().filter(|p| p.is_finite()),
        }
    }
}

/// A window's figures, as the report gives them.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub p99_s: Option<f64>,
}

/// The canary's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass,
    /// Why it failed.
    Fail(String),
    /// Why it could not be judged (too little traffic).
    Unjudged(String),
}

/// Judges the canary's window against the baseline's. Errors can fail it
/// as soon as enough requests came in; latency is judged on the whole
/// window.
pub fn judge(baseline: &Counts, canary: &Counts, t: &Thresholds) -> Verdict {
    if canary.requests < t.min_requests {
        return Verdict::Unjudged(format!(
            "{} requests reached it in the window, fewer than the {} a judgement needs",
            canary.requests, t.min_requests
        ));
    }
    let allowed = baseline.error_rate() + t.max_error_rate;
    if canary.error_rate() > allowed {
        return Verdict::Fail(format!(
            "{} of its {} requests failed (5xx): {:.2} %, against {:.2} % before the upgrade and at most {:.2} % allowed",
            canary.errors,
            canary.requests,
            canary.error_rate() * 100.0,
            baseline.error_rate() * 100.0,
            allowed * 100.0
        ));
    }
    if baseline.requests >= t.min_requests
        && let (Some(before), Some(after)) = (baseline.p99(), canary.p99())
    {
        let allowed = (before * t.max_latency_ratio).max(LATENCY_FLOOR_S);
        if after > allowed {
            return Verdict::Fail(format!(
                "its p99 latency is {} against {} before the upgrade (at most {} allowed)",
                seconds(after),
                seconds(before),
                seconds(allowed)
            ));
        }
    }
    Verdict::Pass
}

fn seconds(s: f64) -> String {
    if s.is_infinite() {
        "over 30 s".into()
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::observe::parse_prometheus as parse;

    const T: Thresholds = Thresholds {
        window: Duration::from_secs(60),
        max_error_rate: 0.01,
        max_latency_ratio: 2.0,
        min_requests: 20,
    };

    fn counts(requests: u64, errors: u64, p99_bucket: f64) -> Counts {
        let les = [0.001, 0.005, 0.025, 0.1, 1.0, f64::INFINITY];
        Counts {
            requests,
            errors,
            buckets: les
                .iter()
                .map(|&le| (le, if le >= p99_bucket { requests } else { 0 }))
                .collect(),
        }
    }

    #[test]
    fn counts_come_from_the_executors_series_only() {
        let text = format!(
            "{r}{{executor=\"cpu0\",status=\"200\"}} 90\n\
             {r}{{executor=\"cpu0\",status=\"503\"}} 4\n\
             {r}{{executor=\"cpu0\",status=\"404\"}} 6\n\
             {r}{{executor=\"cpu1\",status=\"500\"}} 50\n\
             {d}_bucket{{executor=\"cpu0\",le=\"0.001\"}} 60\n\
             {d}_bucket{{executor=\"cpu0\",le=\"+Inf\"}} 100\n\
             {d}_bucket{{executor=\"cpu0\",le=\"0.01\"}} 100\n\
             {d}_sum{{executor=\"cpu0\"}} 0.3\n",
            r = m::UPSTREAM_REQUESTS_TOTAL,
            d = m::UPSTREAM_REQUEST_DURATION_SECONDS
        );
        let c = Counts::of(&parse(&text), "cpu0");
        assert_eq!((c.requests, c.errors), (100, 4));
        assert_eq!(
            c.buckets,
            vec![(0.001, 60), (0.01, 100), (f64::INFINITY, 100)]
        );
        assert_eq!(c.p99(), Some(0.01));
        let later = Counts {
            requests: 130,
            errors: 4,
            buckets: vec![(0.001, 90), (0.01, 130), (f64::INFINITY, 130)],
        };
        let w = later.since(&c);
        assert_eq!((w.requests, w.errors), (30, 0));
        assert_eq!(w.p99(), Some(0.001));
        assert_eq!(Counts::of(&parse(&text), "cpu2"), Counts::default());
        // Two proxies' metrics together count as one.
        let mut both = parse(&text);
        both.extend(parse(&text));
        let sum = Counts::of(&both, "cpu0");
        assert_eq!((sum.requests, sum.errors), (200, 8));
        assert_eq!(
            sum.buckets,
            vec![(0.001, 120), (0.01, 200), (f64::INFINITY, 200)]
        );
        assert_eq!(sum.p99(), Some(0.01));
    }

    #[test]
    fn errors_past_the_baseline_fail_the_canary() {
        let base = counts(1000, 1, 0.005);
        assert_eq!(judge(&base, &counts(100, 1, 0.005), &T), Verdict::Pass);
        assert!(matches!(
            judge(&base, &counts(100, 3, 0.005), &T),
            Verdict::Fail(why) if why.contains("3 of its 100 requests failed")
        ));
    }

    #[test]
    fn latency_past_the_ratio_and_the_floor_fails_the_canary() {
        let base = counts(1000, 0, 0.025);
        assert_eq!(judge(&base, &counts(100, 0, 0.025), &T), Verdict::Pass);
        assert!(matches!(
            judge(&base, &counts(100, 0, 0.1), &T),
            Verdict::Fail(why) if why.contains("p99")
        ));
        // Under the floor, a doubling is noise.
        let fast = counts(1000, 0, 0.001);
        assert_eq!(judge(&fast, &counts(100, 0, 0.005), &T), Verdict::Pass);
    }

    #[test]
    fn too_little_traffic_is_not_judged() {
        let base = counts(1000, 0, 0.005);
        assert!(matches!(
            judge(&base, &counts(5, 5, 0.005), &T),
            Verdict::Unjudged(_)
        ));
        // Without a baseline, errors still count; latency cannot be compared.
        let none = Counts::default();
        assert!(matches!(
            judge(&none, &counts(100, 50, 1.0), &T),
            Verdict::Fail(_)
        ));
        assert_eq!(judge(&none, &counts(100, 0, 1.0), &T), Verdict::Pass);
    }
}
