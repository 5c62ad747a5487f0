//! Waking the worker when an enqueueing transaction commits.
//!
//! Each worker publishes its latch in shared memory. `outbox.enqueue` registers, once per
//! transaction, a commit callback that sets those latches; a rollback sets nothing. So a
//! committed event is picked up within milliseconds without the worker polling the table,
//! and a transaction that enqueues a thousand events wakes the workers once.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, register_xact_callback, PgLwLock, PgXactCallbackEvent};

/// How many workers may serve one database (the `outbox.workers` maximum).
pub const MAX_WORKERS: usize = 8;
/// Latch slots: every worker of every database `outbox.database` may list.
pub const SLOTS: usize = MAX_WORKERS * outbox_core::validate::MAX_DATABASES;

/// Per worker slot: the address of its latch (0 = no worker in that slot) and the OID of
/// the database it serves. Shared memory is mapped at the same address in every backend, so
/// the addresses are valid everywhere.
static WORKER_LATCHES: PgLwLock<Latches> =
    unsafe { PgLwLock::new(c"webhook_outbox_worker_latches") };

/// The slots, as one value (arrays this long have no `Default`).
#[derive(Clone, Copy)]
struct Latches([(u64, u32); SLOTS]);

impl Default for Latches {
    fn default() -> Self {
        Latches([(0, 0); SLOTS])
    }
}

// SAFETY: plain integers, no pointers into process-local memory.
unsafe impl pgrx::PGRXSharedMemory for Latches {}

/// Whether the shared memory above exists: only when the library was preloaded. A backend
/// that loaded the library late (no worker) must not touch it.
static SHMEM_READY: AtomicBool = AtomicBool::new(false);

thread_local! {
    static WAKE_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Called from `_PG_init` while `shared_preload_libraries` is processed.
pub fn init_shared_memory() {
    pg_shmem_init!(WORKER_LATCHES);
    SHMEM_READY.store(true, Ordering::Release);
}

/// Worker `slot` announces itself (or, with `false`, withdraws).
pub fn publish_worker_latch(slot: usize, present: bool) {
    if !SHMEM_READY.load(Ordering::Acquire) {
        return;
    }
    // SAFETY: MyLatch points at this process's latch, which lives in shared memory; the
    // worker is connected to its database, so MyDatabaseId is set.
    let entry = if present {
        unsafe { (pg_sys::MyLatch as u64, u32::from(pg_sys::MyDatabaseId)) }
    } else {
        (0, 0)
    };
    // SAFETY: as above.
    let own = unsafe { pg_sys::MyLatch as u64 };
    if let Some(latch) = WORKER_LATCHES.exclusive().0.get_mut(slot) {
        // Withdrawing leaves a slot alone that a successor already took (the launcher may
        // give the slot of a worker it stopped to a new one before the old one has exited).
        if present || latch.0 == own {
            *latch = entry;
        }
    }
}

/// Wakes every worker serving this database: each claims what it can, and one that finds
/// nothing goes back to sleep at the cost of one cheap claim. Workers of other databases
/// have nothing to do with this commit and sleep on.
fn wake_workers() {
    if !SHMEM_READY.load(Ordering::Acquire) {
        return;
    }
    // SAFETY: a plain read of this backend's database OID.
    let database = u32::from(unsafe { pg_sys::MyDatabaseId });
    let latches = *WORKER_LATCHES.share();
    for (addr, served) in latches.0 {
        if addr != 0 && served == database {
            // SAFETY: the address is a latch in shared memory published by a worker; setting
            // a latch of a process that has since exited is harmless (latches are never freed).
            unsafe { pg_sys::SetLatch(addr as *mut pg_sys::Latch) };
        }
    }
}

/// Arranges for the worker to be woken when the current transaction commits. Cheap after
/// the first call in a transaction.
#[pg_extern(name = "_wake_at_commit", volatile, parallel_unsafe)]
pub fn wake_at_commit() {
    if !SHMEM_READY.load(Ordering::Acquire) || WAKE_REGISTERED.with(Cell::get) {
        return;
    }
    WAKE_REGISTERED.with(|r| r.set(true));
    register_xact_callback(PgXactCallbackEvent::Commit, || {
        WAKE_REGISTERED.with(|r| r.set(false));
        wake_workers();
    });
    register_xact_callback(PgXactCallbackEvent::Abort, || {
        WAKE_REGISTERED.with(|r| r.set(false));
    });
}
