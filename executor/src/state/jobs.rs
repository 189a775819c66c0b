//! A tenant's job table: its records and, kept with them, how many are
//! unfinished.
//!
//! A record moves `pending → running → succeeded | failed`, or
//! `pending → failed` (its function deleted), or leaves the table while
//! pending (cancelled) or finished (forgotten, pruned). Each move is one
//! method here, and each keeps `in_flight` equal to the number of records
//! that are pending or running.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tensor_wasm_shared::api::{InvokeResponse, JobInfo, JobStatus};
use tensor_wasm_shared::{ApiError, FunctionId, JobId};

use crate::body::RequestBody;
use crate::error::ExecError;
use crate::sync::now_rfc3339;

/// One job of a tenant.
#[derive(Clone, Debug)]
pub struct JobRecord {
    pub info: JobInfo,
    /// The request, while the job is pending.
    pub request: Option<RequestBody>,
    /// When it finished.
    pub finished: Option<Finished>,
    /// The record it finishes as, while that goes to disk: what its
    /// tenant's journal is to hold of it, though readers still see it
    /// running ([`JobTable::finishing`]).
    pub finishing: Option<JobInfo>,
}

/// When a job finished: its place in the table's order of finishes (what
/// "oldest" means when trimming, exact even for two jobs that finish within
/// one tick of the clock), then the instant (for retention).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finished {
    pub seq: u64,
    pub at: Instant,
}

impl JobRecord {
    /// Bytes the job holds: its waiting request, or its result.
    fn held_bytes(&self) -> u64 {
        let request = self.request.as_ref().map_or(0, |r| r.body.len());
        let result = self.info.result.as_ref().map_or(0, |r| r.json_bytes());
        (request + result) as u64
    }
}

/// How many finished jobs a table keeps: at most `count`, their results at
/// most `bytes` together (the newest always stays).
#[derive(Clone, Copy, Debug)]
pub struct JobCaps {
    /// Finished jobs kept.
    pub count: usize,
    /// Bytes of finished jobs' results kept.
    pub bytes: u64,
    /// Jobs running at once (`TenantQuotas::running_jobs`).
    pub running: usize,
}

/// A tenant's jobs.
#[derive(Debug)]
pub struct JobTable {
    records: BTreeMap<JobId, JobRecord>,
    /// Records pending or running.
    in_flight: usize,
    /// Jobs finished so far: the next [`Finished::seq`].
    finishes: u64,
    caps: JobCaps,
}

impl JobTable {
    pub fn new(caps: JobCaps) -> JobTable {
        JobTable {
            records: BTreeMap::new(),
            in_flight: 0,
            finishes: 0,
            caps,
        }
    }

    /// Stamps a finish now.
    fn finished_now(&mut self) -> Finished {
        self.finishes += 1;
        Finished {
            seq: self.finishes,
            at: Instant::now(),
        }
    }

    /// Jobs pending or running.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Waiting requests: how many, and their bytes together.
    fn waiting(&self) -> (usize, u64) {
        self.records
            .values()
            .filter(|j| !j.info.status.is_finished())
            .fold((0, 0), |(n, b), j| {
                (
                    n + 1,
                    b + j.request.as_ref().map_or(0, |r| r.body.len() as u64),
                )
            })
    }

    /// Adds a pending job for `function_id`, within `max_open` jobs waiting
    /// or running and `max_bytes` of waiting requests.
    pub fn submit(
        &mut self,
        job_id: JobId,
        function_id: &FunctionId,
        request: RequestBody,
        max_open: usize,
        max_bytes: u64,
    ) -> Result<(), ExecError> {
        let (open, waiting) = self.waiting();
        if open >= max_open {
            return Err(ExecError::Quota(format!(
                "the tenant has {open} jobs waiting or running, the most allowed"
            )));
        }
        if waiting + request.body.len() as u64 > max_bytes {
            return Err(ExecError::Quota(format!(
                "the tenant's waiting jobs hold {waiting} bytes of requests; this one's {} \
                 would pass the {max_bytes} allowed",
                request.body.len(),
            )));
        }
        let info = JobInfo {
            id: job_id,
            function_id: function_id.clone(),
            status: JobStatus::Pending,
            created_at: now_rfc3339(),
            finished_at: None,
            result: None,
            error: None,
        };
        self.insert(JobRecord {
            info,
            request: Some(request),
            finished: None,
            finishing: None,
        });
        Ok(())
    }

    /// Puts back a record a snapshot carried. One that was not finished
    /// is pending again: it runs here. Returns whether it is pending.
    pub fn restore(&mut self, mut info: JobInfo, request: Option<RequestBody>) -> bool {
        let finished = info.status.is_finished();
        if !finished {
            // A job caught running cannot exist (exports drain first);
            // anything unfinished runs again here.
            info.status = JobStatus::Pending;
        }
        let stamp = finished.then(|| self.finished_now());
        self.insert(JobRecord {
            finished: stamp,
            request: if finished { None } else { request },
            info,
            finishing: None,
        });
        !finished
    }

    fn insert(&mut self, record: JobRecord) {
        if !record.info.status.is_finished() {
            self.in_flight += 1;
        }
        if let Some(old) = self.records.insert(record.info.id.clone(), record)
            && !old.info.status.is_finished()
        {
            self.in_flight -= 1;
        }
    }

    /// The function of a job still pending.
    pub fn pending_function(&self, job_id: &str) -> Option<FunctionId> {
        self.records
            .get(job_id)
            .filter(|j| j.info.status == JobStatus::Pending)
            .map(|j| j.info.function_id.clone())
    }

    /// Marks a pending job running and hands over its request.
    pub fn start(&mut self, job_id: &str) -> Option<RequestBody> {
        let job = self
            .records
            .get_mut(job_id)
            .filter(|j| j.info.status == JobStatus::Pending)?;
        let request = job.request.take()?;
        job.info.status = JobStatus::Running;
        Some(request)
    }

    /// Records a job's outcome. Only a job still pending or running
    /// finishes, once; true if this call finished it.
    pub fn finish(&mut self, job_id: &str, outcome: Result<InvokeResponse, ApiError>) -> bool {
        match self.finished_info(job_id, outcome) {
            Some(info) => self.finish_as(info),
            None => false,
        }
    }

    /// The record job `job_id` becomes when it finishes with `outcome`,
    /// if it is pending or running: what is made durable before
    /// [`finish_as`](Self::finish_as) shows it.
    pub fn finished_info(
        &self,
        job_id: &str,
        outcome: Result<InvokeResponse, ApiError>,
    ) -> Option<JobInfo> {
        let job = self
            .records
            .get(job_id)
            .filter(|j| !j.info.status.is_finished())?;
        let mut info = job.info.clone();
        info.finished_at = Some(now_rfc3339());
        match outcome {
            Ok(result) => {
                info.status = JobStatus::Succeeded;
                info.result = Some(result);
            }
            Err(e) => {
                info.status = JobStatus::Failed;
                info.error = Some(e);
            }
        }
        Some(info)
    }

    /// Finishes the job `info` names as `info` (from
    /// [`finished_info`](Self::finished_info)), unless it finished already;
    /// true if this call finished it.
    pub fn finish_as(&mut self, info: JobInfo) -> bool {
        if self
            .records
            .get(info.id.as_str())
            .is_none_or(|j| j.info.status.is_finished())
        {
            return false;
        }
        let stamp = self.finished_now();
        let Some(job) = self.records.get_mut(info.id.as_str()) else {
            return false;
        };
        job.request = None;
        job.finished = Some(stamp);
        job.finishing = None;
        job.info = info;
        self.in_flight -= 1;
        self.trim();
        true
    }

    /// Fails every pending job of `function_id` with `error` (its function
    /// was deleted).
    pub fn fail_pending_of(&mut self, function_id: &str, error: &ApiError) {
        let waiting: Vec<JobId> = self
            .records
            .values()
            .filter(|j| {
                j.info.function_id.as_str() == function_id && j.info.status == JobStatus::Pending
            })
            .map(|j| j.info.id.clone())
            .collect();
        for id in waiting {
            self.finish(&id, Err(error.clone()));
        }
    }

    /// Cancels a pending job, or forgets a finished one; a running job
    /// cannot be cancelled.
    pub fn remove(&mut self, job_id: &str) -> Result<(), ExecError> {
        match self.records.get(job_id).map(|j| j.info.status) {
            None => Err(ExecError::JobNotFound(job_id.to_string())),
            Some(JobStatus::Running) => Err(ExecError::JobRunning(job_id.to_string())),
            Some(status) => {
                self.records.remove(job_id);
                if status == JobStatus::Pending {
                    self.in_flight -= 1;
                }
                Ok(())
            }
        }
    }

    /// Forgets every job (the tenant leaves this executor).
    pub fn clear(&mut self) {
        self.records.clear();
        self.in_flight = 0;
    }

    /// One job.
    pub fn get(&self, job_id: &str) -> Option<&JobRecord> {
        self.records.get(job_id)
    }

    /// As [`finished_info`](Self::finished_info), and kept as what the
    /// journal is to hold of the job ([`journal_records`](Self::journal_records))
    /// until [`finish_as`](Self::finish_as) shows it: its result goes to
    /// disk before any reader sees it.
    pub fn finishing(
        &mut self,
        job_id: &str,
        outcome: Result<InvokeResponse, ApiError>,
    ) -> Option<JobInfo> {
        let info = self.finished_info(job_id, outcome)?;
        self.records.get_mut(job_id)?.finishing = Some(info.clone());
        Some(info)
    }

    /// Every job as its tenant's journal is to hold it: as readers see it,
    /// or as it finishes if its result is on its way to disk. Each is as
    /// new as the job's latest frame, or newer.
    pub fn journal_records(&self) -> Vec<(JobInfo, Option<RequestBody>)> {
        self.records
            .values()
            .map(|j| match &j.finishing {
                Some(info) => (info.clone(), None),
                None => (j.info.clone(), j.request.clone()),
            })
            .collect()
    }

    /// Every job, by id.
    pub fn records(&self) -> impl Iterator<Item = &JobRecord> {
        self.records.values()
    }

    /// Forgets finished jobs older than `retention`, then trims to the caps.
    pub fn prune(&mut self, retention: Duration) {
        self.records
            .retain(|_, j| j.finished.is_none_or(|f| f.at.elapsed() < retention));
        self.trim();
    }

    /// Forgets the oldest finished jobs until at most `caps.count` are left
    /// and their results hold at most `caps.bytes`. The newest finished job
    /// always stays, so a client polling for the job that just finished
    /// finds it.
    fn trim(&mut self) {
        let JobCaps { count, bytes, .. } = self.caps;
        let (mut left, mut held) = (0usize, 0u64);
        for j in self.records.values().filter(|j| j.finished.is_some()) {
            left += 1;
            held += j.held_bytes();
        }
        if left <= count && held <= bytes {
            return; // the usual case: nothing to sort
        }
        let mut finished: Vec<(Finished, JobId, u64)> = self
            .records
            .iter()
            .filter_map(|(id, j)| j.finished.map(|f| (f, id.clone(), j.held_bytes())))
            .collect();
        finished.sort();
        for (_, id, size) in &finished {
            if left <= 1 || (left <= count && held <= bytes) {
                break;
            }
            self.records.remove(id);
            held -= size;
            left -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap as Map;
    use tensor_wasm_shared::ErrorCode;
    use tensor_wasm_shared::api::JsonTensor;

    fn result(len: usize) -> InvokeResponse {
        let data =
            serde_json::value::RawValue::from_string(format!("[{}]", vec!["1"; len].join(",")))
                .unwrap();
        let outputs = Map::from([(
            "y".to_string(),
            JsonTensor {
                dtype: tensor_wasm_shared::DType::F32,
                shape: vec![len as u64],
                data,
            },
        )]);
        InvokeResponse {
            outputs,
            raw_b64: None,
        }
    }

    fn body(len: usize) -> RequestBody {
        RequestBody {
            content_type: None,
            body: bytes::Bytes::from(vec![0; len]),
        }
    }

    fn jid(id: &str) -> JobId {
        JobId::new(id).unwrap()
    }

    fn fid() -> FunctionId {
        FunctionId::new("f").unwrap()
    }

    fn table(count: usize, bytes: u64) -> JobTable {
        JobTable::new(JobCaps {
            count,
            bytes,
            running: 1,
        })
    }

    /// Submits, starts and finishes `id` with a result of `len` elements.
    fn done(t: &mut JobTable, id: &str, len: usize) {
        t.submit(jid(id), &fid(), body(0), usize::MAX, u64::MAX)
            .unwrap();
        t.start(id).unwrap();
        assert!(t.finish(id, Ok(result(len))));
    }

    fn ids(t: &JobTable) -> Vec<&str> {
        t.records().map(|j| j.info.id.as_str()).collect()
    }

    /// A job whose result is on its way to disk shows running to readers,
    /// but the journal's records (what a checkpoint writes again) hold its
    /// result; once shown, both agree.
    #[test]
    fn a_finishing_job_is_journaled_as_it_finishes_before_it_is_shown() {
        let mut t = table(8, u64::MAX);
        t.submit(jid("a"), &fid(), body(4), usize::MAX, u64::MAX)
            .unwrap();
        t.submit(jid("b"), &fid(), body(4), usize::MAX, u64::MAX)
            .unwrap();
        t.start("a").unwrap();
        let info = t.finishing("a", Ok(result(3))).unwrap();
        assert_eq!(info.status, JobStatus::Succeeded);
        assert_eq!(t.get("a").unwrap().info.status, JobStatus::Running);
        let journaled = |t: &JobTable, id: &str| {
            t.journal_records()
                .into_iter()
                .find(|(i, _)| i.id.as_str() == id)
                .unwrap()
        };
        let (a, request) = journaled(&t, "a");
        assert_eq!((a.status, request.is_none()), (JobStatus::Succeeded, true));
        assert_eq!(a.result, info.result);
        // A pending job is journaled with its request.
        let (b, request) = journaled(&t, "b");
        assert_eq!(b.status, JobStatus::Pending);
        assert_eq!(request.map(|r| r.body.len()), Some(4));

        assert!(t.finish_as(info.clone()));
        assert_eq!(t.get("a").unwrap().info, info);
        assert!(t.get("a").unwrap().finishing.is_none());
        assert_eq!(journaled(&t, "a").0, info);
    }

    #[test]
    fn the_oldest_finished_jobs_go_first_and_the_newest_always_stays() {
        let one = JobRecord {
            info: JobInfo {
                id: jid("x"),
                function_id: fid(),
                status: JobStatus::Succeeded,
                created_at: String::new(),
                finished_at: None,
                result: Some(result(1000)),
                error: None,
            },
            request: None,
            finished: None,
            finishing: None,
        }
        .held_bytes();
        assert!(one > 2000, "a 1000-element result takes {one} bytes");
        // Room for two results: the oldest goes.
        let mut t = table(100, 2 * one + 10);
        t.submit(jid("waiting"), &fid(), body(5000), usize::MAX, u64::MAX)
            .unwrap();
        for id in ["old", "mid", "new"] {
            done(&mut t, id, 1000);
        }
        assert_eq!(ids(&t), ["mid", "new", "waiting"]);
        // Room for none: the newest still stays, and pending jobs never go.
        t.caps.bytes = 0;
        t.prune(Duration::from_secs(3600));
        assert_eq!(ids(&t), ["new", "waiting"]);
        // The count cap too.
        let mut t = table(2, u64::MAX);
        for id in ["a", "b", "c"] {
            done(&mut t, id, 1);
        }
        assert_eq!(ids(&t), ["b", "c"]);
    }

    #[test]
    fn in_flight_counts_exactly_the_unfinished_jobs() {
        let mut t = table(100, u64::MAX);
        let unfinished =
            |t: &JobTable| t.records().filter(|j| !j.info.status.is_finished()).count();
        for id in ["a", "b", "c", "d"] {
            t.submit(jid(id), &fid(), body(1), 10, 100).unwrap();
        }
        assert_eq!(t.in_flight(), 4);
        t.start("a").unwrap();
        assert!(t.finish("a", Ok(result(1))));
        assert!(!t.finish("a", Ok(result(1))), "a job finishes once");
        t.remove("b").unwrap(); // cancelled while pending
        t.start("c").unwrap();
        assert_eq!(
            t.remove("c").unwrap_err().code(),
            ErrorCode::JobRunning,
            "a running job cannot be cancelled"
        );
        let gone = ApiError::new(ErrorCode::FunctionNotFound, "deleted");
        t.fail_pending_of("f", &gone);
        assert_eq!(t.get("d").unwrap().info.status, JobStatus::Failed);
        assert_eq!(t.in_flight(), unfinished(&t));
        assert_eq!(t.in_flight(), 1, "only c runs");
        // A restored record replacing a live one moves the count once.
        let mut info = t.get("c").unwrap().info.clone();
        info.status = JobStatus::Running;
        assert!(t.restore(info, Some(body(1))));
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.get("c").unwrap().info.status, JobStatus::Pending);
        t.clear();
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn submission_holds_the_quotas() {
        let mut t = table(100, u64::MAX);
        t.submit(jid("a"), &fid(), body(60), 2, 100).unwrap();
        let bytes = t.submit(jid("b"), &fid(), body(41), 2, 100).unwrap_err();
        assert_eq!(bytes.code(), ErrorCode::QuotaExceeded);
        t.submit(jid("b"), &fid(), body(40), 2, 100).unwrap();
        let count = t.submit(jid("c"), &fid(), body(0), 2, 100).unwrap_err();
        assert_eq!(count.code(), ErrorCode::QuotaExceeded);
        assert_eq!(t.in_flight(), 2);
    }
}
