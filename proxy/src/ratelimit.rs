//! Per-tenant rate limits with governor (GCRA).
//!
//! Every tenant gets `TENSOR_WASM_API_RATE_LIMIT_QPS` with a burst of
//! `TENSOR_WASM_API_RATE_LIMIT_BURST`, unless an override gives it its own
//! quota; governor takes one quota per limiter, so overrides are a map of
//! direct limiters beside the keyed one. A refused request learns how long
//! to wait (`Retry-After`). Keys of idle tenants are pruned on a timer so the
//! table does not grow with every tenant ever seen.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tensor_wasm_shared::TenantId;

/// A rate and burst.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Sustained requests per second; may be fractional (0.5 = one every 2 s).
    pub qps: f64,
    /// Requests allowed at once after a quiet spell.
    pub burst: u32,
}

/// Why a rate cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RateError {
    #[error("rate limit qps must be a positive number, not {0}")]
    Qps(f64),
    #[error("rate limit burst must be at least 1")]
    Burst,
}

impl Rate {
    fn quota(self) -> Result<Quota, RateError> {
        if !(self.qps.is_finite() && self.qps > 0.0) {
            return Err(RateError::Qps(self.qps));
        }
        let burst = NonZeroU32::new(self.burst).ok_or(RateError::Burst)?;
        // One cell per 1/qps; a period under 1 ns would be 0, so cap there.
        let period = Duration::from_secs_f64(1.0 / self.qps).max(Duration::from_nanos(1));
        Quota::with_period(period)
            .map(|q| q.allow_burst(burst))
            .ok_or(RateError::Qps(self.qps))
    }
}

/// The proxy's rate limits.
#[derive(Debug)]
pub struct RateLimits {
    default: DefaultKeyedRateLimiter<TenantId>,
    overrides: HashMap<TenantId, DefaultDirectRateLimiter>,
    clock: DefaultClock,
}

impl RateLimits {
    pub fn new(default: Rate, overrides: &[(TenantId, Rate)]) -> Result<RateLimits, RateError> {
        let mut map = HashMap::new();
        for (tenant, rate) in overrides {
            map.insert(tenant.clone(), RateLimiter::direct(rate.quota()?));
        }
        Ok(RateLimits {
            default: RateLimiter::keyed(default.quota()?),
            overrides: map,
            clock: DefaultClock::default(),
        })
    }

    /// Admits one request of `tenant`, or says how long until one would be.
    pub fn check(&self, tenant: &TenantId) -> Result<(), Duration> {
        let verdict = match self.overrides.get(tenant) {
            Some(limiter) => limiter.check(),
            None => self.default.check_key(tenant),
        };
        verdict.map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// `Retry-After` for a wait: whole seconds, at least 1.
    pub fn retry_after_secs(wait: Duration) -> u64 {
        (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
    }

    /// Forgets tenants whose limiter is back to full; call on a timer.
    pub fn prune(&self) {
        self.default.retain_recent();
        self.default.shrink_to_fit();
    }

    /// Tenants the keyed limiter remembers now.
    pub fn tracked(&self) -> usize {
        self.default.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    #[test]
    fn the_burst_passes_then_requests_wait() {
        let limits = RateLimits::new(Rate { qps: 1.0, burst: 3 }, &[]).unwrap();
        for _ in 0..3 {
            assert!(limits.check(&t("a")).is_ok());
        }
        let wait = limits.check(&t("a")).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(RateLimits::retry_after_secs(wait), 1);
        // Another tenant is untouched.
        assert!(limits.check(&t("b")).is_ok());
    }

    #[test]
    fn overrides_apply_to_their_tenant_only() {
        let limits = RateLimits::new(
            Rate { qps: 1.0, burst: 1 },
            &[(t("vip"), Rate { qps: 1.0, burst: 5 })],
        )
        .unwrap();
        for _ in 0..5 {
            assert!(limits.check(&t("vip")).is_ok());
        }
        assert!(limits.check(&t("vip")).is_err());
        assert!(limits.check(&t("pleb")).is_ok());
        assert!(limits.check(&t("pleb")).is_err());
    }

    #[test]
    fn fractional_rates_and_bad_rates() {
        let limits = RateLimits::new(Rate { qps: 0.5, burst: 1 }, &[]).unwrap();
        assert!(limits.check(&t("a")).is_ok());
        let wait = limits.check(&t("a")).unwrap_err();
        assert!(wait > Duration::from_secs(1), "{wait:?}");
        assert_eq!(RateLimits::retry_after_secs(wait), 2);
        assert!(RateLimits::new(Rate { qps: 0.0, burst: 1 }, &[]).is_err());
        assert!(
            RateLimits::new(
                Rate {
                    qps: f64::NAN,
                    burst: 1
                },
                &[]
            )
            .is_err()
        );
        assert!(RateLimits::new(Rate { qps: 1.0, burst: 0 }, &[]).is_err());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(RateLimits::retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(RateLimits::retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(RateLimits::retry_after_secs(Duration::from_millis(2001)), 3);
        assert_eq!(RateLimits::retry_after_secs(Duration::ZERO), 1);
    }
}
