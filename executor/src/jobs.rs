//! Async jobs: `invoke-async`, `GET /jobs`, cancel, retention.
//!
//! A job is admitted like an invocation, but answers at once with its id and
//! runs in the background: it waits for an instance of its function, without
//! the queue cap of synchronous requests (the pending-job quota bounds it
//! instead), then for one of the executor's job slots (`job_concurrency`).
//! A tenant runs at most `running_jobs` at once (its quota, a quarter of
//! the executor's slots by default): the rest of its jobs wait without
//! holding an instance or a job slot, so that one tenant's slow jobs
//! leave slots to the others (`SECURITY.md`).
//! While its tenant is frozen for a migration a pending job waits; if the
//! tenant leaves this executor, the job travels in the snapshot and
//! runs where the tenant lands. Finished jobs are kept for `job_retention`,
//! at most `max_finished_jobs` per tenant and results of at most
//! `finished_job_bytes` (the newest always stays); waiting jobs hold at
//! most `pending_jobs` requests of at most `pending_job_bytes` together.
//!
//! The records and their in-flight count belong to the tenant's
//! [`JobTable`](crate::state::JobTable); this module is the task that runs
//! a job, and the registry's job routes.

use std::sync::Arc;
use std::time::Duration;

use tensor_wasm_shared::api::{JobAccepted, JobInfo, JobStatus};
use tensor_wasm_shared::{JobId, TenantId};

use crate::body::{self, RequestBody};
use crate::durable::Journal;
use crate::error::ExecError;
use crate::registry::{Registry, Target};
use crate::state::Tenant;
use crate::sync::random_bits;

/// How often a pending job of a frozen tenant looks again: 20 ms, small
/// next to a migration's pause.
const FROZEN_POLL: Duration = Duration::from_millis(20);

fn new_job_id() -> JobId {
    JobId::generated(random_bits())
}

impl Registry {
    /// Accepts a job for `target`: answered once the job (its function
    /// and request) is on disk, in its tenant's journal.
    pub async fn submit_job(
        self: &Arc<Self>,
        target: Target,
        request: RequestBody,
    ) -> Result<JobAccepted, ExecError> {
        let t = target.tenant;
        // Admitted work until the job is on disk: an export freezes the
        // tenant and waits for it, so an accepted job is in the snapshot.
        let _work = t.admit()?;
        let job_id = new_job_id();
        let record = request.clone();
        t.jobs().submit(
            job_id.clone(),
            &target.function.info.id,
            request,
            self.quotas.pending_jobs,
            self.quotas.pending_job_bytes,
        )?;
        let info = t.jobs().get(&job_id).map(|j| j.info.clone());
        if let Some(info) = info
            && let Err(e) = self.journal_job(&t, info, Some(record)).await
        {
            // Not durable: not accepted.
            let _ = t.jobs().remove(&job_id);
            return Err(e);
        }
        self.spawn_job(t, job_id.clone());
        Ok(JobAccepted { job_id })
    }

    /// Writes job `info` (with its waiting request) to `t`'s journal and
    /// waits until it is on disk.
    async fn journal_job(
        self: &Arc<Self>,
        t: &Arc<Tenant>,
        info: JobInfo,
        request: Option<RequestBody>,
    ) -> Result<(), ExecError> {
        self.journal_durably(t, move |j| j.job(&info, request.as_ref()))
            .await
    }

    /// Writes a frame to `t`'s journal with `write` (on the blocking pool)
    /// and waits until it is on disk.
    async fn journal_durably(
        self: &Arc<Self>,
        t: &Arc<Tenant>,
        write: impl FnOnce(&Journal) -> Result<u64, ExecError> + Send + 'static,
    ) -> Result<(), ExecError> {
        let journal = self.journal(t);
        let j = journal.clone();
        let n = tokio::task::spawn_blocking(move || write(&j))
            .await
            .map_err(ExecError::task("journal a job"))??;
        journal.durable(n).await
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
    pub(crate) fn spawn_job(self: &Arc<Self>, t: Arc<Tenant>, job_id: JobId) {
        let registry = self.clone();
        tokio::spawn(async move {
            // First the tenant's own cap, held for the run.
            let Ok(permit) = t.job_permits.clone().acquire_owned().await else {
                return;
            };
            let (f, slot, job_slot, admitted) = loop {
                if t.is_removed() {
                    return; // the tenant left, its pending jobs with it
                }
                let Some(function_id) = t.jobs().pending_function(&job_id) else {
                    return; // cancelled, or failed by the function's delete
                };
                let Some(f) = t.function(&function_id) else {
                    let gone = ExecError::FunctionNotFound(function_id.to_string()).to_api();
                    t.jobs().finish(&job_id, Err(gone));
                    return;
                };
                let slot = match f.pool.acquire().await {
                    Ok(s) => s,
                    Err(e) => {
                        t.jobs().finish(&job_id, Err(e.to_api()));
                        return;
                    }
                };
                let Ok(job_slot) = registry.job_slots.clone().acquire_owned().await else {
                    return;
                };
                let admitted = loop {
                    if t.is_removed() {
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
                    break (f, slot, job_slot, admitted);
                }
            };
            let Some(request) = t.jobs().start(&job_id) else {
                return;
            };
            // On disk as running before it runs: a restart fails it rather
            // than run it twice.
            let running = t.jobs().get(&job_id).map(|j| j.info.clone());
            if let Some(info) = running
                && let Err(e) = registry.journal_job(&t, info, None).await
            {
                t.jobs().finish(&job_id, Err(e.to_api()));
                return;
            }
            let target = Target {
                tenant: t.clone(),
                function: f,
            };
            // Admitted until its result is on disk and shown: an export
            // waits for it, so a snapshot never holds the job running
            // while it finishes here.
            let finishing = admitted.another();
            let outcome = registry
                .run(&target, slot, admitted, request, |resp, backend| {
                    body::to_invoke_response(resp, backend)
                })
                .await;
            drop((job_slot, permit));
            // Its result is on disk before anyone can read it, and is what
            // the journal is to hold of the job meanwhile: a checkpoint
            // that writes every job again writes this result, not the
            // running job readers still see.
            let Some(info) = t.jobs().finishing(&job_id, outcome.map_err(|e| e.to_api())) else {
                return;
            };
            if let Err(e) = registry.journal_job(&t, info.clone(), None).await {
                tracing::warn!(tenant = %t.id, job = %job_id, error = %e, "a job's result is not on disk: a crash would show it interrupted");
            }
            t.jobs().finish_as(info);
            drop(finishing);
        });
    }

    /// One job of a tenant; another tenant's id is "not found".
    pub fn job(&self, tenant: &TenantId, id: &str) -> Result<JobInfo, ExecError> {
        self.existing_tenant(tenant)
            .and_then(|t| t.jobs().get(id).map(|j| j.info.clone()))
            .ok_or_else(|| ExecError::JobNotFound(id.to_string()))
    }

    /// A tenant's jobs, oldest first, optionally of one status.
    pub fn jobs(&self, tenant: &TenantId, status: Option<JobStatus>) -> Vec<JobInfo> {
        let Some(t) = self.existing_tenant(tenant) else {
            return Vec::new();
        };
        let mut jobs: Vec<JobInfo> = t
            .jobs()
            .records()
            .filter(|j| status.is_none_or(|s| j.info.status == s))
            .map(|j| j.info.clone())
            .collect();
        jobs.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        jobs
    }

    /// Cancels a pending job, or forgets a finished one; a running job
    /// cannot be cancelled.
    pub async fn delete_job(
        self: &Arc<Self>,
        tenant: &TenantId,
        id: &str,
    ) -> Result<(), ExecError> {
        let t = self
            .existing_tenant(tenant)
            .ok_or_else(|| ExecError::JobNotFound(id.to_string()))?;
        // Admitted work until the removal is on disk: an export waits for
        // it, and a frozen tenant (its snapshot taken, the job in it)
        // refuses it.
        let _work = t.admit()?;
        let info = t.jobs().get(id).map(|j| j.info.clone());
        t.jobs().remove(id)?;
        let Some(info) = info else {
            return Ok(());
        };
        self.journal_durably(&t, move |j| j.job_gone(&info)).await
    }

    /// Forgets finished jobs past their retention, and the oldest finished
    /// ones of tenants over the count or byte cap.
    pub fn prune_jobs(&self) {
        for t in self.tenant_list() {
            t.jobs().prune(self.limits.job_retention);
        }
    }
}
