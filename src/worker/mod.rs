//! The background worker: reads the event log and claims due deliveries, hands the
//! requests to the sender's threads, and records what happened — all SQL on this process's
//! main thread, all HTTP off it.
//!
//! One cycle: take finished outcomes → one transaction that records those of claimed
//! deliveries, closes the open batch of the log once its first attempts' outcomes are in
//! (writing each of its deliveries once, as its attempt left it), claims due retries and
//! reads the next batch into the free request slots (a small batch answered in full is
//! closed after the next one is read and its attempts are out) → submit the requests →
//! sleep on the latch and the sender's eventfd until a commit, an outcome, a retry coming
//! due, the batch's hold ending or the poll interval. Reading, sending and recording
//! overlap: the main thread never waits for HTTP.

pub mod launcher;
mod store;

use std::time::Duration;

use outbox_sender::{Config, Sender};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

use crate::guc::{self, WorkerSettings};
use crate::wake;
use outbox_core::pace::InFlight;
use store::Record;

/// How long a stopping worker lets requests in flight finish before it records what it has.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a cycle failed, so a persistent error (a dropped table) is not a hot loop.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// Longest sleep while the extension is not created in the worker's database.
const NOT_READY_POLL: Duration = Duration::from_secs(5);
/// How often retention looks for expired rows when the last look found none left, at most:
/// short retention ages are checked more often (a tenth of the age, at least every second).
const RETENTION_EVERY: Duration = Duration::from_secs(60);
/// Deliveries deleted per retention transaction: small, so it never holds locks for long.
const RETENTION_BATCH: i32 = 1000;
/// How often the first worker looks for log partitions it can truncate (a look that finds
/// none costs a few index probes).
const ROTATE_EVERY: Duration = Duration::from_secs(1);
/// How long a batch of the log stays open for its first attempts' outcomes. Closed with all
/// of them in, its successes are written once, as delivered; what is still out by then is
/// written in flight (and acknowledged later like any claimed delivery), so one slow
/// receiver holds the reading of the log back by this much at most.
const BATCH_HOLD: Duration = Duration::from_millis(250);
/// How long after a claim that found nothing more due batches may follow each other
/// without another claim: what others queue meanwhile (an operator's retry, an enabled
/// endpoint's backlog) waits at most about this long.
const QUEUE_CLEAR_FOR: Duration = Duration::from_millis(200);
/// The next batch is read before the last one closes only when that one held at most
/// 1/READ_FIRST_SHARE of the free request slots, so that the next gets most of them. Under a
/// backlog batches fill the slots: reading each into what the one before left would split
/// every batch from then on in two, each paying a read and a close of its own.
const READ_FIRST_SHARE: usize = 4;

/// The argument the launcher gives a worker: its latch slot in the low half, which of its
/// database's workers it is in the high half.
fn encode_argument(slot: usize, index: usize) -> u64 {
    ((index as u64) << 32) | slot as u64
}

fn decode_argument(arg: u64) -> (usize, usize) {
    ((arg & 0xffff_ffff) as usize, (arg >> 32) as usize)
}

/// Started by the launcher for one database (its name in `bgw_extra`).
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn webhook_outbox_worker_main(arg: pg_sys::Datum) {
    let (slot, index) = decode_argument(arg.value() as u64);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let settings = WorkerSettings::read(BackgroundWorker::get_extra());
    BackgroundWorker::connect_worker_to_spi(Some(&settings.database), settings.role.as_deref());
    pin_session();
    let mut worker = match Worker::start(settings, index) {
        Ok(w) => w,
        Err(e) => {
            log!("webhook_outbox worker: cannot start the HTTP sender: {e}");
            // The launcher starts the worker again after a pause.
            unsafe { pg_sys::proc_exit(1) };
        }
    };
    wake::publish_worker_latch(slot, true);
    log!(
        "webhook_outbox worker started (database \"{}\", role \"{}\", pid {})",
        worker.settings.database,
        worker
            .settings
            .role
            .as_deref()
            .unwrap_or("bootstrap superuser"),
        std::process::id()
    );
    worker.run();
    wake::publish_worker_latch(slot, false);
    worker.stop();
    // The launcher decides whether this worker runs again: it does while its database is
    // listed (after a reload that changed the role or the sender's settings, at once).
    unsafe { pg_sys::proc_exit(0) };
}

/// Session settings of the worker, before it runs any statement. Its search_path is only
/// pg_catalog: a role that can create objects in `public` (a database owner, by default)
/// could otherwise plant a function or operator that an unqualified name in the worker's
/// statements resolves to, and have it run as the worker's role. And it never waits for a
/// lock for long: what users can hold is taken with SKIP LOCKED, and anything else (a table
/// lock taken by hand) fails the cycle after `LOCK_TIMEOUT` instead of stalling delivery.
fn pin_session() {
    for (name, value) in [
        (c"search_path", c"pg_catalog, pg_temp"),
        (c"lock_timeout", LOCK_TIMEOUT),
    ] {
        // SAFETY: main thread, before any transaction; both strings are NUL-terminated and
        // PostgreSQL copies them. PGC_S_OVERRIDE: a reload of postgresql.conf cannot undo it.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            )
        };
    }
}

/// See [`pin_session`].
const LOCK_TIMEOUT: &std::ffi::CStr = c"1s";

struct Worker {
    settings: WorkerSettings,
    /// Which of its database's `outbox.workers` this is; retention runs on the first only.
    slot: usize,
    sender: Sender,
    name: String,
    /// Outcomes taken from the sender but not recorded yet (their transaction failed).
    unrecorded: Vec<Record>,
    failed_cycles: u32,
    /// When retention next runs.
    next_retention: std::time::Instant,
    /// Whether an out-of-date extension version was reported already.
    warned_stale: bool,
    /// The version of the extension's SQL last seen in the database.
    installed: Option<String>,
    /// Whether the leases of a predecessor that died were taken back since this started.
    orphans_taken: bool,
    /// When the log is next rotated.
    next_rotation: std::time::Instant,
    /// When the tables of callers' ids may next take turns.
    next_key_rotation: std::time::Instant,
    /// The part of the log whose first attempts are out, if any.
    batch: Option<store::Batch>,
    /// The part read after it while it was still open (one worker only): its attempts go
    /// out without waiting for the close; it closes after `batch`, and then takes its place.
    next: Option<store::Batch>,
    /// When the last claim found nothing more due (and when its next delivery comes due):
    /// batches are read one after the other without a claim between them only while
    /// nothing queued waits, so that retries and held deliveries still get their turn.
    queue_clear_until: Option<std::time::Instant>,
    /// The log reader's lock this session holds (its key), if it holds it.
    reader_key: Option<i32>,
    /// This worker's requests out, by endpoint: the open batch's attempts start as their
    /// endpoints have room.
    in_flight: InFlight<store::EndpointId>,
}

/// What a successful cycle claimed.
struct Claimed {
    requests: Vec<(store::EndpointId, outbox_sender::Request)>,
    claimed: usize,
    next_due: Option<Duration>,
    /// Outcomes whose rows someone else holds (of claimed deliveries, or of the closed
    /// batch): recorded in a later cycle.
    held: Vec<Record>,
    /// Deliveries of a dead predecessor taken back, when that was done in this cycle.
    orphans: Option<i64>,
    /// Whether the open batch was closed.
    closed: bool,
    /// A batch read in this cycle, its first attempts waiting to start.
    batch: Option<store::Batch>,
    /// The cursor row the closed batch's close wrote, when a batch follows it.
    followed: Option<i64>,
    /// Whether the claim ran, and whether it found fewer than it asked for (nothing more
    /// due now).
    claim_ran: bool,
    claim_short: bool,
    reader_key: Option<i32>,
}

/// Consecutive failed cycles after which unrecorded outcomes are dropped.
const MAX_FAILED_CYCLES: u32 = 3;

/// What one cycle found.
struct CycleResult {
    claimed: usize,
    requested: usize,
    /// Time until the next delivery becomes due, when the queue had nothing more to give.
    next_due: Option<Duration>,
    ready: bool,
}

impl Worker {
    fn start(settings: WorkerSettings, slot: usize) -> std::io::Result<Worker> {
        let config = Config {
            max_in_flight: guc::MAX_IN_FLIGHT_LIMIT as usize,
            max_response_body: settings.max_response_body,
            allow: settings.allowed_targets.clone(),
            extra_roots_pem: settings.ca_file.as_ref().and_then(|f| {
                std::fs::read(f)
                    .map_err(|e| {
                        log!("webhook_outbox worker: cannot read outbox.ca_file \"{f}\": {e}")
                    })
                    .ok()
            }),
            dns_servers: settings.dns_servers.clone(),
            dns_timeout: settings.dns_timeout,
            user_agent: concat!("webhook_outbox/", env!("CARGO_PKG_VERSION")).to_string(),
            ..Config::default()
        };
        let sender = Sender::start(config.clone()).or_else(|e| {
            // A broken CA file must not stop delivery to everyone else: HTTPS endpoints of
            // that CA then fail (and retry) with a certificate error, which says what is wrong.
            log!("webhook_outbox worker: ignoring outbox.ca_file: {e}");
            Sender::start(Config {
                extra_roots_pem: None,
                ..config
            })
        })?;
        Ok(Worker {
            sender,
            name: format!("worker:{}", std::process::id()),
            unrecorded: Vec::new(),
            failed_cycles: 0,
            next_retention: std::time::Instant::now(),
            warned_stale: false,
            installed: None,
            orphans_taken: false,
            next_rotation: std::time::Instant::now(),
            next_key_rotation: std::time::Instant::now(),
            batch: None,
            next: None,
            queue_clear_until: None,
            reader_key: None,
            in_flight: InFlight::default(),
            slot,
            settings,
        })
    }

    /// The main loop; returns when the worker should stop (the launcher starts it again if
    /// its database is still listed).
    fn run(&mut self) {
        loop {
            if BackgroundWorker::sigterm_received() {
                return;
            }
            if BackgroundWorker::sighup_received() {
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                let new = WorkerSettings::read(&self.settings.database);
                if new.role != self.settings.role
                    || new.ca_file != self.settings.ca_file
                    || new.dns_servers != self.settings.dns_servers
                    || new.dns_timeout != self.settings.dns_timeout
                {
                    log!("webhook_outbox worker: outbox.worker_role, outbox.ca_file or outbox.dns_* changed; restarting");
                    return;
                }
                self.sender.set_max_response_body(new.max_response_body);
                self.sender.set_allow_list(new.allowed_targets.clone());
                self.settings = new;
            }

            let cycle = self.cycle();
            self.pace();
            let failed = cycle.is_err();
            let timeout = match cycle {
                Ok(r) if !r.ready => {
                    NOT_READY_POLL.min(self.settings.poll_interval.max(Duration::from_secs(1)))
                }
                // A full batch: more may be due right now.
                Ok(r) if r.claimed == r.requested && r.requested > 0 => Duration::ZERO,
                Ok(r) => {
                    let poll = self.settings.poll_interval;
                    // Rows due "now" that were not claimed are held by another claimer.
                    let due = r.next_due.map(|d| d.max(Duration::from_millis(50)));
                    due.map_or(poll, |d| d.min(poll))
                }
                Err(e) => {
                    log!("webhook_outbox worker: {e}");
                    ERROR_BACKOFF
                }
            };
            // An open batch is closed when its hold ends, even if outcomes are missing (after
            // a failed cycle, the pause comes first).
            let timeout = match &self.batch {
                Some(b) if !failed => timeout.min(BATCH_HOLD.saturating_sub(b.opened.elapsed())),
                _ => timeout,
            };
            self.rotate();
            self.turn_event_keys();
            let timeout = match self.retention() {
                // More expired rows are waiting: come back soon, between delivery cycles.
                Some(true) => timeout.min(Duration::from_millis(100)),
                _ => timeout,
            };
            unsafe { pg_sys::pgstat_report_stat(false) };
            self.wait(timeout);
        }
    }

    /// Sleeps until the latch is set (a commit, a signal), an outcome is ready, or `timeout`.
    /// Exits the process if the postmaster dies.
    fn wait(&self, timeout: Duration) {
        let events = pg_sys::WL_LATCH_SET
            | pg_sys::WL_SOCKET_READABLE
            | pg_sys::WL_TIMEOUT
            | pg_sys::WL_EXIT_ON_PM_DEATH;
        let ms = timeout.as_millis().min(i64::MAX as u128) as std::ffi::c_long;
        unsafe {
            pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                events as i32,
                self.sender.wake_fd(),
                ms,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
    }

    /// Starts the open batches' attempts whose endpoints have room, within the free request
    /// slots, the older batch first.
    fn pace(&mut self) {
        for b in [self.batch.as_mut(), self.next.as_mut()]
            .into_iter()
            .flatten()
        {
            start_ready(
                b,
                &self.sender,
                &mut self.in_flight,
                self.settings.max_in_flight,
            );
        }
    }

    fn take_records(&mut self) {
        let schedule = guc::retry_schedule();
        let outcomes = self.sender.take_outcomes();
        for o in &outcomes {
            self.in_flight.finished(&o.delivery_id);
        }
        self.unrecorded.extend(
            outcomes
                .into_iter()
                .map(|o| Record::from_outcome(o, &schedule)),
        );
    }

    /// Records finished attempts, closes the open batch of the log when its outcomes are in
    /// (or its hold is over), claims queued deliveries and reads the next batch, all in one
    /// transaction.
    fn cycle(&mut self) -> Result<CycleResult, String> {
        self.take_records();
        let free = self
            .settings
            .max_in_flight
            .saturating_sub(self.sender.in_flight());
        let requested = free.min(usize::try_from(self.settings.batch_size).unwrap_or(1));
        let mut records = std::mem::take(&mut self.unrecorded);
        // The open batches' first attempts are recorded when they close.
        let mut open = self.batch.take();
        let mut next = self.next.take();
        for b in [open.as_mut(), next.as_mut()].into_iter().flatten() {
            let (first, rest): (Vec<Record>, Vec<Record>) =
                records.into_iter().partition(|r| b.has(&r.delivery_id));
            first.into_iter().for_each(|r| b.add_outcome(r));
            records = rest;
        }
        let closing = open
            .as_ref()
            .is_some_and(|b| b.complete() || b.opened.elapsed() >= BATCH_HOLD);
        if closing {
            // What has not started by now is claimed later, as a queued delivery.
            if let Some(b) = open.as_mut() {
                b.withdraw();
            }
        }
        let close_queues = closing && open.as_ref().is_some_and(store::Batch::leaves_queued);
        // With a batch open whose attempts are all out, the next part can be read and sent
        // before it closes — while nothing queued waits for a claim (claims wait while a
        // batch is open), and with one worker only (`store::read_batch`).
        let queue_clear = self
            .queue_clear_until
            .is_some_and(|t| std::time::Instant::now() < t);
        let can_pipeline = next.is_none()
            && queue_clear
            && free > 0
            && self
                .installed
                .as_deref()
                .is_some_and(store::has_log_batches)
            && guc::WORKERS.get() <= 1
            && open
                .as_ref()
                .is_some_and(|b| store::Batch::all_started(b) && !b.follows);
        let pipelined = !closing && can_pipeline;
        // A small batch whose answers are all in is closed after the next part is read and
        // its attempts are out: what committed meanwhile waits for one read, not for the
        // close as well. (The two batches together hold no more attempts than the request
        // slots, answered ones included: what a crash before the close sends again.)
        let first_slots = match open.as_ref() {
            Some(b)
                if closing
                    && can_pipeline
                    && b.complete()
                    && b.outcomes() * READ_FIRST_SHARE <= free =>
            {
                free.saturating_sub(b.outcomes())
            }
            _ => 0,
        };
        // While a batch waits for its outcomes, and nothing can be read beside it, retries
        // wait for its close: a wake-up that brings nothing else to record costs no
        // transaction.
        if open.is_some() && !closing && records.is_empty() && !pipelined {
            self.batch = open;
            self.next = next;
            return Ok(CycleResult {
                claimed: 0,
                requested: 0,
                next_due: None,
                ready: true,
            });
        }
        report_activity(Some(&format!(
            "webhook_outbox: record {} outcomes, claim up to {requested}",
            records.len()
        )));
        let mut installed = None;
        let (settings, name) = (&self.settings, self.name.as_str());
        let take_orphans = !self.orphans_taken;
        let reader_key = self.reader_key;
        let open_ref = open.as_ref();
        let next_ref = next.as_ref();
        let (sender, in_flight) = (&self.sender, &mut self.in_flight);
        // The part read before the close, kept whatever becomes of the transaction: its
        // attempts are out.
        let mut first: Option<store::Batch> = None;
        let first_ref = &mut first;
        let outcome = in_transaction(|| {
            Spi::connect_mut(|client| -> Result<Option<Claimed>, String> {
                let Some(version) = store::installed_version(client)? else {
                    return Ok(None);
                };
                installed = Some(version.clone());
                // (The session holds the reader's lock: it has a batch open.)
                if let (Some(b), true, Some(_)) = (open_ref, first_slots > 0, reader_key) {
                    let slots = i32::try_from(first_slots).unwrap_or(i32::MAX);
                    let own = |e: &store::EndpointId| in_flight.to(e);
                    if let Some(mut read) =
                        store::read_batch(client, slots, &own, Some(b), settings)?
                    {
                        start_ready(&mut read, sender, in_flight, settings.max_in_flight);
                        debug1!(
                            "webhook_outbox worker: {} attempts of the next batch read before the last one closes",
                            read.attempts()
                        );
                        *first_ref = Some(read);
                    }
                }
                let in_flight = &*in_flight;
                let orphans = if take_orphans && store::has_lock_free_acks(&version) {
                    Some(store::requeue_orphaned(client)?)
                } else {
                    None
                };
                let held = store::record_lockable(client, &records, name, &version)?;
                let (closed, deferred) = match open_ref {
                    Some(b) if closing => {
                        (true, store::close_batch(client, b, name, settings.lease)?)
                    }
                    _ => (false, Vec::new()),
                };
                let next_ref = next_ref.or(first_ref.as_ref());
                // The batch read after the one just closed was read from the row that close
                // wrote.
                let followed = match next_ref {
                    Some(_) if closed => Some(store::newest_cursor(client)?),
                    _ => None,
                };
                // What stays open after this transaction.
                let still_open = if closed { next_ref } else { open_ref };
                // Claims wait while a batch stays open: with one worker its attempts count
                // against their endpoints' max_in_flight only in its memory until it closes
                // (outbox._batches_counted).
                let (requests, unsendable) = if requested > 0 && still_open.is_none() {
                    store::claim(client, requested as i32, name, settings, &version)?
                } else {
                    (Vec::new(), Vec::new())
                };
                let claim_ran = requested > 0 && still_open.is_none();
                let claim_short = claim_ran && requests.len() + unsendable.len() < requested;
                let dead: Vec<Record> = unsendable
                    .into_iter()
                    .map(Record::from_unsendable)
                    .collect();
                store::record(client, &dead, name)?;
                // The next batch, into the request slots the claim left free: after the
                // one still open, if any (read from where the cursor will be once it closes).
                // A crash before the closes sends both batches again, answered attempts
                // included: together they hold no more than the worker's request slots.
                let left = if closed {
                    free
                } else {
                    free.saturating_sub(open_ref.map_or(0, store::Batch::outcomes))
                }
                .saturating_sub(requests.len());
                let mut key = reader_key;
                let mut batch = None;
                // With no slot free the part is only made into deliveries, so that other
                // workers and external senders can take them.
                let after = match still_open {
                    None => Some(None),
                    Some(b) if pipelined && !closed && left > 0 && !b.follows => Some(Some(b)),
                    Some(_) => None,
                };
                if let (true, Some(after)) = (store::has_log_batches(&version), after) {
                    key = store::hold_reader_lock(client, reader_key)?;
                    if key.is_some() {
                        let slots = i32::try_from(left).unwrap_or(i32::MAX);
                        // The requests just claimed are this worker's too.
                        let mut own = InFlight::default();
                        for (endpoint, r) in &requests {
                            own.started(r.delivery_id, *endpoint);
                        }
                        let own = |e: &store::EndpointId| in_flight.to(e) + own.to(e);
                        batch = store::read_batch(client, slots, &own, after, settings)?;
                    }
                }
                let claimed =
                    requests.len() + dead.len() + batch.as_ref().map_or(0, |b| b.waiting.len());
                let next_due = if claim_short {
                    store::next_due(client)?
                } else {
                    None
                };
                Ok(Some(Claimed {
                    requests,
                    claimed,
                    next_due,
                    held: held.into_iter().chain(deferred).collect(),
                    orphans,
                    closed,
                    batch,
                    reader_key: key,
                    followed,
                    claim_ran,
                    claim_short,
                }))
            })
        });
        report_activity(None);
        self.note_installed(installed);
        let next = next.or(first);
        match outcome {
            Ok(Some(c)) => {
                self.failed_cycles = 0;
                self.unrecorded = c.held;
                self.reader_key = c.reader_key;
                // What is open now, in closing order.
                let mut opened: Vec<store::Batch> = Vec::with_capacity(2);
                if !c.closed {
                    opened.extend(open);
                }
                if let Some(mut n) = next {
                    if let Some(id) = c.followed {
                        n.follow(id);
                    }
                    opened.push(n);
                }
                opened.extend(c.batch);
                let mut opened = opened.into_iter();
                self.batch = opened.next();
                self.next = opened.next();
                if c.claim_short {
                    // Nothing more was due: until the next delivery comes due (or a
                    // moment, for what others queue meanwhile), batches may follow each
                    // other without a claim between them.
                    let until = c.next_due.unwrap_or(QUEUE_CLEAR_FOR).min(QUEUE_CLEAR_FOR);
                    self.queue_clear_until = Some(std::time::Instant::now() + until);
                } else if c.claim_ran || (c.closed && close_queues) {
                    // Something waits for a claim: a full one, or deliveries the close
                    // queued (which the next cycle's claim takes).
                    self.queue_clear_until = None;
                }
                if let Some(n) = c.orphans {
                    self.orphans_taken = true;
                    if n > 0 {
                        log!("webhook_outbox worker: took back {n} deliveries a stopped worker had in flight");
                    }
                }
                for (endpoint, r) in c.requests {
                    self.in_flight.started(r.delivery_id, endpoint);
                    self.sender.submit(r);
                }
                Ok(CycleResult {
                    claimed: c.claimed,
                    requested,
                    next_due: c.next_due,
                    ready: true,
                })
            }
            // The extension is not (or no longer) there: nothing to record outcomes in, and
            // their deliveries went with it.
            Ok(None) => {
                self.reader_key = None;
                Ok(CycleResult {
                    claimed: 0,
                    requested,
                    next_due: None,
                    ready: false,
                })
            }
            Err(e) => {
                // Rolled back: nothing claimed, nothing recorded, no batch closed or read.
                // Keep the outcomes for the next cycle, unless they keep failing: then their
                // leases expire and the deliveries are sent again, which at-least-once
                // allows.
                // The open batches are never given up: their attempts went out, and only
                // their closes record them (dropped, they would all be sent again).
                self.batch = open;
                self.next = next;
                self.failed_cycles += 1;
                if self.failed_cycles < MAX_FAILED_CYCLES {
                    self.unrecorded = records;
                } else if !records.is_empty() {
                    log!(
                        "webhook_outbox worker: giving up recording {} attempts; their deliveries will be retried after their leases expire",
                        records.len()
                    );
                }
                Err(e)
            }
        }
    }

    /// Remembers the installed SQL version and says once when it is older than the library.
    fn note_installed(&mut self, installed: Option<String>) {
        let library = env!("CARGO_PKG_VERSION");
        if let Some(v) = installed.as_deref().filter(|v| *v != library) {
            if !self.warned_stale {
                log!(
                    "webhook_outbox worker: the extension in this database is version {v} but the library is {library}; \
                     delivery goes on, but run ALTER EXTENSION webhook_outbox UPDATE (retention waits until then)"
                );
                self.warned_stale = true;
            }
        }
        if installed.is_some() {
            self.installed = installed;
        }
    }

    /// Deletes one batch of expired rows when it is time; returns whether a full batch went
    /// (more may be waiting), or `None` when it did not run.
    fn retention(&mut self) -> Option<bool> {
        let now = std::time::Instant::now();
        if self.slot != 0
            || now < self.next_retention
            || (self.settings.retention_delivered.is_none()
                && self.settings.retention_dead.is_none())
        {
            return None;
        }
        let (delivered, dead) = (
            self.settings.retention_delivered,
            self.settings.retention_dead,
        );
        // Retention needs this release's SQL; with older SQL it waits for the update (the
        // delivery cycle says so in the log).
        let every = retention_interval([delivered, dead].into_iter().flatten().min());
        if self.installed.as_deref() != Some(env!("CARGO_PKG_VERSION")) {
            self.next_retention = now + every;
            return None;
        }
        report_activity(Some("webhook_outbox: retention"));
        let result = in_transaction(|| {
            Spi::connect_mut(|client| {
                if store::extension_ready(client)? {
                    store::purge_batch(client, delivered, dead, RETENTION_BATCH)
                } else {
                    Ok(0)
                }
            })
        });
        report_activity(None);
        let more = match result {
            Ok(n) => n >= i64::from(RETENTION_BATCH),
            Err(e) => {
                log!("webhook_outbox worker: retention: {e}");
                false
            }
        };
        self.next_retention = if more { now } else { now + every };
        Some(more)
    }

    /// Gives the turn to the other table of callers' ids once the current one's is over,
    /// and catches the turn's number up with its sequence (see `outbox._rotate_event_keys`):
    /// at the start, and then a tenth of `outbox.retention_delivered` apart (1 s to 60 s),
    /// retention or not. Not more often: a turn that cannot be had (enqueuers hold their
    /// tables) makes those enqueueing ids wait up to 100 ms each time it is tried.
    fn turn_event_keys(&mut self) {
        let now = std::time::Instant::now();
        if self.slot != 0
            || now < self.next_key_rotation
            || self.installed.as_deref() != Some(env!("CARGO_PKG_VERSION"))
        {
            return;
        }
        let delivered = self.settings.retention_delivered;
        self.next_key_rotation = now + retention_interval(delivered);
        let result = in_transaction(|| {
            Spi::connect_mut(|client| {
                if store::extension_ready(client)? {
                    store::rotate_event_keys(client, delivered).map(|_| ())
                } else {
                    Ok(())
                }
            })
        });
        if let Err(e) = result {
            log!("webhook_outbox worker: the tables of event ids: {e}");
        }
    }

    /// Truncates the log partitions (and cursor rows) that have been read, on the worker
    /// that reads the log (trimming the cursor's rows takes the reader's lock), once a
    /// second; and corrects endpoints' in-flight counts that drifted. Needs this release's
    /// SQL, like retention.
    fn rotate(&mut self) {
        let now = std::time::Instant::now();
        if self.reader_key.is_none()
            || now < self.next_rotation
            || self.installed.as_deref() != Some(env!("CARGO_PKG_VERSION"))
        {
            return;
        }
        self.next_rotation = now + ROTATE_EVERY;
        let batch_open = self.batch.is_some();
        report_activity(Some("webhook_outbox: log rotation"));
        let result = in_transaction(|| {
            Spi::connect_mut(|client| {
                if store::extension_ready(client)? {
                    // Not while a batch is open: with several workers its attempts are
                    // counted and have no delivery rows yet.
                    if !batch_open {
                        store::recount_endpoints(client)?;
                    }
                    store::rotate_log(client)
                } else {
                    Ok(0)
                }
            })
        });
        report_activity(None);
        if let Err(e) = result {
            log!("webhook_outbox worker: log rotation: {e}");
        }
    }

    /// Stops taking work, lets requests in flight finish briefly, and records them (closing
    /// the open batch: what is still out is recorded in flight, and the next worker takes
    /// it back).
    fn stop(self) {
        let Worker {
            sender,
            name,
            mut unrecorded,
            batch,
            next,
            settings,
            ..
        } = self;
        let schedule = guc::retry_schedule();
        let in_flight = sender.in_flight();
        // Attempts of the batches not started are left for the next worker, as deliveries.
        let mut batches: Vec<store::Batch> = batch.into_iter().chain(next).collect();
        for b in &mut batches {
            b.withdraw();
        }
        let outcomes = sender.shutdown(SHUTDOWN_GRACE);
        for r in outcomes
            .into_iter()
            .map(|o| Record::from_outcome(o, &schedule))
        {
            match batches.iter_mut().find(|b| b.has(&r.delivery_id)) {
                Some(b) => b.add_outcome(r),
                None => unrecorded.push(r),
            }
        }
        if unrecorded.is_empty() && batches.is_empty() {
            return;
        }
        let n = unrecorded.len() + batches.iter().map(store::Batch::outcomes).sum::<usize>();
        let result = in_transaction(|| {
            Spi::connect_mut(|client| match store::installed_version(client)? {
                Some(version) => {
                    let mut held = store::record_lockable(client, &unrecorded, &name, &version)?;
                    // In order: the second was read from the cursor row the first's close writes.
                    for (i, b) in batches.iter_mut().enumerate() {
                        if i > 0 {
                            b.follow(store::newest_cursor(client)?);
                        }
                        held.extend(store::close_batch(client, b, &name, settings.lease)?);
                    }
                    Ok(held)
                }
                None => Ok(Vec::new()),
            })
        });
        match result {
            Ok(held) if !held.is_empty() => log!(
                "webhook_outbox worker stopping: recorded {} attempts; {} wait on rows someone holds and will be sent again after their leases",
                n.saturating_sub(held.len()),
                held.len()
            ),
            Ok(_) => log!("webhook_outbox worker stopping: recorded {n} attempts ({in_flight} were in flight)"),
            Err(e) => log!("webhook_outbox worker stopping: could not record {n} attempts: {e}"),
        }
    }
}

/// How often retention looks for what `age` (None: no age) has made expire: a tenth of it,
/// from a second to RETENTION_EVERY.
fn retention_interval(age: Option<Duration>) -> Duration {
    age.map_or(RETENTION_EVERY, |a| {
        (a / 10).clamp(Duration::from_secs(1), RETENTION_EVERY)
    })
}

/// Starts `b`'s attempts whose endpoints have room, within the request slots free now.
fn start_ready(
    b: &mut store::Batch,
    sender: &Sender,
    in_flight: &mut InFlight<store::EndpointId>,
    max_in_flight: usize,
) {
    if b.waiting.is_empty() {
        return;
    }
    let free = max_in_flight.saturating_sub(sender.in_flight());
    for (endpoint, r) in b.waiting.ready(in_flight, free) {
        in_flight.started(r.delivery_id, endpoint);
        sender.submit(r);
    }
}

/// Shows what the worker is doing in `pg_stat_activity.query` (and in lock and deadlock
/// reports), or that it is idle.
fn report_activity(what: Option<&str>) {
    let text = std::ffi::CString::new(what.unwrap_or("")).unwrap_or_default();
    let state = if what.is_some() {
        pg_sys::BackendState::STATE_RUNNING
    } else {
        pg_sys::BackendState::STATE_IDLE
    };
    // SAFETY: called on the main thread; PostgreSQL copies the text.
    unsafe { pg_sys::pgstat_report_activity(state, text.as_ptr()) };
}

/// Runs `f` in its own transaction, committed when `f` returns `Ok` and rolled back when it
/// returns `Err` (nothing of a cycle that failed halfway is kept: an outcome recorded or a
/// batch closed in it would otherwise be recorded twice). An ERROR inside rolls the
/// transaction back too and comes back as `Err` with its message, so one bad cycle never
/// takes the worker down.
fn in_transaction<R>(f: impl FnOnce() -> Result<R, String>) -> Result<R, String> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    PgTryBuilder::new(std::panic::AssertUnwindSafe(move || {
        let r = f();
        unsafe {
            pg_sys::PopActiveSnapshot();
            if r.is_ok() {
                pg_sys::CommitTransactionCommand();
            } else {
                pg_sys::AbortCurrentTransaction();
            }
        }
        r
    }))
    .catch_others(|e| {
        unsafe { pg_sys::AbortCurrentTransaction() };
        Err(describe(&e))
    })
    .execute()
}

fn describe(e: &CaughtError) -> String {
    match e {
        CaughtError::PostgresError(r)
        | CaughtError::ErrorReport(r)
        | CaughtError::RustPanic { ereport: r, .. } => {
            format!("{} (SQLSTATE {:?})", r.message(), r.sql_error_code())
        }
    }
}
