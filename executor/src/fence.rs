//! Placement epochs: an executor refuses a request routed by a placement it
//! has moved past (`ARCHITECTURE.md`, "Fencing stale proxies").
//!
//! Every request a proxy forwards carries its tenant's placement epoch
//! (`x-tensor-wasm-epoch`: the revision of the placement that sent it
//! here). Per tenant this executor remembers the newest epoch it has seen,
//! and, once the tenant has moved away, the epoch of the placement that
//! took it elsewhere. A request is refused with `placement_stale` when:
//!
//! - its tenant is frozen here, on its way to another executor;
//! - the tenant left this executor at a newer epoch than the request's;
//! - a request with a newer epoch has reached this executor already.
//!
//! The proxy then reads the placement again and sends the request where the
//! tenant lives. A request without an epoch (an older proxy, an operator's
//! direct call) is not fenced.
//!
//! A proxy can send a request again only if it kept its body (up to
//! [`RESEND_BODY_LIMIT`]). One whose body may be larger is not refused for
//! its tenant's pause: it is held until the tenant runs here again, or
//! until the tenant has left, and then sent on, unread, to the executor it
//! moved to, which the drop named ([`Fences::moved_to`]); see `crate::http`.
//!
//! [`RESEND_BODY_LIMIT`]: tensor_wasm_shared::headers::RESEND_BODY_LIMIT

use std::collections::HashMap;
use std::sync::Mutex;

use tensor_wasm_shared::TenantId;

use crate::error::ExecError;

/// Tenants remembered at most; past it the oldest-left entries go first
/// (a tenant that left long ago has no proxy still routing to it here).
const MAX_FENCES: usize = 1 << 20;

#[derive(Clone, Debug, Default)]
struct Fence {
    /// Newest epoch a request of the tenant carried here.
    seen: i64,
    /// The epoch of the placement that took the tenant elsewhere.
    left: Option<i64>,
    /// The address of the executor that placement took it to, when the
    /// drop named it.
    to: Option<String>,
}

/// Every tenant's fence on this executor.
#[derive(Debug, Default)]
pub struct Fences {
    map: Mutex<HashMap<TenantId, Fence>>,
}

fn stale(tenant: &TenantId, why: String) -> ExecError {
    ExecError::PlacementStale(format!("tenant {tenant}: {why}"))
}

impl Fences {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, Fence>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits or refuses a request of `tenant` routed by the placement of
    /// `epoch`; `frozen` says whether the tenant is frozen here (moving).
    pub fn admit(&self, tenant: &TenantId, epoch: i64, frozen: bool) -> Result<(), ExecError> {
        let mut map = self.lock();
        if !map.contains_key(tenant) && map.len() >= MAX_FENCES {
            // Forget tenants that left; if none did, fence no new tenant
            // rather than grow without bound.
            map.retain(|_, f| f.left.is_none());
            if map.len() >= MAX_FENCES {
                return if frozen {
                    Err(stale(tenant, "it is moving away from this executor".into()))
                } else {
                    Ok(())
                };
            }
        }
        let f = map.entry(tenant.clone()).or_default();
        if let Some(left) = f.left {
            if epoch < left {
                return Err(stale(
                    tenant,
                    format!(
                        "it left this executor at placement epoch {left}; this request was routed by epoch {epoch}"
                    ),
                ));
            }
            // A newer placement put it here again.
            f.left = None;
            f.to = None;
        }
        if epoch < f.seen {
            return Err(stale(
                tenant,
                format!(
                    "a request routed by placement epoch {} reached this executor; this one was routed by epoch {epoch}",
                    f.seen
                ),
            ));
        }
        f.seen = epoch;
        if frozen {
            return Err(stale(tenant, "it is moving away from this executor".into()));
        }
        Ok(())
    }

    /// `tenant` is to be dropped here because the placement of `epoch` put
    /// it elsewhere: from now on requests routed by older placements are
    /// refused. A drop older than a request already routed here (a proxy
    /// with a stale table) is itself refused. `to`: the address of the
    /// executor it moved to, if the drop named it.
    pub fn left(&self, tenant: &TenantId, epoch: i64, to: Option<&str>) -> Result<(), ExecError> {
        let mut map = self.lock();
        let f = map.entry(tenant.clone()).or_default();
        if epoch < f.seen {
            return Err(stale(
                tenant,
                format!(
                    "a request routed by placement epoch {} reached this executor; the drop was asked by epoch {epoch}",
                    f.seen
                ),
            ));
        }
        if f.left.is_none_or(|l| epoch >= l) {
            f.left = Some(epoch);
            f.to = to.map(str::to_string);
        }
        Ok(())
    }

    /// Where a request of `tenant` routed by the placement of `epoch` is
    /// to be sent on: the executor the tenant moved to and the epoch of
    /// the placement that took it there, once it has left this executor
    /// at a placement newer than the request's and the drop named where.
    pub fn moved_to(&self, tenant: &TenantId, epoch: i64) -> Option<(String, i64)> {
        let map = self.lock();
        let f = map.get(tenant)?;
        match (f.left, &f.to) {
            (Some(left), Some(to)) if epoch < left => Some((to.clone(), left)),
            _ => None,
        }
    }

    /// `tenant` arrived here (an import, a committed move): whatever it left
    /// behind before no longer applies.
    pub fn arrived(&self, tenant: &TenantId) {
        if let Some(f) = self.lock().get_mut(tenant) {
            f.left = None;
            f.to = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    fn code(r: Result<(), ExecError>) -> Option<&'static str> {
        r.err().map(|e| e.to_api().code.as_str())
    }

    #[test]
    fn older_epochs_are_refused_once_a_newer_one_or_a_move_was_seen() {
        let f = Fences::default();
        assert_eq!(code(f.admit(&t("a"), 5, false)), None);
        assert_eq!(code(f.admit(&t("a"), 5, false)), None);
        assert_eq!(code(f.admit(&t("a"), 4, false)), Some("placement_stale"));
        assert_eq!(code(f.admit(&t("a"), 7, false)), None);
        assert_eq!(code(f.admit(&t("a"), 6, false)), Some("placement_stale"));
        // Other tenants are not affected.
        assert_eq!(code(f.admit(&t("b"), 1, false)), None);
        // Frozen for a move: refused, whatever the epoch.
        assert_eq!(code(f.admit(&t("b"), 2, true)), Some("placement_stale"));
    }

    #[test]
    fn a_tenant_that_left_is_fenced_until_a_newer_placement_brings_it_back() {
        let f = Fences::default();
        assert_eq!(code(f.admit(&t("a"), 3, false)), None);
        f.left(&t("a"), 9, Some("10.0.0.2:8081")).unwrap();
        assert_eq!(
            f.moved_to(&t("a"), 3),
            Some(("10.0.0.2:8081".to_string(), 9))
        );
        assert_eq!(f.moved_to(&t("a"), 9), None);
        assert_eq!(f.moved_to(&t("b"), 3), None);
        assert_eq!(code(f.admit(&t("a"), 3, false)), Some("placement_stale"));
        assert_eq!(code(f.admit(&t("a"), 8, false)), Some("placement_stale"));
        // Moved back here by the placement of epoch 12.
        f.arrived(&t("a"));
        assert_eq!(f.moved_to(&t("a"), 3), None);
        assert_eq!(code(f.admit(&t("a"), 12, false)), None);
        assert_eq!(code(f.admit(&t("a"), 3, false)), Some("placement_stale"));
        // Without an import in between, a newer placement clears it too.
        // A drop asked by a placement older than one seen is refused.
        assert_eq!(code(f.left(&t("a"), 11, None)), Some("placement_stale"));
        f.left(&t("a"), 20, None).unwrap();
        assert_eq!(f.moved_to(&t("a"), 19), None, "the drop named no executor");
        assert_eq!(code(f.admit(&t("a"), 19, false)), Some("placement_stale"));
        assert_eq!(code(f.admit(&t("a"), 21, false)), None);
    }
}
