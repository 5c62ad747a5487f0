//! The defaults of an `outbox.log` row that only C can give cheaply: the producer pays
//! for every one of them on every event.

use std::cell::Cell;

use pgrx::prelude::*;

use crate::wake::wake_at_commit;

/// `outbox._stamp()`, the default of `outbox.log.txid` (declared in
/// sql/outbox/01_tables.sql): the top-level transaction id, as `pg_current_xact_id()`
/// gives it, and the workers woken when that transaction commits. One call per event does
/// both, so the producer's insert needs no second function.
#[pg_extern(sql = false)]
fn stamp() -> i64 {
    wake_at_commit();
    // SAFETY: called inside a transaction (a column default); assigns the transaction id
    // if it has none yet, as pg_current_xact_id() does. xid8 is a 64-bit integer datum.
    unsafe { pg_sys::GetTopFullTransactionId().value as i64 }
}

thread_local! {
    static SEQ: Cell<i64> = const { Cell::new(0) };
}

/// `outbox._seq()`, the default of `outbox.log.seq` (declared in sql/outbox/01_tables.sql):
/// this backend's next log row number. A transaction's rows all come from one backend, so
/// with the transaction id it orders and identifies them.
#[pg_extern(sql = false)]
fn seq() -> i64 {
    SEQ.with(|s| {
        let next = s.get() + 1;
        s.set(next);
        next
    })
}

/// `outbox._log_event_id(txid, seq, created_at)` (declared in sql/outbox/02_rules.sql): the
/// id of an event the trigger appended without one; see
/// [`outbox_core::ids::log_event_id`]. xid8 and timestamptz are 64-bit integer datums.
#[pg_extern(sql = false)]
fn log_event_id(txid: i64, seq: i64, created_at: i64) -> String {
    // SAFETY: reads a value fixed when the cluster was made.
    let system_id = unsafe { pg_sys::GetSystemIdentifier() };
    outbox_core::ids::log_event_id(system_id, txid as u64, seq, created_at)
}
