//! SQL-callable functions implemented in Rust: validators used by the SQL API, secret
//! generation, signing and the retry policy. Everything here runs in an ordinary backend.

use outbox_core::signing::SigningKey;
use outbox_core::validate;
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::errors::{raise, OrRefuse};
use crate::guc;

/// Fills `buf` from PostgreSQL's strong random source (the same one `gen_random_uuid` uses).
fn strong_random(buf: &mut [u8]) {
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let ok = unsafe { pg_sys::pg_strong_random(buf.as_mut_ptr().cast(), buf.len()) };
    if !ok {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "could not read from the strong random source",
        );
    }
}

/// A new Standard Webhooks secret: `whsec_` and 32 random bytes in base64.
#[pg_extern(volatile, parallel_safe)]
pub(crate) fn generate_secret() -> String {
    let mut key = vec![0u8; 32];
    strong_random(&mut key);
    SigningKey::from_bytes(key).or_refuse().to_secret()
}

/// The `webhook-signature` value (`v1,<base64>`) for a message, as a receiver would compute
/// it: lets users check a receiver's verification against the extension's.
#[pg_extern(immutable, parallel_safe)]
pub(crate) fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &str) -> String {
    SigningKey::parse(secret)
        .or_refuse()
        .sign(msg_id, timestamp, body.as_bytes())
}

/// How long to wait after failed attempt `attempt` under `outbox.retry_schedule` (with
/// jitter), or NULL when the schedule is exhausted and the delivery should be dead.
#[pg_extern(volatile, parallel_safe)]
pub(crate) fn retry_delay(attempt: i32) -> Option<Interval> {
    let attempt = u32::try_from(attempt).ok()?;
    let mut sample = [0u8; 8];
    strong_random(&mut sample);
    let unit = (u64::from_le_bytes(sample) >> 11) as f64 / (1u64 << 53) as f64;
    let delay = guc::retry_schedule().delay_after(attempt, unit * 2.0 - 1.0)?;
    let micros = i64::try_from(delay.as_micros()).unwrap_or(i64::MAX);
    Some(Interval::new(0, 0, micros).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INTERVAL_FIELD_OVERFLOW,
            e.to_string(),
        )
    }))
}

/// Enqueue's fan-out asks this for every endpoint: does its filter accept the event type?
/// NULL filter: every type. (The rule is `validate::filter_matches`.)
#[pg_extern(name = "_filter_matches", immutable, parallel_safe)]
fn filter_matches(filter: Option<Vec<Option<String>>>, event_type: Option<&str>) -> Option<bool> {
    let event_type = event_type?;
    Some(match filter {
        None => true,
        Some(entries) => {
            let entries: Vec<String> = entries.into_iter().flatten().collect();
            validate::filter_matches(Some(entries.as_slice()), event_type)
        }
    })
}

/// Bytes of a response body the history keeps (`outbox.max_response_body`): `ack_batch`
/// bounds what every sender reports by it.
#[pg_extern(name = "_max_response_body", stable, parallel_safe)]
fn max_response_body() -> i32 {
    guc::MAX_RESPONSE_BODY.get()
}

#[pg_extern(name = "_check_url", stable, parallel_safe)]
fn check_url(url: Option<&str>) -> Option<String> {
    let url = validate::endpoint_url(url?).or_refuse();
    validate::endpoint_target(&url, &guc::allowed_targets()).or_refuse();
    Some(url)
}

#[pg_extern(name = "_check_secret", immutable, parallel_safe)]
fn check_secret(secret: Option<&str>) -> Option<String> {
    let secret = secret?;
    SigningKey::parse(secret).or_refuse();
    Some(secret.to_string())
}

#[pg_extern(name = "_check_event_types", immutable, parallel_safe)]
fn check_event_types(event_types: Option<Vec<Option<String>>>) -> Option<Vec<String>> {
    validate::event_filter(&event_types?).or_refuse()
}

#[pg_extern(name = "_check_headers", immutable, parallel_safe)]
fn check_headers(headers: Option<JsonB>) -> Option<JsonB> {
    let headers = headers?;
    validate::headers(&headers.0).or_refuse();
    Some(headers)
}

#[pg_extern(name = "_check_tenant", immutable, parallel_safe)]
fn check_tenant(tenant_id: Option<&str>) -> Option<String> {
    let t = tenant_id?;
    validate::tenant_id(t).or_refuse();
    Some(t.to_string())
}

/// The log's CHECK constraint (declared in sql/outbox/01_tables.sql): every row, whether
/// `outbox.enqueue` or a trigger wrote it, passes the same rules, refused with a clear
/// message and SQLSTATE instead of a bare constraint violation. The payload counts by its
/// stored size, read from the datum header: no JSON is converted to text on this path.
#[pg_extern(sql = false)]
fn check_log(event_type: &str, tenant_id: Option<&str>, payload_bytes: i32) -> bool {
    validate::event_type(event_type).or_refuse();
    if let Some(t) = tenant_id {
        validate::tenant_id(t).or_refuse();
    }
    validate::payload_size(
        usize::try_from(payload_bytes).unwrap_or(0),
        guc::max_payload_size(),
    )
    .or_refuse();
    true
}

/// Whether the caller runs inside a transaction block (BEGIN ... or several statements
/// sent as one). `outbox.claim` reads the log only outside one: what it reads becomes
/// visible to others when its transaction commits, so a claim in a long transaction must
/// not hold the events it read (and the reader's lock) until then.
#[pg_extern(name = "_in_transaction_block", volatile, parallel_safe)]
fn in_transaction_block() -> bool {
    // SAFETY: reads this backend's transaction state.
    unsafe { pg_sys::IsTransactionBlock() }
}

/// Validates one enqueue call's scalar arguments; the payload is checked by its size only,
/// so the JSON is never parsed twice.
#[pg_extern(name = "_check_event", stable, parallel_safe)]
fn check_event(
    event_type: Option<&str>,
    event_id: Option<&str>,
    tenant_id: Option<&str>,
    payload_bytes: Option<i32>,
) {
    let Some(event_type) = event_type else {
        raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "event_type must not be NULL",
        )
    };
    validate::event_type(event_type).or_refuse();
    if let Some(id) = event_id {
        validate::event_id(id).or_refuse();
    }
    if let Some(t) = tenant_id {
        validate::tenant_id(t).or_refuse();
    }
    let Some(bytes) = payload_bytes else {
        raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "payload must not be NULL; pass '{}'::jsonb or 'null'::jsonb for an empty event",
        )
    };
    validate::payload_size(usize::try_from(bytes).unwrap_or(0), guc::max_payload_size())
        .or_refuse();
}
