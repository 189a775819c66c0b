//! What this binary is: version, commit, compiler, profile, target, and the
//! snapshot formats and guest ABI it speaks. Feeds the
//! `tensor_wasm_build_info` metric of every component, `--version`, and the
//! upgrade's pre-flight check.

use serde::{Deserialize, Serialize};

/// The workspace version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit built (12 hex digits), or `unknown` outside a checkout.
pub const GIT_SHA: &str = env!("TENSOR_WASM_BUILD_GIT_SHA");
/// `rustc --version` of the compiler that built it.
pub const RUSTC: &str = env!("TENSOR_WASM_BUILD_RUSTC");
/// `debug` or `release`.
pub const PROFILE: &str = env!("TENSOR_WASM_BUILD_PROFILE");
/// The target triple.
pub const TARGET: &str = env!("TENSOR_WASM_BUILD_TARGET");

/// The guest ABI versions this build runs (`docs/GUEST-ABI.md`).
pub const GUEST_ABI: &[u32] = &[1, 2];

/// Which snapshot formats a build reads and writes
/// (`docs/SNAPSHOT-COMPATIBILITY.md`), as `--version --json` and
/// `/internal/info` report them and `tensor-wasm upgrade` checks them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFormats {
    /// Every format it reads.
    pub reads: Vec<u32>,
    /// What it writes for another release to read: snapshot files, warm
    /// state, admin snapshots, stop-and-copy moves.
    pub writes: Vec<u32>,
    /// What it writes only to an executor that serves the same routes
    /// (pre-copy rounds), which an older executor never receives.
    #[serde(default)]
    pub negotiated: Vec<u32>,
    /// Whether it seals a snapshot to a move (`export?move=`) and imports
    /// one only for that move (`import?move=`); `false` from earlier
    /// releases, which a move's snapshot then reaches unsealed.
    #[serde(default)]
    pub move_seal: bool,
}

impl SnapshotFormats {
    /// This build's.
    pub fn this_build() -> SnapshotFormats {
        use crate::snapshot::{FORMAT_VERSION, stream::STREAM_VERSION};
        SnapshotFormats {
            reads: vec![FORMAT_VERSION, STREAM_VERSION],
            writes: vec![FORMAT_VERSION],
            negotiated: vec![STREAM_VERSION],
            move_seal: true,
        }
    }

    /// Release 0.1's, which reported none: format 1 only.
    pub fn release_0_1() -> SnapshotFormats {
        SnapshotFormats {
            reads: vec![1],
            writes: vec![1],
            negotiated: Vec::new(),
            move_seal: false,
        }
    }
}

/// What a binary is: `tensor-wasm --version --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildReport {
    pub version: String,
    pub git_sha: String,
    pub rustc: String,
    pub profile: String,
    pub target: String,
    /// Cargo features compiled in (`cuda`).
    pub features: Vec<String>,
    pub snapshot_formats: SnapshotFormats,
    pub guest_abi: Vec<u32>,
}

impl BuildReport {
    /// This build's, with `features` (comma separated, empty for none).
    pub fn this_build(features: &str) -> BuildReport {
        BuildReport {
            version: VERSION.into(),
            git_sha: GIT_SHA.into(),
            rustc: RUSTC.into(),
            profile: PROFILE.into(),
            target: TARGET.into(),
            features: features
                .split(',')
                .filter(|f| !f.is_empty())
                .map(String::from)
                .collect(),
            snapshot_formats: SnapshotFormats::this_build(),
            guest_abi: GUEST_ABI.to_vec(),
        }
    }
}

/// Why a fleet running `from` cannot be upgraded to `to` (and rolled back
/// again): each format one side writes that the other cannot read, and
/// each guest ABI the fleet runs that `to` does not. Empty when the
/// upgrade is safe.
pub fn upgrade_blockers(
    from: &SnapshotFormats,
    from_abi: &[u32],
    to: &SnapshotFormats,
    to_abi: &[u32],
) -> Vec<String> {
    let mut why = Vec::new();
    for f in from.writes.iter().filter(|f| !to.reads.contains(f)) {
        why.push(format!(
            "the fleet writes snapshot format {f}, which the new binary cannot read (it reads {})",
            formats_text(&to.reads)
        ));
    }
    for f in to.writes.iter().filter(|f| !from.reads.contains(f)) {
        why.push(format!(
            "the new binary writes snapshot format {f}, which the fleet cannot read back on a rollback (it reads {})",
            formats_text(&from.reads)
        ));
    }
    for v in from_abi.iter().filter(|v| !to_abi.contains(v)) {
        why.push(format!(
            "the fleet's functions use guest ABI v{v}, which the new binary does not run (it runs {})",
            abi_text(to_abi)
        ));
    }
    why
}

/// Snapshot formats as people read them: `1, 2` (`none` for none).
pub fn formats_text(formats: &[u32]) -> String {
    if formats.is_empty() {
        return "none".into();
    }
    formats
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Guest ABI versions as people read them: `v1, v2`.
pub fn abi_text(versions: &[u32]) -> String {
    versions
        .iter()
        .map(|v| format!("v{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The labels of `tensor_wasm_build_info` for `component` built with
/// `features` (comma separated, empty for none).
pub fn labels<'a>(component: &'a str, features: &'a str) -> [(&'static str, &'a str); 7] {
    [
        ("component", component),
        ("version", VERSION),
        ("git_sha", GIT_SHA),
        ("rustc_version", RUSTC),
        ("profile", PROFILE),
        ("target", TARGET),
        ("features", features),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_filled() {
        for (name, value) in labels("executor", "") {
            if name != "features" {
                assert!(!value.is_empty(), "{name}");
            }
        }
        assert!(RUSTC.starts_with("rustc "), "{RUSTC}");
    }

    #[test]
    fn upgrades_are_refused_for_formats_one_side_cannot_read() {
        let this = SnapshotFormats::this_build();
        let old = SnapshotFormats::release_0_1();
        // To and from release 0.1: format 2 is only negotiated, and a
        // fleet whose functions use only ABI v1 may go back to it.
        assert!(upgrade_blockers(&old, &[1], &this, GUEST_ABI).is_empty());
        assert!(upgrade_blockers(&this, &[1], &old, &[1]).is_empty());
        // One with functions on ABI v2 (cancellation) may not.
        let why = upgrade_blockers(&this, &[1, 2], &old, &[1]);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].contains("guest ABI v2"), "{why:?}");
        assert!(upgrade_blockers(&this, GUEST_ABI, &this, GUEST_ABI).is_empty());
        // A release that writes format 3: no rollback onto this one.
        let next = SnapshotFormats {
            reads: vec![1, 2, 3],
            writes: vec![3],
            negotiated: vec![],
            move_seal: true,
        };
        let why = upgrade_blockers(&this, GUEST_ABI, &next, GUEST_ABI);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].contains("writes snapshot format 3"), "{why:?}");
        assert!(why[0].contains("reads 1, 2"), "{why:?}");
        // One that no longer reads format 1, nor runs ABI v1.
        let why = upgrade_blockers(&this, &[1], &next, &[2]);
        assert_eq!(why.len(), 2, "{why:?}");
        let without_1 = SnapshotFormats {
            reads: vec![2, 3],
            ..next
        };
        let why = upgrade_blockers(&this, &[1], &without_1, &[1]);
        assert!(
            why.iter().any(|w| w.contains("writes snapshot format 1")),
            "{why:?}"
        );
    }

    #[test]
    fn the_report_names_this_build() {
        let r = BuildReport::this_build("cuda");
        assert_eq!(r.version, VERSION);
        assert_eq!(r.features, ["cuda"]);
        assert!(BuildReport::this_build("").features.is_empty());
        assert_eq!(r.snapshot_formats.reads, [1, 2]);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<BuildReport>(&json).unwrap(), r);
    }
}
