//! Waking the worker when an enqueueing transaction commits.
//!
//! The worker publishes its latch in shared memory. `outbox.enqueue` registers, once per
//! transaction, a commit callback that sets that latch; a rollback sets nothing. So a
//! committed event is picked up within milliseconds without the worker polling the table,
//! and a transaction that enqueues a thousand events wakes the worker once.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, register_xact_callback, PgAtomic, PgXactCallbackEvent};

/// Address of the worker's latch (0 = no worker running). Shared memory is mapped at the
/// same address in every backend, so the address is valid everywhere.
static WORKER_LATCH: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"webhook_outbox_worker_latch") };

/// Whether the shared memory above exists: only when the library was preloaded. A backend
/// that loaded the library late (no worker) must not touch it.
static SHMEM_READY: AtomicBool = AtomicBool::new(false);

thread_local! {
    static WAKE_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Called from `_PG_init` while `shared_preload_libraries` is processed.
pub fn init_shared_memory() {
    pg_shmem_init!(WORKER_LATCH);
    SHMEM_READY.store(true, Ordering::Release);
}

/// The worker announces itself (or, with `false`, withdraws).
pub fn publish_worker_latch(present: bool) {
    if !SHMEM_READY.load(Ordering::Acquire) {
        return;
    }
    // SAFETY: MyLatch points at this process's latch, which lives in shared memory.
    let addr = if present {
        unsafe { pg_sys::MyLatch as u64 }
    } else {
        0
    };
    WORKER_LATCH.get().store(addr, Ordering::Release);
}

fn wake_worker() {
    if !SHMEM_READY.load(Ordering::Acquire) {
        return;
    }
    let addr = WORKER_LATCH.get().load(Ordering::Acquire);
    if addr != 0 {
        // SAFETY: the address is a latch in shared memory published by the worker; setting
        // a latch of a process that has since exited is harmless (latches are never freed).
        unsafe { pg_sys::SetLatch(addr as *mut pg_sys::Latch) };
    }
}

/// Arranges for the worker to be woken when the current transaction commits. Called by
/// `outbox.enqueue`; cheap after the first call in a transaction.
#[pg_extern(name = "_wake_at_commit", volatile, parallel_unsafe)]
fn wake_at_commit() {
    if !SHMEM_READY.load(Ordering::Acquire) || WAKE_REGISTERED.with(Cell::get) {
        return;
    }
    WAKE_REGISTERED.with(|r| r.set(true));
    register_xact_callback(PgXactCallbackEvent::Commit, || {
        WAKE_REGISTERED.with(|r| r.set(false));
        wake_worker();
    });
    register_xact_callback(PgXactCallbackEvent::Abort, || {
        WAKE_REGISTERED.with(|r| r.set(false));
    });
}
