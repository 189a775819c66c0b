//! The HTTP headers of the proxy↔executor contract, and the one rule for a
//! client's request id (docs/API.md, "Request ids").
//!
//! The proxy sets both headers on every request it forwards; the executor
//! reads the tenant from [`TENANT`] and echoes [`REQUEST_ID`] on every
//! answer. Both accept a caller's request id by [`accept_request_id`], and
//! make a fresh one otherwise.

/// The tenant a forwarded request acts for.
pub const TENANT: &str = "x-tensor-wasm-tenant";

/// The placement epoch a forwarded request was routed by (a decimal
/// integer), which an executor fences stale proxies with; on the drop of a
/// moved tenant, the epoch of the placement that moved it.
pub const EPOCH: &str = "x-tensor-wasm-epoch";

/// On the drop of a moved tenant, the address (`host:port`) of the
/// executor it moved to, where the executor it left sends on the calls it
/// held through the move (`ARCHITECTURE.md`, "Fencing stale proxies").
pub const MOVED_TO: &str = "x-tensor-wasm-moved-to";

/// How many times an executor has sent a request on to another (a decimal
/// integer; absent: none); one sent on [`MAX_HOPS`] times is not sent on
/// again.
pub const HOPS: &str = "x-tensor-wasm-hops";

/// Most times a request is sent on from executor to executor.
pub const MAX_HOPS: u32 = 2;

/// Largest request body a proxy keeps to send again when an executor
/// refuses it unrun (`placement_stale`): 64 KiB. An executor holds a
/// refused request whose body may be larger rather than refuse it.
pub const RESEND_BODY_LIMIT: u64 = 64 << 10;

/// A request's id, on the request and on its answer.
pub const REQUEST_ID: &str = "x-request-id";

/// Asks for an invocation's answer as a raw stream of chunks
/// (`docs/API.md`, "Streaming"), whatever its `Accept`.
pub const STREAM_HEADER: &str = "x-tensor-wasm-stream";

/// Longest request id kept from a caller, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// The caller's request id, if it is one to keep: 1 to
/// [`MAX_REQUEST_ID_BYTES`] bytes, each printable ASCII other than space
/// (`!` to `~`). None means: make a fresh one.
pub fn accept_request_id(value: &[u8]) -> Option<&str> {
    if value.is_empty()
        || value.len() > MAX_REQUEST_ID_BYTES
        || !value.iter().all(u8::is_ascii_graphic)
    {
        return None;
    }
    std::str::from_utf8(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_ids_up_to_128_bytes_are_kept() {
        assert_eq!(accept_request_id(b"req-7"), Some("req-7"));
        assert_eq!(
            accept_request_id(b"!\"#~azAZ09{}[]"),
            Some("!\"#~azAZ09{}[]")
        );
        let longest = "a".repeat(MAX_REQUEST_ID_BYTES);
        assert_eq!(
            accept_request_id(longest.as_bytes()),
            Some(longest.as_str())
        );
    }

    #[test]
    fn other_ids_are_replaced() {
        assert_eq!(accept_request_id(b""), None);
        assert_eq!(accept_request_id("a".repeat(129).as_bytes()), None);
        assert_eq!(accept_request_id(b"two words"), None);
        assert_eq!(accept_request_id(b"tab\there"), None);
        assert_eq!(accept_request_id(b"line\r\nbreak"), None);
        assert_eq!(accept_request_id(b"nul\0"), None);
        assert_eq!(accept_request_id(b"del\x7f"), None);
        assert_eq!(accept_request_id("caf\u{e9}".as_bytes()), None);
    }
}
