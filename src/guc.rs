//! Every GUC of the extension, with its default and the reason it exists.
//!
//! All of them are `SIGHUP` or `SUSET` (changeable with `ALTER SYSTEM` + `pg_reload_conf()`,
//! and per session by a superuser where that is useful) so that the library can be loaded late (on first use)
//! without "cannot create PGC_POSTMASTER variables after startup".

use std::ffi::CString;

use outbox_core::retry::{RetrySchedule, DEFAULT_SCHEDULE};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Largest payload `outbox.enqueue` accepts, in bytes of its JSON text. Receivers and the
/// specification prefer small payloads; a limit keeps one runaway producer from filling the
/// queue with megabyte rows.
pub static MAX_PAYLOAD_SIZE: GucSetting<i32> = GucSetting::<i32>::new(256 * 1024);

/// Delays between attempts, e.g. '5s, 5m, 30m, 2h, 5h, 10h, 10h'; after the last, dead.
pub static RETRY_SCHEDULE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"5s, 5m, 30m, 2h, 5h, 10h, 10h"));

pub fn register() {
    GucRegistry::define_int_guc(
        c"outbox.max_payload_size",
        c"Largest event payload outbox.enqueue accepts (bytes of JSON text).",
        c"Larger payloads are refused with SQLSTATE 54000.",
        &MAX_PAYLOAD_SIZE,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_string_guc(
        c"outbox.retry_schedule",
        c"Delays between delivery attempts, e.g. '5s, 5m, 30m, 2h'.",
        c"One delay per failed attempt (units ms, s, m, h, d), each with +/-20% jitter; when the list is used up the delivery is dead.",
        &RETRY_SCHEDULE,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// The payload limit in bytes.
pub fn max_payload_size() -> usize {
    usize::try_from(MAX_PAYLOAD_SIZE.get()).unwrap_or(usize::MAX)
}

/// The configured retry schedule. An unparsable setting falls back to the default with a
/// warning, so a typo in postgresql.conf slows nothing down and loses nothing.
pub fn retry_schedule() -> RetrySchedule {
    let text = RETRY_SCHEDULE
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| DEFAULT_SCHEDULE.to_string());
    RetrySchedule::parse(&text).unwrap_or_else(|e| {
        pgrx::warning!(
            "outbox.retry_schedule is invalid ({e}); using the default '{DEFAULT_SCHEDULE}'"
        );
        RetrySchedule::default()
    })
}
