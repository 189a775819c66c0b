//! An executor's proof that it belongs to the fleet, asked before the
//! proxy sends it any credential (`docs/API.md`, "Executor identity").
//!
//! The proxy sends a fresh random nonce to `POST /internal/identity`,
//! without the internal token. A genuine executor answers its id and
//! `HMAC-SHA256(internal token, DOMAIN ‖ id ‖ 0 ‖ nonce)`. Only a holder of
//! the internal token can compute that, and the id inside the MAC means a
//! proof that one executor gave cannot register another id. The proxy
//! checks the proof before it registers the address, so an address named in
//! `POST /admin/executors` or found by DNS never receives the internal
//! token unless whoever answers there holds it already.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What the MAC covers first, so that it can never be a MAC of anything
/// else keyed by the internal token.
const DOMAIN: &[u8] = b"tensor-wasm executor identity v1\0";

/// The nonce's length in bytes (hex on the wire).
pub const NONCE_LEN: usize = 32;

/// `POST /internal/identity`'s body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Challenge {
    /// [`NONCE_LEN`] bytes, hex.
    pub nonce: String,
}

/// Its answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The executor's id.
    pub id: String,
    /// The MAC, hex.
    pub proof: String,
}

fn mac(internal_token: &str, id: &str, nonce: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(internal_token.as_bytes())
        .expect("HMAC takes any key length");
    m.update(DOMAIN);
    m.update(id.as_bytes());
    m.update(&[0]);
    m.update(nonce);
    m
}

/// The proof that executor `id` gives for `nonce`.
pub fn prove(internal_token: &str, id: &str, nonce: &[u8]) -> Identity {
    Identity {
        id: id.to_string(),
        proof: hex::encode(mac(internal_token, id, nonce).finalize().into_bytes()),
    }
}

/// Whether `answer` proves, for `nonce`, that the executor holds
/// `internal_token` and is `expected_id`. Compares in constant time.
pub fn verify(internal_token: &str, expected_id: &str, nonce: &[u8], answer: &Identity) -> bool {
    if answer.id != expected_id {
        return false;
    }
    let Ok(proof) = hex::decode(&answer.proof) else {
        return false;
    };
    mac(internal_token, expected_id, nonce)
        .verify_slice(&proof)
        .is_ok()
}

/// A fresh random nonce.
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut n);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_token_and_the_id_it_names_make_a_proof() {
        let n = nonce();
        let good = prove("twint_secret", "cpu0", &n);
        assert!(verify("twint_secret", "cpu0", &n, &good));
        // Another token, another id, another nonce, a cut proof, not hex.
        assert!(!verify("twint_other", "cpu0", &n, &good));
        assert!(!verify("twint_secret", "cpu1", &n, &good));
        let renamed = Identity {
            id: "cpu1".into(),
            ..good.clone()
        };
        assert!(!verify("twint_secret", "cpu1", &n, &renamed));
        assert!(!verify("twint_secret", "cpu0", &nonce(), &good));
        let cut = Identity {
            proof: good.proof[..62].to_string(),
            ..good.clone()
        };
        assert!(!verify("twint_secret", "cpu0", &n, &cut));
        let junk = Identity {
            proof: "zz".repeat(32),
            ..good
        };
        assert!(!verify("twint_secret", "cpu0", &n, &junk));
    }
}
