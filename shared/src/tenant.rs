//! Tenant ids: `[a-z0-9][a-z0-9_-]{0,62}` (`docs/API.md`, "Conventions").
//!
//! Tenant ids appear in file names of state directories, in headers and in
//! audit records, so they are validated once, at the edge, and carried as a
//! [`TenantId`] afterwards.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest tenant id, in bytes: one leading character plus 62.
pub const MAX_TENANT_ID_LEN: usize = 63;

/// A validated tenant id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

/// Why a string is not a tenant id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTenantId {
    #[error("tenant id is empty")]
    Empty,
    #[error("tenant id is {0} bytes long; at most {MAX_TENANT_ID_LEN} are allowed")]
    TooLong(usize),
    #[error("tenant id must start with a-z or 0-9, not {0:?}")]
    BadFirst(char),
    #[error("tenant id may hold only a-z, 0-9, '_' and '-', not {0:?}")]
    BadChar(char),
}

impl TenantId {
    /// Validates `s` as a tenant id.
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidTenantId> {
        let s = s.into();
        let mut chars = s.chars();
        let first = chars.next().ok_or(InvalidTenantId::Empty)?;
        if s.len() > MAX_TENANT_ID_LEN {
            return Err(InvalidTenantId::TooLong(s.len()));
        }
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(InvalidTenantId::BadFirst(first));
        }
        if let Some(c) = chars
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
        {
            return Err(InvalidTenantId::BadChar(c));
        }
        Ok(TenantId(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TenantId {
    type Err = InvalidTenantId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TenantId::new(s)
    }
}

impl TryFrom<String> for TenantId {
    type Error = InvalidTenantId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        TenantId::new(s)
    }
}

impl From<TenantId> for String {
    fn from(t: TenantId) -> String {
        t.0
    }
}

impl AsRef<str> for TenantId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_and_refuses() {
        assert!(TenantId::new("tenant-a").is_ok());
        assert!(TenantId::new("0").is_ok());
        assert!(TenantId::new("a_b-c9").is_ok());
        assert_eq!(TenantId::new(""), Err(InvalidTenantId::Empty));
        assert_eq!(TenantId::new("-a"), Err(InvalidTenantId::BadFirst('-')));
        assert_eq!(TenantId::new("Abc"), Err(InvalidTenantId::BadFirst('A')));
        assert_eq!(TenantId::new("a/b"), Err(InvalidTenantId::BadChar('/')));
        assert_eq!(TenantId::new("a.."), Err(InvalidTenantId::BadChar('.')));
        assert!(TenantId::new("a".repeat(63)).is_ok());
        assert_eq!(
            TenantId::new("a".repeat(64)),
            Err(InvalidTenantId::TooLong(64))
        );
    }

    #[test]
    fn serde_validates() {
        assert!(serde_json::from_str::<TenantId>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<TenantId>("\"../etc\"").is_err());
    }

    proptest! {
        #[test]
        fn matches_the_pattern(s in "\\PC{0,70}") {
            let ok = TenantId::new(s.clone()).is_ok();
            let b = s.as_bytes();
            let expected = !b.is_empty()
                && b.len() <= 63
                && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-');
            prop_assert_eq!(ok, expected);
        }
    }
}
