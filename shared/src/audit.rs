//! The audit record: one JSON line per request the proxy answered, public
//! or admin, allowed or refused (`docs/AUDIT-LOG.md`).
//!
//! A record names who acted (tenant, and the token only as a hash), what
//! they did (action, resource), how it ended (status, outcome) and how long
//! it took. It never holds a token, a body or a header value a client could
//! use to impersonate anyone.

use serde::{Deserialize, Serialize};

/// How a request ended, as auditors group them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered with a 1xx–3xx status.
    Success,
    /// Refused before it reached an executor: 401, 403.
    Denied,
    /// Refused by the tenant's rate limit: 429.
    RateLimited,
    /// Any other 4xx: the request was wrong.
    ClientError,
    /// A 5xx, or no answer at all.
    ServerError,
}

impl Outcome {
    /// The outcome of an answer with `status`.
    pub fn of_status(status: u16) -> Outcome {
        match status {
            401 | 403 => Outcome::Denied,
            429 => Outcome::RateLimited,
            400..=499 => Outcome::ClientError,
            100..=399 => Outcome::Success,
            _ => Outcome::ServerError,
        }
    }
}

/// One line of the audit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When the request arrived, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The `x-request-id` the answer carried.
    pub request_id: String,
    /// `public` or `admin`: which listener took the request.
    pub listener: String,
    /// The tenant the token belongs to; `null` when authentication failed.
    pub tenant: Option<String>,
    /// First 12 hex digits of the SHA-256 of the presented token; `null`
    /// when none was presented.
    pub token_id: Option<String>,
    /// What was asked, e.g. `functions.invoke` or `admin.migrate`.
    pub action: String,
    /// The request path (the object acted on).
    pub resource: String,
    /// The HTTP status answered (0 when the connection died first).
    pub status: u16,
    pub outcome: Outcome,
    /// Time from the request's arrival to the end of its answer, in ms.
    pub latency_ms: f64,
    /// The client's address.
    pub remote: Option<String>,
    /// How a streamed answer ended (`docs/API.md`, "Streaming"); absent
    /// for an answer that was not streamed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamEnd>,
}

/// How a streamed answer ended, in the audit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamEnd {
    /// `ok` (the end event, or a raw stream's whole body), `error` (an
    /// error event), `client_gone` (the client left first) or `cut` (the
    /// executor's answer broke off).
    pub outcome: String,
    /// The error event's `code`, for `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Body bytes sent to the client.
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_status() {
        assert_eq!(Outcome::of_status(200), Outcome::Success);
        assert_eq!(Outcome::of_status(401), Outcome::Denied);
        assert_eq!(Outcome::of_status(403), Outcome::Denied);
        assert_eq!(Outcome::of_status(429), Outcome::RateLimited);
        assert_eq!(Outcome::of_status(404), Outcome::ClientError);
        assert_eq!(Outcome::of_status(503), Outcome::ServerError);
        assert_eq!(Outcome::of_status(0), Outcome::ServerError);
    }

    #[test]
    fn a_record_is_one_json_line() {
        let r = AuditRecord {
            time: "2026-01-01T00:00:00.000Z".into(),
            request_id: "abc".into(),
            listener: "public".into(),
            tenant: Some("acme".into()),
            token_id: Some("0123456789ab".into()),
            action: "functions.invoke".into(),
            resource: "/functions/f1/invoke".into(),
            status: 429,
            outcome: Outcome::RateLimited,
            latency_ms: 0.25,
            remote: None,
            stream: None,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        assert!(line.contains("\"outcome\":\"rate_limited\""));
        let back: AuditRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
    }
}
