//! One tenant must not hurt another (`SECURITY.md`, "Tenants and each
//! other"): shares of an executor, tested against real executor processes.

use crate::harness::{ExecutorProcess, SPINNER, job_of, register_on, submit_job, wait_job_of};

/// A tenant's slow jobs take at most its share of the executor's job
/// slots: another tenant's job runs, and finishes, while they spin.
#[test]
fn one_tenants_slow_jobs_leave_job_slots_to_others() {
    let dir = tempfile::tempdir().unwrap();
    let ex = ExecutorProcess::start_with(
        "cpu-shares",
        dir.path(),
        &["--job-concurrency", "2", "--tenant-running-jobs", "1"],
    );
    let spinner = wat::parse_str(SPINNER).unwrap();
    // Two instances: its own pool would let two of its jobs run at once,
    // taking both of the executor's job slots, but for its cap.
    let hog = register_on(
        &ex,
        "hog",
        "spinner",
        &spinner,
        r#"{"deadline_ms": 20000, "max_instances": 2}"#,
    );
    let quick = register_on(&ex, "quick", "spinner", &spinner, "{}");
    let hogs: Vec<String> = (0..3).map(|_| submit_job(&ex, "hog", &hog, 1)).collect();
    wait_job_of(&ex, "hog", &hogs[0], "running");
    let mine = submit_job(&ex, "quick", &quick, 0);
    wait_job_of(&ex, "quick", &mine, "succeeded");
    let statuses: Vec<String> = hogs
        .iter()
        .map(|h| {
            job_of(&ex, "hog", h)["status"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // None of the spinners has reached its deadline: the other tenant's
    // job did not wait for one of them to end.
    assert_eq!(
        statuses.iter().filter(|s| *s == "running").count(),
        1,
        "one at a time: {statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| *s == "pending").count(),
        2,
        "{statuses:?}"
    );
}
