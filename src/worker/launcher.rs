//! The launcher: the one background worker the postmaster starts, which keeps
//! `outbox.workers` delivery workers connected to every database `outbox.database` lists.
//!
//! A background worker connects to one database for life, and the postmaster's own set of
//! workers is fixed at start, so serving a list that a reload may change takes a process
//! that starts and stops workers as the list changes: this one (pg_cron and pg_net serve one
//! database for want of it). It connects to no database and runs no SQL; the workers it
//! starts are registered to die with it (never restarted by the postmaster), so after a
//! crash-restart of the server, or a restart of the launcher, there is exactly one set.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;

use crate::guc;
use crate::wake::SLOTS;

/// The launcher's process type, as `pg_stat_activity.backend_type` shows it.
pub const LAUNCHER_TYPE: &str = "webhook_outbox launcher";
/// The workers' process type.
pub const WORKER_TYPE: &str = "webhook_outbox worker";

/// First wait before starting a worker again that stopped (a terminated worker, or one
/// that asked for a restart after a reload). Doubled each time it stops again soon after it
/// started (a database that does not exist yet, a role that cannot log in), up to
/// `MAX_BACKOFF`, so such a mistake logs a line every few seconds instead of a storm.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A worker that ran at least this long before it stopped counts as having worked: the
/// next start waits only `MIN_BACKOFF`.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// The longest sleep: the postmaster wakes the launcher when a worker starts or stops, so
/// this only bounds the delay of a start that failed for lack of a free worker slot.
const IDLE_WAIT: Duration = Duration::from_secs(5);

/// Registers the launcher; only possible while `shared_preload_libraries` is processed. It
/// starts once recovery has finished: a hot standby runs no worker (its primary delivers),
/// and promotion starts it.
pub fn register() {
    BackgroundWorkerBuilder::new(LAUNCHER_TYPE)
        .set_type(LAUNCHER_TYPE)
        .set_function("webhook_outbox_launcher_main")
        .set_library("webhook_outbox")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

/// One worker the launcher wants running: which database, and which of its workers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Want {
    database: String,
    index: usize,
}

/// What the launcher knows of one wanted worker.
struct Running {
    handle: Option<DynamicBackgroundWorker>,
    /// Its latch slot in shared memory (kept across restarts of the worker).
    slot: usize,
    started: Option<Instant>,
    /// When it may be started (again).
    not_before: Instant,
    backoff: Duration,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn webhook_outbox_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // Connected to no database, as PostgreSQL's own launchers are: only so that it shows in
    // pg_stat_activity.
    BackgroundWorker::connect_worker_to_spi(None, None);
    let mut workers: HashMap<Want, Running> = HashMap::new();
    let mut wants = wanted();
    let mut warned_full = false;
    loop {
        if BackgroundWorker::sigterm_received() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: main thread, outside any transaction, as the postmaster expects.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            wants = wanted();
        }
        // Databases no longer listed: their workers stop (and are not started again).
        workers.retain(|w, running| {
            let keep = wants.contains(w);
            if !keep {
                if let Some(h) = running.handle.take() {
                    let _ = h.terminate();
                }
            }
            keep
        });
        let now = Instant::now();
        let mut wait = IDLE_WAIT;
        for want in &wants {
            let Some(slot) = slot_for(want, &workers) else {
                continue;
            };
            let running = workers.entry(want.clone()).or_insert(Running {
                handle: None,
                slot,
                started: None,
                not_before: now,
                backoff: MIN_BACKOFF,
            });
            if let Some(h) = &running.handle {
                match h.pid() {
                    Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted) => continue,
                    Err(_) => {
                        // Stopped: start it again, later if it did not last.
                        running.handle = None;
                        let lasted = running.started.map(|s| s.elapsed()).unwrap_or_default();
                        running.backoff = if lasted >= STABLE_AFTER {
                            MIN_BACKOFF
                        } else {
                            (running.backoff * 2).min(MAX_BACKOFF)
                        };
                        running.not_before = now + running.backoff;
                    }
                }
            }
            if now < running.not_before {
                wait = wait.min(running.not_before - now);
                continue;
            }
            match start(want, running.slot) {
                Some(h) => {
                    running.handle = Some(h);
                    running.started = Some(now);
                    warned_full = false;
                }
                None => {
                    if !warned_full {
                        warning!(
                            "webhook_outbox launcher: no background worker slot is free for a worker of database \"{}\"; \
                             raise max_worker_processes (each listed database takes outbox.workers of them, plus one for the launcher)",
                            want.database
                        );
                        warned_full = true;
                    }
                    running.not_before = now + IDLE_WAIT;
                }
            }
        }
        // False on SIGTERM (which it consumes) or when the postmaster died.
        if !BackgroundWorker::wait_latch(Some(wait)) {
            break;
        }
    }
    // Stopped by itself (pg_terminate_backend): the workers go too, so that the launcher
    // the postmaster starts next finds none it does not know of. At server shutdown they
    // are being stopped anyway.
    for (_, running) in workers {
        if let Some(h) = running.handle {
            let _ = h.terminate();
        }
    }
    // Exit code 1: the postmaster starts the launcher again after its restart time (it
    // restarts nothing once the server is shutting down).
    unsafe { pg_sys::proc_exit(1) };
}

/// The workers the settings ask for, in a stable order.
fn wanted() -> Vec<Want> {
    let per_database = guc::WORKERS.get().max(1) as usize;
    guc::databases()
        .into_iter()
        .flat_map(|database| {
            (0..per_database).map(move |index| Want {
                database: database.clone(),
                index,
            })
        })
        .collect()
}

/// The latch slot of `want`: the one it has, or the lowest no other worker has.
fn slot_for(want: &Want, workers: &HashMap<Want, Running>) -> Option<usize> {
    if let Some(r) = workers.get(want) {
        return Some(r.slot);
    }
    (0..SLOTS).find(|s| workers.values().all(|r| r.slot != *s))
}

/// Starts the worker `want` in latch slot `slot`; `None` when the postmaster has no
/// background worker slot free (max_worker_processes).
fn start(want: &Want, slot: usize) -> Option<DynamicBackgroundWorker> {
    let name = if want.index == 0 {
        format!("{WORKER_TYPE} {}", want.database)
    } else {
        format!("{WORKER_TYPE} {} {}", want.database, want.index)
    };
    BackgroundWorkerBuilder::new(&name)
        .set_type(WORKER_TYPE)
        .set_function("webhook_outbox_worker_main")
        .set_library("webhook_outbox")
        .set_argument(Some(pg_sys::Datum::from(super::encode_argument(
            slot, want.index,
        ))))
        .set_extra(&want.database)
        .enable_spi_access()
        // SAFETY: a plain read of this process's id.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .set_restart_time(None)
        .load_dynamic()
        .ok()
}
