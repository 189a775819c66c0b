//! Bearer tokens → tenants (`docs/API.md`, "Conventions").
//!
//! Tokens come from `TENSOR_WASM_API_TOKENS` (`tok1:tenant-a,tok2:tenant-b`)
//! or from the file `TENSOR_WASM_API_TOKENS_FILE` (one `token:tenant` per
//! line, re-read on SIGHUP). A token holds no `:` or `,`; a bare token is
//! refused at start-up with the right form in the message. Lookups compare
//! against every entry in constant time, so response timing does not reveal
//! how much of a token matched. Audit records name a token by a short hash,
//! never by the token.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tensor_wasm_shared::TenantId;

/// Why a token list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "entry {index} ({shown}) has no tenant: write entries as `token:tenant`, e.g. TENSOR_WASM_API_TOKENS=\"tok1:tenant-a,tok2:tenant-b\""
    )]
    BareToken { index: usize, shown: String },
    #[error("entry {index} has an empty token")]
    EmptyToken { index: usize },
    #[error("entry {index}: tenant {tenant:?}: {reason}")]
    BadTenant {
        index: usize,
        tenant: String,
        reason: String,
    },
    #[error("entry {index} repeats a token that an earlier entry has")]
    Duplicate { index: usize },
    #[error("no tokens are configured: set TENSOR_WASM_API_TOKENS or TENSOR_WASM_API_TOKENS_FILE")]
    Empty,
}

#[derive(Clone)]
struct Entry {
    token: Vec<u8>,
    tenant: TenantId,
    id: String,
}

/// The configured tokens.
#[derive(Clone)]
pub struct TokenTable {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print tokens.
        f.debug_struct("TokenTable")
            .field("entries", &self.entries.len())
            .finish()
    }
}

/// A short, stable name for a token in logs and audit records: the first 12
/// hex digits of its SHA-256.
pub fn token_id(token: &[u8]) -> String {
    hex::encode(&Sha256::digest(token)[..6])
}

/// The first characters of a token, for error messages.
fn shown(token: &str) -> String {
    let head: String = token.chars().take(4).collect();
    format!("{head}…")
}

impl TokenTable {
    /// Parses `token:tenant` entries separated by commas (the environment
    /// form). Blank entries are ignored.
    pub fn parse_list(list: &str) -> Result<TokenTable, TokenError> {
        TokenTable::parse_entries(list.split(','))
    }

    /// Parses the file form: one `token:tenant` per line; blank lines and
    /// lines starting with `#` are ignored.
    pub fn parse_file(text: &str) -> Result<TokenTable, TokenError> {
        TokenTable::parse_entries(text.lines().filter(|l| !l.trim_start().starts_with('#')))
    }

    fn parse_entries<'a>(entries: impl Iterator<Item = &'a str>) -> Result<TokenTable, TokenError> {
        let mut out: Vec<Entry> = Vec::new();
        for (index, raw) in entries.enumerate() {
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            let Some((token, tenant)) = raw.split_once(':') else {
                return Err(TokenError::BareToken {
                    index,
                    shown: shown(raw),
                });
            };
            if token.is_empty() {
                return Err(TokenError::EmptyToken { index });
            }
            let tenant = TenantId::new(tenant).map_err(|e| TokenError::BadTenant {
                index,
                tenant: tenant.to_string(),
                reason: e.to_string(),
            })?;
            if out.iter().any(|e| e.token == token.as_bytes()) {
                return Err(TokenError::Duplicate { index });
            }
            out.push(Entry {
                token: token.as_bytes().to_vec(),
                id: token_id(token.as_bytes()),
                tenant,
            });
        }
        if out.is_empty() {
            return Err(TokenError::Empty);
        }
        Ok(TokenTable { entries: out })
    }

    /// The tenant a bearer token acts for, and the token's id. Compares
    /// against every entry, in constant time per entry.
    pub fn authenticate(&self, presented: &[u8]) -> Option<(&TenantId, &str)> {
        let mut found = None;
        for e in &self.entries {
            if bool::from(e.token.as_slice().ct_eq(presented)) {
                found = Some((&e.tenant, e.id.as_str()));
            }
        }
        found
    }

    /// The token from an `authorization` header value (`Bearer <token>`).
    pub fn bearer(header: &str) -> Option<&str> {
        let (scheme, token) = header.trim().split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        let t = TokenTable::parse_list("tok1:tenant-a, tok2:tenant-b,").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.authenticate(b"tok2").unwrap().0.as_str(), "tenant-b");
        assert!(t.authenticate(b"tok").is_none());
        assert!(t.authenticate(b"tok22").is_none());
        assert!(t.authenticate(b"").is_none());
        let f =
            TokenTable::parse_file("# rotated 2026-11-27\nnew-token:tenant-a\n\nold:tenant-a\n")
                .unwrap();
        assert_eq!(f.authenticate(b"old").unwrap().0.as_str(), "tenant-a");
        assert_eq!(f.authenticate(b"new-token").unwrap().0.as_str(), "tenant-a");
    }

    #[test]
    fn refuses_bad_lists_with_the_right_form() {
        let e = TokenTable::parse_list("secret-token").unwrap_err();
        assert!(e.to_string().contains("token:tenant"), "{e}");
        assert!(
            !e.to_string().contains("secret-token"),
            "the token is not echoed whole"
        );
        assert!(matches!(
            TokenTable::parse_list(":t"),
            Err(TokenError::EmptyToken { .. })
        ));
        assert!(matches!(
            TokenTable::parse_list("a:Bad!"),
            Err(TokenError::BadTenant { .. })
        ));
        assert!(matches!(
            TokenTable::parse_list("a:t1,a:t2"),
            Err(TokenError::Duplicate { index: 1 })
        ));
        assert!(matches!(
            TokenTable::parse_list(" , "),
            Err(TokenError::Empty)
        ));
    }

    #[test]
    fn token_ids_name_without_revealing() {
        let t = TokenTable::parse_list("tok1:a").unwrap();
        let (_, id) = t.authenticate(b"tok1").unwrap();
        assert_eq!(id.len(), 12);
        assert_eq!(id, token_id(b"tok1"));
        assert!(!id.contains("tok1"));
        assert!(!format!("{t:?}").contains("tok1"));
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(TokenTable::bearer("Bearer abc"), Some("abc"));
        assert_eq!(TokenTable::bearer("bearer  abc "), Some("abc"));
        assert_eq!(TokenTable::bearer("Basic abc"), None);
        assert_eq!(TokenTable::bearer("Bearer "), None);
        assert_eq!(TokenTable::bearer("abc"), None);
    }
}
