//! What the proxy's audit log says about an upgrade (`docs/UPGRADE.md`,
//! "Verification"): whether the request ids the proxy answered during it
//! are gapless ([`gaps`], `docs/AUDIT-LOG.md`, "Request ids"), and whether
//! each moved tenant answered after its move ([`answered_after`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tensor_wasm_shared::audit::{AuditRecord, Outcome};

/// The records of an audit log, split where the upgrade began.
#[derive(Debug, Default)]
pub struct Records {
    pub before: Vec<AuditRecord>,
    pub after: Vec<AuditRecord>,
}

/// The records of the log of unauthenticated requests beside the log at
/// `path` (`docs/AUDIT-LOG.md`): its live file and the one rotated last.
/// Lines that do not parse, and files that are not there, are skipped.
pub fn unauthenticated(path: &Path) -> Vec<AuditRecord> {
    let mut live = path.as_os_str().to_owned();
    live.push(".unauthenticated");
    let mut rotated = live.clone();
    rotated.push(".1");
    [rotated, live]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .flat_map(|bytes| lines(whole_lines(&bytes)))
        .collect()
}

/// The live file's length: where the upgrade's records will begin.
pub fn offset(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// The records of the log at `path`, split at byte `offset` of the file
/// that was live when the upgrade began, read once and then as they are
/// appended ([`Tail::refresh`]).
#[derive(Debug)]
pub struct Tail {
    path: PathBuf,
    offset: u64,
    /// Bytes of the live file read, up to its last whole record.
    read: u64,
    pub records: Records,
}

impl Tail {
    /// Reads the log. If it rotated since the upgrade began, the file that
    /// was live then is now `<path>.1` and everything in the live one is
    /// after. Lines that do not parse are skipped.
    pub fn open(path: &Path, offset: u64) -> std::io::Result<Tail> {
        let live = std::fs::read(path)?;
        let whole = whole_lines(&live);
        let (was_live, now) = if (live.len() as u64) < offset {
            let mut rotated = path.as_os_str().to_owned();
            rotated.push(".1");
            (std::fs::read(PathBuf::from(rotated))?, whole)
        } else {
            (whole.to_vec(), &[][..])
        };
        let at = (offset as usize).min(was_live.len());
        let mut after = lines(&was_live[at..]);
        after.extend(lines(now));
        Ok(Tail {
            path: path.to_path_buf(),
            offset,
            read: whole.len() as u64,
            records: Records {
                before: lines(&was_live[..at]),
                after,
            },
        })
    }

    /// Adds the records appended since the last read (a record being
    /// written waits for the next). A rotation meanwhile reads it all
    /// again.
    pub fn refresh(&mut self) -> std::io::Result<()> {
        let mut file = std::fs::File::open(&self.path)?;
        if file.metadata()?.len() < self.read {
            *self = Tail::open(&self.path, self.offset)?;
            return Ok(());
        }
        file.seek(SeekFrom::Start(self.read))?;
        let mut new = Vec::new();
        file.read_to_end(&mut new)?;
        let whole = whole_lines(&new);
        self.records.after.extend(lines(whole));
        self.read += whole.len() as u64;
        Ok(())
    }
}

/// `bytes` up to and including its last newline.
fn whole_lines(bytes: &[u8]) -> &[u8] {
    bytes
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(&[][..], |i| &bytes[..=i])
}

fn lines(bytes: &[u8]) -> Vec<AuditRecord> {
    bytes
        .split(|&b| b == b'\n')
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect()
}

/// A proxy-made request id: (process prefix, sequence number). Ids a
/// client chose and the unaudited `…q<n>` ones are not.
fn sequence(id: &str) -> Option<(&str, u32)> {
    if id.len() != 24 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((&id[..16], u32::from_str_radix(&id[16..], 16).ok()?))
}

/// Each proxy process's ids missing between the lowest and the highest it
/// recorded after the upgrade began (earlier records fill in the ids of
/// requests that finished before it began, and `elsewhere` those recorded
/// in the log of unauthenticated requests): one line per process with a
/// gap, naming the missing ids.
pub fn gaps(records: &Records, elsewhere: &[AuditRecord]) -> Vec<String> {
    let mut seen: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    let mut range: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    for r in &records.after {
        if let Some((p, n)) = sequence(&r.request_id) {
            seen.entry(p).or_default().insert(n);
            let e = range.entry(p).or_insert((n, n));
            *e = (e.0.min(n), e.1.max(n));
        }
    }
    for r in records.before.iter().chain(elsewhere) {
        if let Some((p, n)) = sequence(&r.request_id)
            && let Some(set) = seen.get_mut(p)
        {
            set.insert(n);
        }
    }
    let mut problems = Vec::new();
    for (prefix, (lo, hi)) in range {
        let set = &seen[prefix];
        let missing: Vec<u32> = (lo..=hi).filter(|n| !set.contains(n)).collect();
        if !missing.is_empty() {
            let shown: Vec<String> = missing
                .iter()
                .take(5)
                .map(|n| format!("{prefix}{n:08x}"))
                .collect();
            problems.push(format!(
                "the audit log misses {} of the request ids proxy {prefix} answered ({}{})",
                missing.len(),
                shown.join(", "),
                if missing.len() > 5 { ", …" } else { "" }
            ));
        }
    }
    problems
}

/// The moved tenants sorted by what the log shows after their move.
#[derive(Debug, Default, PartialEq)]
pub struct Answered {
    /// A public request that arrived after the move was answered without
    /// a 5xx.
    pub answered: Vec<String>,
    /// Requests arrived after the move, and every one was answered 5xx.
    pub failing: Vec<String>,
    /// No request arrived after the move.
    pub idle: Vec<String>,
}

/// Sorts each `(tenant, when its move finished)` by the public requests
/// that arrived after it.
pub fn answered_after(after: &[AuditRecord], moved: &[(String, SystemTime)]) -> Answered {
    let mut out = Answered::default();
    for (tenant, at) in moved {
        let mut any = false;
        let mut ok = false;
        for r in after.iter().filter(|r| {
            r.listener == "public"
                && r.tenant.as_deref() == Some(tenant.as_str())
                && humantime::parse_rfc3339(&r.time).is_ok_and(|t| t >= *at)
        }) {
            any = true;
            ok |= r.outcome != Outcome::ServerError;
        }
        let list = match (any, ok) {
            (_, true) => &mut out.answered,
            (true, false) => &mut out.failing,
            (false, _) => &mut out.idle,
        };
        list.push(tenant.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(id: &str, tenant: &str, time: SystemTime, status: u16) -> AuditRecord {
        AuditRecord {
            time: humantime::format_rfc3339_millis(time).to_string(),
            request_id: id.into(),
            listener: "public".into(),
            tenant: Some(tenant.into()),
            token_id: None,
            action: "functions.invoke".into(),
            resource: "/functions/f/invoke".into(),
            status,
            outcome: Outcome::of_status(status),
            latency_ms: 1.0,
            remote: None,
            stream: None,
        }
    }

    const P: &str = "00000000deadbeef";
    const Q: &str = "0123456789abcdef";

    fn id(prefix: &str, n: u32) -> String {
        format!("{prefix}{n:08x}")
    }

    #[test]
    fn earlier_records_fill_in_and_a_missing_id_is_named() {
        let t = SystemTime::now();
        // Ids 1 and 3 finished before the upgrade began, 0, 2, 4, 5 after;
        // the next process answered 0..=2.
        let mut r = Records {
            before: vec![
                record(&id(P, 1), "a", t, 200),
                record(&id(P, 3), "a", t, 200),
            ],
            after: [0, 2, 4, 5]
                .iter()
                .map(|&n| record(&id(P, n), "a", t, 200))
                .chain((0..3).map(|n| record(&id(Q, n), "a", t, 200)))
                .collect(),
        };
        // A client's own id and an unaudited one are not in the sequence.
        r.after.push(record("my-own-id", "a", t, 200));
        r.after.push(record(&format!("{P}q7"), "a", t, 200));
        assert_eq!(gaps(&r, &[]), Vec::<String>::new());
        let three = r.before.pop().unwrap();
        let problems = gaps(&r, &[]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains(&format!("misses 1 of the request ids proxy {P}")));
        assert!(problems[0].contains(&id(P, 3)));
        // Answered 401, it is in the log of unauthenticated requests.
        let refused = AuditRecord {
            status: 401,
            ..three
        };
        assert_eq!(gaps(&r, &[refused]), Vec::<String>::new());
    }

    #[test]
    fn tenants_are_answered_failing_or_idle_after_their_move() {
        let moved_at = SystemTime::now();
        let before = moved_at - Duration::from_secs(1);
        let after = moved_at + Duration::from_secs(1);
        let records = vec![
            record(&id(P, 0), "a", before, 200),
            record(&id(P, 1), "a", after, 500),
            record(&id(P, 2), "a", after, 200),
            record(&id(P, 3), "b", after, 502),
            record(&id(P, 4), "c", before, 200),
        ];
        let moved: Vec<(String, SystemTime)> = ["a", "b", "c"]
            .iter()
            .map(|t| (t.to_string(), moved_at))
            .collect();
        assert_eq!(
            answered_after(&records, &moved),
            Answered {
                answered: vec!["a".into()],
                failing: vec!["b".into()],
                idle: vec!["c".into()],
            }
        );
    }

    #[test]
    fn a_rotation_since_the_start_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let t = SystemTime::now();
        let line = |n| {
            let mut l = serde_json::to_vec(&record(&id(P, n), "a", t, 200)).unwrap();
            l.push(b'\n');
            l
        };
        let mut old = line(0);
        let offset = old.len() as u64;
        old.extend(line(1));
        std::fs::write(dir.path().join("audit.log.1"), &old).unwrap();
        // The live file is shorter than the offset: it rotated, and what
        // it holds is after; a record being written waits for its end.
        let two = line(2);
        std::fs::write(&path, &two[..10]).unwrap();
        let mut tail = Tail::open(&path, offset).unwrap();
        let r = &tail.records;
        assert_eq!((r.before.len(), r.after.len()), (1, 1));
        assert_eq!(r.after[0].request_id, id(P, 1));
        std::fs::write(&path, &two).unwrap();
        tail.refresh().unwrap();
        assert_eq!(tail.records.after.len(), 2);
        assert_eq!(tail.records.after[1].request_id, id(P, 2));
        // Not rotated; then appended to.
        std::fs::write(&path, [old, line(2)].concat()).unwrap();
        let mut tail = Tail::open(&path, offset).unwrap();
        assert_eq!(
            (tail.records.before.len(), tail.records.after.len()),
            (1, 2)
        );
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&line(3)).unwrap();
        tail.refresh().unwrap();
        tail.refresh().unwrap();
        assert_eq!(tail.records.after.len(), 3, "each record once");
        assert_eq!(tail.records.after[2].request_id, id(P, 3));
    }
}
