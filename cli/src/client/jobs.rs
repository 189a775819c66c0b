//! `tensor-wasm jobs`: follow (`GET /jobs/{id}`), list (`GET /jobs`) and
//! cancel (`DELETE /jobs/{id}`) async jobs.
//!
//! Waiting polls with a backoff from 50 ms to 1 s: a short job is seen
//! finishing within a few tens of milliseconds, and a long one costs one
//! request a second.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tensor_wasm_shared::api::{JobInfo, JobList, JobStatus};

use super::http::{Body, Endpoint, encode};
use super::{Conn, output};

/// First pause between polls of a job: 50 ms.
const FIRST_POLL: Duration = Duration::from_millis(50);
/// Longest pause between polls: 1 s.
const MAX_POLL: Duration = Duration::from_secs(1);

/// Flags of `tensor-wasm jobs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show a job; with --wait, once it has finished.
    Get {
        id: String,
        /// Poll until the job has succeeded or failed (a failed job then
        /// exits non-zero).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        wait_timeout_secs: u64,
    },
    /// List the tenant's jobs.
    Ls {
        /// Only jobs in this state.
        #[arg(long, value_parser = ["pending", "running", "succeeded", "failed"])]
        status: Option<String>,
        /// Print `{"jobs": [...]}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job that has not started.
    Cancel { id: String },
}

pub fn status_name(s: JobStatus) -> &'static str {
    match s {
        JobStatus::Pending => "pending",
        JobStatus::Running => "running",
        JobStatus::Succeeded => "succeeded",
        JobStatus::Failed => "failed",
    }
}

/// Polls job `id` until it has finished, for at most `timeout`.
pub fn wait(ep: &Endpoint, id: &str, timeout: Duration) -> anyhow::Result<JobInfo> {
    let start = Instant::now();
    let mut pause = FIRST_POLL;
    let spinner = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        spinner.set_style(style);
    }
    spinner.enable_steady_tick(Duration::from_millis(100));
    let path = format!("/jobs/{}", encode(id));
    let result = loop {
        let job: JobInfo = match ep.get_json(&path) {
            Ok(job) => job,
            Err(e) => break Err(e.into()),
        };
        if job.status.is_finished() {
            break Ok(job);
        }
        let waited = start.elapsed();
        if waited >= timeout {
            break Err(anyhow!(
                "job {id} is still {} after {} s; keep following it with `tensor-wasm jobs get {id} --wait`",
                status_name(job.status),
                waited.as_secs()
            ));
        }
        spinner.set_message(format!("job {id}: {}", status_name(job.status)));
        std::thread::sleep(pause.min(timeout - waited));
        pause = (pause * 2).min(MAX_POLL);
    };
    spinner.finish_and_clear();
    result
}

/// The error a failed job ends a command with.
pub fn failure(job: &JobInfo) -> anyhow::Error {
    match &job.error {
        Some(e) => anyhow!("job {} failed: {e}", job.id),
        None => anyhow!("job {} failed", job.id),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let ep = args.conn.public()?;
    match args.command {
        Command::Get {
            id, wait: false, ..
        } => {
            let job: JobInfo = ep.get_json(&format!("/jobs/{}", encode(&id)))?;
            output::print_json(&job)?;
        }
        Command::Get {
            id,
            wait: true,
            wait_timeout_secs,
        } => {
            let job = wait(&ep, &id, Duration::from_secs(wait_timeout_secs))?;
            output::print_json(&job)?;
            if job.status == JobStatus::Failed {
                return Err(failure(&job));
            }
        }
        Command::Ls { status, json } => {
            let path = match &status {
                Some(s) => format!("/jobs?status={s}"),
                None => "/jobs".to_string(),
            };
            let list: JobList = ep.get_json(&path)?;
            if json {
                return Ok(output::print_json(&list)?);
            }
            let rows: Vec<Vec<String>> = list
                .jobs
                .iter()
                .map(|j| {
                    vec![
                        j.id.to_string(),
                        j.function_id.to_string(),
                        status_name(j.status).to_string(),
                        j.created_at.clone(),
                        j.finished_at.clone().unwrap_or_else(|| "-".into()),
                        j.error
                            .as_ref()
                            .map_or_else(|| "-".into(), |e| e.code.to_string()),
                    ]
                })
                .collect();
            output::print(&output::table(
                &["ID", "FUNCTION", "STATUS", "CREATED", "FINISHED", "ERROR"],
                &rows,
            ))?;
        }
        Command::Cancel { id } => {
            ep.call("DELETE", &format!("/jobs/{}", encode(&id)), &[], Body::None)?;
            output::println(&format!("cancelled {id}"))?;
        }
    }
    Ok(())
}
