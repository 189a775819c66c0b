//! Ids of executors, functions and jobs, validated once at the edge and
//! carried typed afterwards, like [`crate::TenantId`].
//!
//! - [`ExecutorId`]: 1–63 bytes of `a-z 0-9 _ - .` (`cpu0`, `gpu1`,
//!   `gpu0.1` for the successor an upgrade starts beside `gpu0`).
//! - [`FunctionId`], [`JobId`]: `[a-z0-9][a-z0-9_-]{0,62}`; executors make
//!   them as `fn-<16 hex>` and `job-<16 hex>`.
//!
//! Executors make new function and job ids with [`FunctionId::generated`]
//! and [`JobId::generated`] from 64 random bits.
//!
//! All three travel as plain JSON strings, so the wire format is that of
//! the bare strings they replace.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest id of any kind here, in bytes.
pub const MAX_ID_LEN: usize = 63;

/// Why a string is not an id of some kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} id {value:?} is not valid ({rule})")]
pub struct InvalidId {
    pub kind: &'static str,
    pub value: String,
    pub rule: &'static str,
}

fn id_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
}

/// Executor ids may also hold `.` anywhere.
fn executor_id_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_LEN && s.bytes().all(|b| id_byte(b) || b == b'.')
}

/// Function and job ids: the tenant id rule.
fn item_id_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_ID_LEN
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| id_byte(c))
}

/// One validated id type: a `String` that only `new` (and serde, through
/// it) can make.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $rule:literal, $check:path) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, InvalidId> {
                let s = s.into();
                if $check(&s) {
                    Ok($name(s))
                } else {
                    Err(InvalidId { kind: $kind, value: s, rule: $rule })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                $name::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Reads as the string it is, so that `&id` goes where a `&str`
        /// is asked for (map look-ups, paths, messages).
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A validated executor id.
    ExecutorId,
    "executor",
    "1–63 of a-z 0-9 _ - .",
    executor_id_ok
);
id_type!(
    /// A validated function id.
    FunctionId,
    "function",
    "[a-z0-9][a-z0-9_-]{0,62}",
    item_id_ok
);
id_type!(
    /// A validated job id.
    JobId,
    "job",
    "[a-z0-9][a-z0-9_-]{0,62}",
    item_id_ok
);

impl FunctionId {
    /// `fn-<bits as 16 hex digits>`: valid by construction.
    pub fn generated(bits: u64) -> FunctionId {
        FunctionId(format!("fn-{bits:016x}"))
    }
}

impl JobId {
    /// `job-<bits as 16 hex digits>`: valid by construction.
    pub fn generated(bits: u64) -> JobId {
        JobId(format!("job-{bits:016x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_and_refuses() {
        for ok in ["cpu0", "gpu0.1", ".a", "mig-1_2"] {
            assert!(ExecutorId::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "CPU0", "a/b", "a b", &"a".repeat(64)] {
            assert!(ExecutorId::new(bad).is_err(), "{bad}");
        }
        assert!(FunctionId::new("fn-0123456789abcdef").is_ok());
        assert!(JobId::new("job-0123456789abcdef").is_ok());
        for bad in ["", "-a", "fn.1", "fn/1", "../x", &"a".repeat(64)] {
            assert!(FunctionId::new(bad).is_err(), "{bad}");
            assert!(JobId::new(bad).is_err(), "{bad}");
        }
        for bits in [0, 1, u64::MAX] {
            let f = FunctionId::generated(bits);
            assert_eq!(FunctionId::new(f.as_str()), Ok(f));
            let j = JobId::generated(bits);
            assert_eq!(JobId::new(j.as_str()), Ok(j));
        }
        assert_eq!(JobId::generated(255).as_str(), "job-00000000000000ff");
        let e = JobId::new("a/b").unwrap_err();
        assert_eq!(e.kind, "job");
        assert!(e.to_string().contains("\"a/b\""), "{e}");
    }

    #[test]
    fn serde_is_the_bare_string_and_validates() {
        let id: FunctionId = serde_json::from_str("\"fn-1\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"fn-1\"");
        assert!(serde_json::from_str::<FunctionId>("\"../etc\"").is_err());
        assert!(serde_json::from_str::<ExecutorId>("\"\"").is_err());
    }

    proptest! {
        #[test]
        fn executor_ids_match_the_pattern(s in "\\PC{0,70}") {
            let b = s.as_bytes();
            let expected = !b.is_empty()
                && b.len() <= 63
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.".contains(c));
            prop_assert_eq!(ExecutorId::new(s.clone()).is_ok(), expected);
        }
    }
}
