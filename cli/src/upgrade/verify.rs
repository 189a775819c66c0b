//! The check at the end of `tensor-wasm upgrade` (`docs/UPGRADE.md`,
//! "Verification"): from the proxy's admin API, every executor answers,
//! runs what the new binary said it is, and every tenant is placed on an
//! executor the proxy knows. A failure names what is wrong and points at
//! `--rollback`.

use tensor_wasm_shared::build::{BuildReport, SnapshotFormats};
use tensor_wasm_shared::names::{BUILD_INFO, executor_metrics};

use crate::client::observe::PromSample as Sample;

/// What was checked, for the report.
#[derive(Debug, Default, PartialEq)]
pub struct Verified {
    pub executors: usize,
    pub tenants: usize,
}

/// Checks `executors` (`GET /admin/executors`) and `placements` (`GET
/// /admin/placements`) against `expected`, the new executor binary's
/// report when executors were upgraded: what was verified, or every
/// problem found.
pub fn check(
    executors: &serde_json::Value,
    placements: &serde_json::Value,
    expected: Option<&BuildReport>,
) -> Result<Verified, Vec<String>> {
    let mut problems = Vec::new();
    let list = executors["executors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if list.is_empty() {
        problems.push("the proxy lists no executor".to_string());
    }
    let mut ids = Vec::with_capacity(list.len());
    for e in &list {
        let id = e["id"].as_str().unwrap_or("?");
        ids.push(id);
        if e["healthy"] != true {
            problems.push(format!("executor {id} does not answer"));
        }
        let Some(want) = expected else { continue };
        let version = e["version"].as_str().unwrap_or("");
        if version != want.version {
            problems.push(format!(
                "executor {id} runs version {version:?}, not the new binary's {:?}",
                want.version
            ));
        }
        let formats: Option<SnapshotFormats> =
            serde_json::from_value(e["snapshot_formats"].clone()).ok();
        if formats.as_ref() != Some(&want.snapshot_formats) {
            problems.push(format!(
                "executor {id} reports snapshot formats {formats:?}, not the new binary's {:?}",
                want.snapshot_formats
            ));
        }
    }
    let placed = placements["placements"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    for (tenant, on) in &placed {
        let on = on.as_str().unwrap_or("?");
        if !ids.contains(&on) {
            problems.push(format!(
                "tenant {tenant} is placed on {on}, which the proxy no longer lists"
            ));
        }
    }
    if problems.is_empty() {
        Ok(Verified {
            executors: list.len(),
            tenants: placed.len(),
        })
    } else {
        Err(problems)
    }
}

/// The version and git sha in the proxy's `build_info`.
pub fn proxy_build(samples: &[Sample]) -> Option<(String, String)> {
    samples
        .iter()
        .find(|s| s.name == BUILD_INFO && s.label("component") == Some("proxy"))
        .map(|s| {
            (
                s.label("version").unwrap_or("").to_string(),
                s.label("git_sha").unwrap_or("").to_string(),
            )
        })
}

/// Invocations an executor counted, whatever their result.
pub fn invocations(samples: &[Sample]) -> u64 {
    samples
        .iter()
        .filter(|s| s.name == executor_metrics::INVOCATIONS_TOTAL)
        .map(|s| s.value as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn executor(id: &str, healthy: bool, version: &str) -> serde_json::Value {
        json!({
            "id": id,
            "healthy": healthy,
            "version": version,
            "snapshot_formats": SnapshotFormats::this_build(),
        })
    }

    #[test]
    fn a_fleet_on_the_new_binary_with_every_tenant_placed_passes() {
        let new = BuildReport::this_build("");
        let executors = json!({"executors": [
            executor("cpu0.1", true, &new.version),
            executor("cpu1.1", true, &new.version),
        ]});
        let placements = json!({"placements": {"a": "cpu0.1", "b": "cpu1.1"}});
        assert_eq!(
            check(&executors, &placements, Some(&new)),
            Ok(Verified {
                executors: 2,
                tenants: 2
            })
        );
    }

    #[test]
    fn each_problem_is_named() {
        let new = BuildReport::this_build("");
        let mut old_formats = executor("cpu1.1", true, &new.version);
        old_formats["snapshot_formats"] = serde_json::Value::Null;
        let executors = json!({"executors": [
            executor("cpu0.1", false, &new.version),
            old_formats,
            executor("cpu2.1", true, "0.0.9"),
        ]});
        let placements = json!({"placements": {"a": "cpu0.1", "b": "cpu3"}});
        let problems = check(&executors, &placements, Some(&new)).unwrap_err();
        let all = problems.join("\n");
        assert_eq!(problems.len(), 4, "{all}");
        assert!(all.contains("executor cpu0.1 does not answer"), "{all}");
        assert!(
            all.contains("executor cpu1.1 reports snapshot formats None"),
            "{all}"
        );
        assert!(
            all.contains("executor cpu2.1 runs version \"0.0.9\""),
            "{all}"
        );
        assert!(all.contains("tenant b is placed on cpu3"), "{all}");
        // Without a new executor binary, versions are not compared.
        let problems = check(&executors, &placements, None).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(check(&json!({"executors": []}), &json!({}), None).is_err());
    }

    #[test]
    fn build_info_and_invocations_from_metrics() {
        let text = format!(
            "{BUILD_INFO}{{component=\"executor\",version=\"9\",git_sha=\"x\"}} 1\n\
             {BUILD_INFO}{{component=\"proxy\",version=\"0.2.0\",git_sha=\"abc\"}} 1\n\
             {i}{{result=\"ok\"}} 5\n{i}{{result=\"trap\"}} 2\n",
            i = executor_metrics::INVOCATIONS_TOTAL
        );
        let samples = crate::client::observe::parse_prometheus(&text);
        assert_eq!(
            proxy_build(&samples),
            Some(("0.2.0".to_string(), "abc".to_string()))
        );
        assert_eq!(invocations(&samples), 7);
        assert_eq!(proxy_build(&[]), None);
    }
}
