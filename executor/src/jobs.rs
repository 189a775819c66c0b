//! Async jobs: `invoke-async`, `GET /jobs`, cancel, retention.
//!
//! A job is admitted like an invocation, but answers at once with its id and
//! runs in the background: it waits for an instance of its function, without
//! the queue cap of synchronous requests (the pending-job quota bounds it
//! instead), then for one of the executor's job slots (`job_concurrency`).
//! While its tenant is frozen for a migration a pending job waits; if the
//! tenant leaves this executor, the job travels in the snapshot and
//! runs where the tenant lands. Finished jobs are kept for `job_retention`,
//! at most `max_finished_jobs` per tenant and results of at most
//! `finished_job_bytes` (the newest always stays); waiting jobs hold at
//! most `pending_jobs` requests of at most `pending_job_bytes` together.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tensor_wasm_shared::TenantId;
use tensor_wasm_shared::api::{JobAccepted, JobInfo, JobStatus};

use crate::body;
use crate::error::ExecError;
use crate::registry::{Registry, Tenant};
use crate::sync::{lock, now_rfc3339, random_id};

/// How often a pending job of a frozen tenant looks again: 20 ms, small
/// next to a migration's pause.
const FROZEN_POLL: Duration = Duration::from_millis(20);

/// A request kept until its job runs: the body as it arrived.
#[derive(Clone, Debug)]
pub struct PendingRequest {
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// One job of a tenant.
#[derive(Clone, Debug)]
pub struct JobRecord {
    pub info: JobInfo,
    /// The request, while the job is pending.
    pub request: Option<PendingRequest>,
    /// When it finished, for retention.
    pub finished: Option<Instant>,
}

fn new_job_id() -> String {
    random_id("job")
}

impl JobRecord {
    /// Bytes the job holds: its waiting request, or its result.
    fn held_bytes(&self) -> u64 {
        let request = self.request.as_ref().map_or(0, |r| r.body.len());
        let result = self.info.result.as_ref().map_or(0, |r| r.json_bytes());
        (request + result) as u64
    }
}

/// Forgets the oldest finished jobs until at most `count` are left and
/// their results hold at most `bytes`. The newest finished job always
/// stays, so a client polling for the job that just finished finds it.
fn trim_finished(jobs: &mut BTreeMap<String, JobRecord>, count: usize, bytes: u64) {
    let (mut left, mut held) = (0usize, 0u64);
    for j in jobs.values().filter(|j| j.finished.is_some()) {
        left += 1;
        held += j.held_bytes();
    }
    if left <= count && held <= bytes {
        return; // the usual case: nothing to sort
    }
    let mut finished: Vec<(Instant, String, u64)> = jobs
        .iter()
        .filter_map(|(id, j)| j.finished.map(|f| (f, id.clone(), j.held_bytes())))
        .collect();
    finished.sort();
    for (_, id, size) in &finished {
        if left <= 1 || (left <= count && held <= bytes) {
            break;
        }
        jobs.remove(id);
        held -= size;
        left -= 1;
    }
}

impl Registry {
    /// Accepts a job for function `id` of `tenant`.
    pub fn submit_job(
        self: &Arc<Self>,
        tenant: &TenantId,
        id: &str,
        request: PendingRequest,
    ) -> Result<JobAccepted, ExecError> {
        let t = self
            .existing_tenant(tenant)
            .ok_or_else(|| ExecError::FunctionNotFound(id.to_string()))?;
        self.function(tenant, id)?;
        if t.is_frozen() {
            return Err(ExecError::TenantFrozen(tenant.to_string()));
        }
        let job_id = new_job_id();
        {
            let mut jobs = lock(&t.jobs);
            let (mut open, mut waiting) = (0, 0u64);
            for j in jobs.values().filter(|j| !j.info.status.is_finished()) {
                open += 1;
                waiting += j.request.as_ref().map_or(0, |r| r.body.len() as u64);
            }
            if open >= self.quotas.pending_jobs {
                return Err(ExecError::Quota(format!(
                    "the tenant has {open} jobs waiting or running, the most allowed"
                )));
            }
            if waiting + request.body.len() as u64 > self.quotas.pending_job_bytes {
                return Err(ExecError::Quota(format!(
                    "the tenant's waiting jobs hold {waiting} bytes of requests; this one's {} \
                     would pass the {} allowed",
                    request.body.len(),
                    self.quotas.pending_job_bytes
                )));
            }
            jobs.insert(
                job_id.clone(),
                JobRecord {
                    info: JobInfo {
                        id: job_id.clone(),
                        function_id: id.to_string(),
                        status: JobStatus::Pending,
                        created_at: now_rfc3339(),
                        finished_at: None,
                        result: None,
                        error: None,
                    },
                    request: Some(request),
                    finished: None,
                },
            );
        }
        self.counters.jobs_in_flight.fetch_add(1, Ordering::Relaxed);
        self.spawn_job(t, job_id.clone());
        Ok(JobAccepted { job_id })
    }

    /// Starts the task that runs a pending job (new, or restored from a
    /// snapshot).
    ///
    /// The job stays pending — cancellable, and taken along by a migration
    /// — until it holds, in this order, an instance slot of its function,
    /// one of the executor's job slots, and its tenant's admission. So a
    /// job that waits behind its own function's busy instances never holds
    /// a job slot that other tenants' jobs could use, and a migration waits
    /// only for jobs that really run.
    pub(crate) fn spawn_job(self: &Arc<Self>, t: Arc<Tenant>, job_id: String) {
        let registry = self.clone();
        tokio::spawn(async move {
            let (f, permit, slot, admitted) = loop {
                if t.removed.load(Ordering::Acquire) {
                    return; // the tenant left, its pending jobs with it
                }
                let Some(function_id) = lock(&t.jobs)
                    .get(&job_id)
                    .filter(|j| j.info.status == JobStatus::Pending)
                    .map(|j| j.info.function_id.clone())
                else {
                    return; // cancelled, or failed by the function's delete
                };
                let Some(f) = t.function(&function_id) else {
                    registry.finish_job(&t, &job_id, Err(ExecError::FunctionNotFound(function_id)));
                    return;
                };
                let permit = match registry.acquire(&f, false).await {
                    Ok(p) => p,
                    Err(e) => {
                        registry.finish_job(&t, &job_id, Err(e));
                        return;
                    }
                };
                let Ok(slot) = registry.job_slots.clone().acquire_owned().await else {
                    return;
                };
                let admitted = loop {
                    if t.removed.load(Ordering::Acquire) {
                        return;
                    }
                    match t.admit() {
                        Ok(a) => break a,
                        Err(_) => tokio::time::sleep(FROZEN_POLL).await,
                    }
                };
                // The function may have been replaced meanwhile: wait for
                // an instance of the new one.
                let current = t.function(&f.info.id).is_some_and(|g| Arc::ptr_eq(&g, &f));
                if current {
                    break (f, permit, slot, admitted);
                }
            };
            let request = {
                let mut jobs = lock(&t.jobs);
                let Some(job) = jobs
                    .get_mut(&job_id)
                    .filter(|j| j.info.status == JobStatus::Pending)
                else {
                    return;
                };
                let Some(request) = job.request.take() else {
                    return;
                };
                job.info.status = JobStatus::Running;
                request
            };
            let backend = t.backend.clone();
            let decode_backend = backend.clone();
            let decoded = tokio::task::spawn_blocking(move || {
                body::decode_request(
                    request.content_type.as_deref(),
                    request.body,
                    decode_backend.as_ref(),
                )
            })
            .await
            .unwrap_or_else(|e| Err(ExecError::Internal(format!("decode task failed: {e}"))));
            let outcome = match decoded {
                Ok(req) => match registry.run(&t, f, permit, req, admitted).await {
                    Ok(resp) => tokio::task::spawn_blocking(move || {
                        body::to_invoke_response(resp, backend.as_ref())
                    })
                    .await
                    .unwrap_or_else(|e| {
                        Err(ExecError::Internal(format!("encode task failed: {e}")))
                    }),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            drop(slot);
            registry.finish_job(&t, &job_id, outcome);
        });
    }

    /// Records a job's outcome. Only a job still waiting or running
    /// finishes, once: it then leaves the in-flight count.
    pub(crate) fn finish_job(
        &self,
        t: &Tenant,
        job_id: &str,
        outcome: Result<tensor_wasm_shared::api::InvokeResponse, ExecError>,
    ) {
        let mut jobs = lock(&t.jobs);
        let Some(job) = jobs
            .get_mut(job_id)
            .filter(|j| !j.info.status.is_finished())
        else {
            return;
        };
        job.request = None;
        job.info.finished_at = Some(now_rfc3339());
        job.finished = Some(Instant::now());
        match outcome {
            Ok(result) => {
                job.info.status = JobStatus::Succeeded;
                job.info.result = Some(result);
            }
            Err(e) => {
                job.info.status = JobStatus::Failed;
                job.info.error = Some(e.to_api());
            }
        }
        trim_finished(
            &mut jobs,
            self.limits.max_finished_jobs,
            self.quotas.finished_job_bytes,
        );
        self.counters.jobs_in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// One job of a tenant; another tenant's id is "not found".
    pub fn job(&self, tenant: &TenantId, id: &str) -> Result<JobInfo, ExecError> {
        self.existing_tenant(tenant)
            .and_then(|t| lock(&t.jobs).get(id).map(|j| j.info.clone()))
            .ok_or_else(|| ExecError::JobNotFound(id.to_string()))
    }

    /// A tenant's jobs, oldest first, optionally of one status.
    pub fn jobs(&self, tenant: &TenantId, status: Option<JobStatus>) -> Vec<JobInfo> {
        let Some(t) = self.existing_tenant(tenant) else {
            return Vec::new();
        };
        let mut jobs: Vec<JobInfo> = lock(&t.jobs)
            .values()
            .filter(|j| status.is_none_or(|s| j.info.status == s))
            .map(|j| j.info.clone())
            .collect();
        jobs.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        jobs
    }

    /// Cancels a pending job, or forgets a finished one; a running job
    /// cannot be cancelled.
    pub fn delete_job(&self, tenant: &TenantId, id: &str) -> Result<(), ExecError> {
        let t = self
            .existing_tenant(tenant)
            .ok_or_else(|| ExecError::JobNotFound(id.to_string()))?;
        let mut jobs = lock(&t.jobs);
        match jobs.get(id).map(|j| j.info.status) {
            None => Err(ExecError::JobNotFound(id.to_string())),
            Some(JobStatus::Running) => Err(ExecError::JobRunning(id.to_string())),
            Some(status) => {
                jobs.remove(id);
                if status == JobStatus::Pending {
                    self.counters.jobs_in_flight.fetch_sub(1, Ordering::Relaxed);
                }
                Ok(())
            }
        }
    }

    /// Forgets finished jobs past their retention, and the oldest finished
    /// ones of tenants over the count or byte cap.
    pub fn prune_jobs(&self) {
        let retention = self.limits.job_retention;
        for t in self.tenant_list() {
            let mut jobs = lock(&t.jobs);
            jobs.retain(|_, j| j.finished.is_none_or(|f| f.elapsed() < retention));
            trim_finished(
                &mut jobs,
                self.limits.max_finished_jobs,
                self.quotas.finished_job_bytes,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap as Map;
    use tensor_wasm_shared::api::{InvokeResponse, JsonTensor};

    fn finished(age_ms: u64, result_len: usize) -> JobRecord {
        let data = serde_json::value::RawValue::from_string(format!(
            "[{}]",
            vec!["1"; result_len].join(",")
        ))
        .unwrap();
        let outputs = Map::from([(
            "y".to_string(),
            JsonTensor {
                dtype: tensor_wasm_shared::DType::F32,
                shape: vec![result_len as u64],
                data,
            },
        )]);
        JobRecord {
            info: JobInfo {
                id: String::new(),
                function_id: String::new(),
                status: JobStatus::Succeeded,
                created_at: String::new(),
                finished_at: None,
                result: Some(InvokeResponse {
                    outputs,
                    raw_b64: None,
                }),
                error: None,
            },
            request: None,
            finished: Some(Instant::now() - Duration::from_millis(age_ms)),
        }
    }

    fn pending(body: usize) -> JobRecord {
        JobRecord {
            request: Some(PendingRequest {
                content_type: None,
                body: Bytes::from(vec![0; body]),
            }),
            finished: None,
            ..finished(0, 0)
        }
    }

    #[test]
    fn the_oldest_finished_jobs_go_first_and_the_newest_always_stays() {
        let mut jobs = BTreeMap::from([
            ("old".to_string(), finished(300, 1000)),
            ("mid".to_string(), finished(200, 1000)),
            ("new".to_string(), finished(100, 1000)),
            ("waiting".to_string(), pending(5000)),
        ]);
        let one = jobs["new"].held_bytes();
        assert!(one > 2000, "a 1000-element result takes {one} bytes");
        // Room for two results: the oldest goes.
        trim_finished(&mut jobs, 100, 2 * one + 10);
        assert_eq!(jobs.keys().collect::<Vec<_>>(), ["mid", "new", "waiting"]);
        // Room for none: the newest still stays, and pending jobs never go.
        trim_finished(&mut jobs, 100, 0);
        assert_eq!(jobs.keys().collect::<Vec<_>>(), ["new", "waiting"]);
        // The count cap too.
        let mut jobs = BTreeMap::from([
            ("a".to_string(), finished(3, 1)),
            ("b".to_string(), finished(2, 1)),
            ("c".to_string(), finished(1, 1)),
        ]);
        trim_finished(&mut jobs, 2, u64::MAX);
        assert_eq!(jobs.keys().collect::<Vec<_>>(), ["b", "c"]);
    }
}
