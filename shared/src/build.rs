//! What this binary is: version, commit, compiler, profile, target. Feeds the
//! `tensor_wasm_build_info` metric of every component and `--version`.

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
}
