//! Every GUC of the extension, with its default and the reason it exists.
//!
//! All of them are `SIGHUP` or `SUSET` (changeable with `ALTER SYSTEM` + `pg_reload_conf()`,
//! and per session by a superuser where that is useful) so that the library can be loaded late (on first use)
//! without "cannot create PGC_POSTMASTER variables after startup".

use std::ffi::{c_char, c_void, CStr, CString};

use outbox_core::retry::{RetrySchedule, DEFAULT_SCHEDULE};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::{pg_guard, pg_sys};

/// Largest payload `outbox.enqueue` accepts, in bytes of its JSON text. Receivers and the
/// specification prefer small payloads; a limit keeps one runaway producer from filling the
/// queue with megabyte rows.
pub static MAX_PAYLOAD_SIZE: GucSetting<i32> = GucSetting::<i32>::new(256 * 1024);

/// Delays between attempts, e.g. '5s, 5m, 30m, 2h, 5h, 10h, 10h'; after the last, dead.
pub static RETRY_SCHEDULE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"5s, 5m, 30m, 2h, 5h, 10h, 10h"));

/// Databases the workers serve (where `CREATE EXTENSION webhook_outbox` ran), separated by
/// commas: the launcher keeps `outbox.workers` workers connected to each.
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// Role the worker connects as; empty = the bootstrap superuser. A dedicated login role
/// given `outbox.grant_worker()` needs no superuser rights and no table privileges.
pub static WORKER_ROLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
/// A PEM file of extra trusted root certificates (a private CA), on top of the system's.
pub static CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
/// Deliveries claimed per round trip: large enough to amortise the claim's cost, small
/// enough that one claim is a short transaction.
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(200);
/// Requests in flight at once across all endpoints.
pub static MAX_IN_FLIGHT: GucSetting<i32> = GucSetting::<i32>::new(256);
/// Default per-request timeout (an endpoint's own timeout wins).
pub static REQUEST_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
/// How long a claim holds a delivery. Requests are cut off 5 s before it ends, so an attempt
/// never outlives its lease and a delivery is never sent by two senders at once.
pub static LEASE_S: GucSetting<i32> = GucSetting::<i32>::new(60);
/// The longest the worker sleeps without looking at the queue. Commits of `outbox.enqueue`
/// wake it at once; this only bounds the delay for rows written other ways.
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);
/// Bytes of each response body kept in the attempt history.
pub static MAX_RESPONSE_BODY: GucSetting<i32> = GucSetting::<i32>::new(1024);

/// Name servers the worker asks instead of those of /etc/resolv.conf (`ip` or `ip:port`,
/// comma-separated); empty = the system's. Changing it restarts the worker.
pub static DNS_SERVERS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
/// How long resolving one name may take; an endpoint whose DNS never answers then fails
/// its attempt (and is retried) without holding up anyone else's. Changing it restarts the
/// worker.
pub static DNS_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);

/// Private and special-purpose targets the worker may contact anyway (the SSRF guard refuses
/// them by default): CIDR blocks and exact host names, comma-separated.
pub static ALLOWED_TARGETS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));

/// How long delivered (and cancelled) deliveries are kept; 0 keeps them forever.
pub static RETENTION_DELIVERED_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 86_400);
/// How long dead deliveries are kept; 0 keeps them forever.
pub static RETENTION_DEAD_S: GucSetting<i32> = GucSetting::<i32>::new(30 * 86_400);

/// Whether every status change of a delivery is published with NOTIFY (outbox_feed…). Off
/// by default: PostgreSQL serializes the commits of all transactions that NOTIFY, so a
/// feed nobody listens to would cap every producer's commit rate.
pub static LIVE_FEED: GucSetting<bool> = GucSetting::<bool>::new(false);
/// An endpoint (id) that receives operator events as webhooks; empty = NOTIFY only.
pub static OPERATOR_ENDPOINT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));

/// Consecutive failed attempts that open an endpoint's circuit; 0 turns the breaker off.
pub static CIRCUIT_THRESHOLD: GucSetting<i32> = GucSetting::<i32>::new(10);
/// How long an opened circuit waits before its first probe.
pub static CIRCUIT_COOLDOWN_S: GucSetting<i32> = GucSetting::<i32>::new(60);
/// The cap on a circuit's cool-down, which doubles after each failed probe.
pub static CIRCUIT_MAX_COOLDOWN_S: GucSetting<i32> = GucSetting::<i32>::new(3_600);
/// An endpoint whose attempts have all failed for this long is disabled; 0 = never.
pub static AUTO_DISABLE_AFTER_S: GucSetting<i32> = GucSetting::<i32>::new(5 * 86_400);
/// Requests in flight to one endpoint at most, unless the endpoint sets its own; 0 = no
/// limit. Keeps one slow receiver from holding every slot of `outbox.max_in_flight`.
pub static ENDPOINT_MAX_IN_FLIGHT: GucSetting<i32> = GucSetting::<i32>::new(64);

/// Worker processes started at server start. More than one helps only when one worker's
/// main thread (its SQL) is the bottleneck and cores are free.
pub static WORKERS: GucSetting<i32> = GucSetting::<i32>::new(1);

/// The most requests the sender can ever hold; `outbox.max_in_flight` moves below it
/// without a restart.
pub const MAX_IN_FLIGHT_LIMIT: i32 = 10_000;

/// `outbox.workers` sizes shared memory and the set of background workers, so it exists
/// only when the library is preloaded (a postmaster setting cannot be created later).
pub fn register_postmaster() {
    GucRegistry::define_int_guc(
        c"outbox.workers",
        c"Delivery worker processes per database in outbox.database (a restart applies a change).",
        c"Each claims with SKIP LOCKED and holds its own outbox.max_in_flight requests.",
        &WORKERS,
        1,
        crate::wake::MAX_WORKERS as i32,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

/// Makes the `outbox.` prefix the extension's: a name under it that is not one of its
/// settings (a typo such as `outbox.retry_schedul`) is an error when set, and is dropped
/// with a warning from the configuration file, instead of being silently ignored.
pub fn reserve_prefix() {
    // SAFETY: a NUL-terminated literal; called from _PG_init on the main thread.
    #[cfg(not(any(feature = "pg13", feature = "pg14")))]
    unsafe {
        pgrx::pg_sys::MarkGUCPrefixReserved(c"outbox".as_ptr())
    };
    // Before PostgreSQL 15 the most there is: a warning for each unknown name.
    #[cfg(any(feature = "pg13", feature = "pg14"))]
    unsafe {
        pgrx::pg_sys::EmitWarningsOnPlaceholders(c"outbox".as_ptr())
    };
}

/// Checks a text setting with `parse` when it is set (`SET`, `ALTER SYSTEM`, a reload of
/// postgresql.conf): a value that does not parse is refused then, with the parser's reason,
/// instead of being found wrong (and replaced by a default) when it is first used.
///
/// # Safety
/// `newval` is what PostgreSQL passes a string check hook.
unsafe fn check_text(newval: *mut *mut c_char, parse: fn(&str) -> Result<(), String>) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to a NUL-terminated string (or NULL).
    let text = unsafe {
        if newval.is_null() || (*newval).is_null() {
            String::new()
        } else {
            CStr::from_ptr(*newval).to_string_lossy().into_owned()
        }
    };
    match parse(&text) {
        Ok(()) => true,
        Err(reason) => {
            let detail = CString::new(reason.replace('\0', "")).unwrap_or_default();
            // SAFETY: PostgreSQL reports this palloc'd copy with the refusal.
            unsafe { pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr()) };
            false
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_retry_schedule(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: called by PostgreSQL as a string check hook.
    unsafe { check_text(newval, |t| RetrySchedule::parse(t).map(drop)) }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_allowed_targets(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: called by PostgreSQL as a string check hook.
    unsafe { check_text(newval, |t| outbox_core::ssrf::AllowList::parse(t).map(drop)) }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_databases(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: called by PostgreSQL as a string check hook.
    unsafe { check_text(newval, |t| outbox_core::validate::databases(t).map(drop)) }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_dns_servers(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: called by PostgreSQL as a string check hook.
    unsafe { check_text(newval, |t| outbox_core::validate::name_servers(t).map(drop)) }
}

pub fn register() {
    // SAFETY: the hook is a valid string check hook for the life of the process.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.database",
            c"Databases the webhook_outbox workers serve, comma-separated, e.g. 'app, billing'.",
            c"A reload starts workers for databases added and stops those of databases removed.",
            &DATABASE,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_databases),
            None,
            None,
        )
    };
    GucRegistry::define_string_guc(
        c"outbox.worker_role",
        c"Role the webhook_outbox worker connects as (empty: the bootstrap superuser).",
        c"Give the role outbox.grant_worker(); the worker restarts when this changes.",
        &WORKER_ROLE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"outbox.ca_file",
        c"PEM file of extra trusted CA certificates for HTTPS endpoints (empty: system roots only).",
        c"Read by the worker at start; the worker restarts when this changes.",
        &CA_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    // SAFETY: the hook is #[pg_guard]ed and only reads the value it is given.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.dns_servers",
            c"Name servers the worker asks (ip or ip:port, comma-separated); empty = /etc/resolv.conf.",
            c"Changing it restarts the worker.",
            &DNS_SERVERS,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_dns_servers),
            None,
            None,
        )
    };
    GucRegistry::define_int_guc(
        c"outbox.dns_timeout",
        c"How long resolving one endpoint's host name may take.",
        c"A name whose servers never answer fails its attempt after this (and is retried). Changing it restarts the worker.",
        &DNS_TIMEOUT_MS,
        100,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.batch_size",
        c"Deliveries the worker claims per round trip.",
        c"",
        &BATCH_SIZE,
        1,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.max_in_flight",
        c"HTTP requests the worker has in flight at once.",
        c"",
        &MAX_IN_FLIGHT,
        1,
        MAX_IN_FLIGHT_LIMIT,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.request_timeout",
        c"Default timeout of one delivery attempt (an endpoint's own timeout wins).",
        c"",
        &REQUEST_TIMEOUT_MS,
        100,
        300_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.lease",
        c"How long a claim holds a delivery before another sender may take it.",
        c"Requests are cut off 5 seconds before the lease ends.",
        &LEASE_S,
        10,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"outbox.poll_interval",
        c"Longest sleep of the worker between looks at the queue.",
        c"Commits of outbox.enqueue wake the worker at once; this bounds the delay for rows written other ways.",
        &POLL_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.retention_delivered",
        c"How long delivered and cancelled deliveries (and their attempts) are kept; 0 = forever.",
        c"The worker deletes older ones in small batches.",
        &RETENTION_DELIVERED_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"outbox.retention_dead",
        c"How long dead deliveries (and their attempts) are kept; 0 = forever.",
        c"The worker deletes older ones in small batches.",
        &RETENTION_DEAD_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"outbox.live_feed",
        c"Publish every delivery status change with NOTIFY on outbox_feed (and per endpoint and tenant).",
        c"Off by default: transactions that NOTIFY commit one at a time, which caps concurrent producers.",
        &LIVE_FEED,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"outbox.operator_endpoint",
        c"Endpoint id that receives operator events (dead deliveries, disabled endpoints) as webhooks.",
        c"Empty: operator events are only published with NOTIFY on outbox_operator.",
        &OPERATOR_ENDPOINT,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.max_response_body",
        c"Bytes of each response body kept in the attempt history.",
        c"",
        &MAX_RESPONSE_BODY,
        0,
        1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"outbox.max_payload_size",
        c"Largest event payload outbox.enqueue and outbox.trigger accept (bytes of its stored jsonb form).",
        c"Larger payloads are refused with SQLSTATE 54000.",
        &MAX_PAYLOAD_SIZE,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    // SAFETY: the hook is #[pg_guard]ed and only reads the value it is given.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.allowed_targets",
            c"Private or special-purpose targets the worker may send to, e.g. '10.0.0.0/8, hooks.internal'.",
            c"Loopback, private, link-local, CGNAT, multicast and other non-public addresses are refused unless listed here (CIDR blocks or exact host names).",
            &ALLOWED_TARGETS,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_allowed_targets),
            None,
            None,
        )
    };
    GucRegistry::define_int_guc(
        c"outbox.circuit_threshold",
        c"Consecutive failed attempts after which an endpoint's circuit opens (0: never).",
        c"While open, the endpoint's deliveries wait without using up their retries; then one probe is sent.",
        &CIRCUIT_THRESHOLD,
        0,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.circuit_cooldown",
        c"How long an opened circuit waits before its first probe delivery.",
        c"Each failed probe doubles the wait, up to outbox.circuit_max_cooldown.",
        &CIRCUIT_COOLDOWN_S,
        1,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"outbox.circuit_max_cooldown",
        c"Longest wait between probes of an endpoint whose circuit is open.",
        c"",
        &CIRCUIT_MAX_COOLDOWN_S,
        1,
        7 * 86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"outbox.auto_disable_after",
        c"Disable an endpoint whose attempts have all failed for this long (0: never).",
        c"Its deliveries stay queued; outbox.enable_endpoint() resumes them.",
        &AUTO_DISABLE_AFTER_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"outbox.endpoint_max_in_flight",
        c"Requests in flight to one endpoint at most, unless the endpoint sets max_in_flight (0: no limit).",
        c"",
        &ENDPOINT_MAX_IN_FLIGHT,
        0,
        MAX_IN_FLIGHT_LIMIT,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // SAFETY: the hook is #[pg_guard]ed and only reads the value it is given.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.retry_schedule",
            c"Delays between delivery attempts, e.g. '5s, 5m, 30m, 2h'.",
            c"One delay per failed attempt (units ms, s, m, h, d), each with +/-20% jitter; when the list is used up the delivery is dead.",
            &RETRY_SCHEDULE,
            GucContext::Suset,
            GucFlags::default(),
            Some(check_retry_schedule),
            None,
            None,
        )
    };
}

/// The payload limit in bytes.
pub fn max_payload_size() -> usize {
    usize::try_from(MAX_PAYLOAD_SIZE.get()).unwrap_or(usize::MAX)
}

/// The configured retry schedule. An unparsable setting falls back to the default with a
/// warning, so a typo in postgresql.conf slows nothing down and loses nothing.
pub fn retry_schedule() -> RetrySchedule {
    RetrySchedule::parse(&text(&RETRY_SCHEDULE, DEFAULT_SCHEDULE)).unwrap_or_else(|e| {
        pgrx::warning!(
            "outbox.retry_schedule is invalid ({e}); using the default '{DEFAULT_SCHEDULE}'"
        );
        RetrySchedule::default()
    })
}

fn text(setting: &GucSetting<Option<CString>>, default: &str) -> String {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| default.to_string())
}

fn positive(v: i32) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The SSRF allow-list. An unparsable setting allows nothing extra (the safe side) and says
/// so in the log.
pub fn allowed_targets() -> outbox_core::ssrf::AllowList {
    let text = text(&ALLOWED_TARGETS, "");
    outbox_core::ssrf::AllowList::parse(&text).unwrap_or_else(|e| {
        pgrx::warning!("outbox.allowed_targets is invalid ({e}); no private target is allowed");
        outbox_core::ssrf::AllowList::default()
    })
}

/// The worker's settings, read together once per reload.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSettings {
    /// The database this worker serves: given by the launcher, not read from the settings.
    pub database: String,
    /// `None`: the bootstrap superuser.
    pub role: Option<String>,
    pub ca_file: Option<String>,
    pub dns_servers: Vec<std::net::SocketAddr>,
    pub dns_timeout: std::time::Duration,
    pub batch_size: i32,
    pub max_in_flight: usize,
    pub request_timeout: std::time::Duration,
    pub lease: std::time::Duration,
    pub poll_interval: std::time::Duration,
    pub max_response_body: usize,
    pub allowed_targets: outbox_core::ssrf::AllowList,
    /// `None`: kept forever.
    pub retention_delivered: Option<std::time::Duration>,
    pub retention_dead: Option<std::time::Duration>,
}

/// The databases listed in `outbox.database` (the check hook refused anything else; a
/// value it never saw, the default, is `postgres`).
pub fn databases() -> Vec<String> {
    outbox_core::validate::databases(&text(&DATABASE, "postgres"))
        .unwrap_or_else(|_| vec!["postgres".into()])
}

impl WorkerSettings {
    pub fn read(database: &str) -> WorkerSettings {
        use std::time::Duration;
        WorkerSettings {
            database: database.to_string(),
            role: Some(text(&WORKER_ROLE, "")).filter(|r| !r.is_empty()),
            ca_file: Some(text(&CA_FILE, "")).filter(|f| !f.is_empty()),
            dns_servers: outbox_core::validate::name_servers(&text(&DNS_SERVERS, ""))
                .unwrap_or_else(|e| {
                    pgrx::warning!("outbox.dns_servers is invalid ({e}); using /etc/resolv.conf");
                    Vec::new()
                }),
            dns_timeout: Duration::from_millis(positive(DNS_TIMEOUT_MS.get())),
            batch_size: BATCH_SIZE.get(),
            max_in_flight: positive(MAX_IN_FLIGHT.get()) as usize,
            request_timeout: Duration::from_millis(positive(REQUEST_TIMEOUT_MS.get())),
            lease: Duration::from_secs(positive(LEASE_S.get())),
            poll_interval: Duration::from_millis(positive(POLL_INTERVAL_MS.get())),
            max_response_body: positive(MAX_RESPONSE_BODY.get()) as usize,
            allowed_targets: allowed_targets(),
            retention_delivered: Some(Duration::from_secs(positive(RETENTION_DELIVERED_S.get())))
                .filter(|d| !d.is_zero()),
            retention_dead: Some(Duration::from_secs(positive(RETENTION_DEAD_S.get())))
                .filter(|d| !d.is_zero()),
        }
    }

    /// The longest one attempt may take: its timeout, but never past the lease.
    pub fn attempt_limit(
        &self,
        endpoint_timeout: Option<std::time::Duration>,
    ) -> std::time::Duration {
        let cap = self.lease.saturating_sub(std::time::Duration::from_secs(5));
        endpoint_timeout.unwrap_or(self.request_timeout).min(cap)
    }
}
