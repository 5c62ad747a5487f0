//! The worker's SQL: the same `outbox.claim` and `outbox.ack_batch` any client uses, called
//! through SPI on the worker's main thread, one batch per statement.

use std::time::Duration;

use outbox_core::pace::{self, Waiting};
use outbox_core::signing::SigningKey;
use outbox_sender::{Outcome, Request};
use pgrx::pg_sys;
use pgrx::spi::SpiClient;

/// Why a cycle's SQL failed (logged, then the loop goes on).
pub type StoreError = String;

/// Does the installed SQL have what 0.3.1 added (taking back a dead predecessor's leases,
/// recording only what can be locked without waiting)? Older SQL keeps delivering without.
pub fn has_lock_free_acks(version: &str) -> bool {
    at_least(version, &[0, 3, 1])
}

/// Does the installed SQL read the log in batches whose first attempts the worker sends
/// before anything is recorded (0.4.0)? Older SQL is served through `outbox.claim`.
pub fn has_log_batches(version: &str) -> bool {
    at_least(version, &[0, 4, 0])
}

/// Whether `version` (as in pg_extension.extversion) is `min` or newer.
fn at_least(version: &str, min: &[u32]) -> bool {
    let parts: Vec<u32> = version.split('.').map(|p| p.parse().unwrap_or(0)).collect();
    parts.as_slice() >= min
}

/// Longest error text sent to SQL. The rule for what is stored is `ack_batch`'s (it bounds
/// every sender's texts); this only keeps a hostile receiver's megabytes off the SPI call.
const MAX_ERROR_TRANSPORT_BYTES: usize = 16 * 1024;

/// `text` cut to at most `max` bytes at a character boundary.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Is the extension created in this database? The worker idles until it is.
pub fn extension_ready(client: &SpiClient<'_>) -> Result<bool, StoreError> {
    installed_version(client).map(|v| v.is_some())
}

/// The version of the extension's SQL objects in this database, if it is created. The
/// extension is locked (share) for the rest of the transaction: DROP EXTENSION (which
/// locks it first, exclusively) then waits for the cycle or the cycle for it, instead of
/// each taking tables the other needs in another order (a deadlock).
pub fn installed_version(client: &SpiClient<'_>) -> Result<Option<String>, StoreError> {
    const QUERY: &str = "SELECT oid, extversion FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'webhook_outbox'";
    let found = |client: &SpiClient<'_>| -> Result<Option<(pg_sys::Oid, String)>, StoreError> {
        let t = client.select(QUERY, None, &[]).map_err(|e| e.to_string())?;
        if t.is_empty() {
            return Ok(None);
        }
        let row = t.first();
        let oid = row.get::<pg_sys::Oid>(1).map_err(|e| e.to_string())?;
        let version = row.get::<String>(2).map_err(|e| e.to_string())?;
        Ok(oid.zip(version))
    };
    let Some((oid, _)) = found(client)? else {
        return Ok(None);
    };
    // SAFETY: a lock on a catalog object in the current transaction, released at its end.
    unsafe {
        pg_sys::LockDatabaseObject(
            pg_sys::ExtensionRelationId,
            oid,
            0,
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
        )
    };
    // Dropped (or updated) while this waited: look again.
    Ok(found(client)?.map(|(_, v)| v))
}

/// A claimed delivery that could not be turned into a request (e.g. a secret edited by
/// hand into something unusable): recorded as a failed attempt without sending.
pub struct Unsendable {
    pub delivery_id: [u8; 16],
    pub attempt: i32,
    pub error: String,
}

/// Claims up to `limit` due deliveries and turns them into requests. `version` is the
/// installed version of the extension's SQL: a worker of a newer release keeps delivering
/// with the older `outbox.claim` until `ALTER EXTENSION ... UPDATE` runs.
pub fn claim(
    client: &mut SpiClient<'_>,
    limit: i32,
    worker: &str,
    settings: &crate::guc::WorkerSettings,
    version: &str,
) -> Result<(Vec<Claimed>, Vec<Unsendable>), StoreError> {
    let lease = format!("{} seconds", settings.lease.as_secs());
    // 0.1.0's claim has no previous_secret (secret rotation came in 0.2.0).
    let previous_secret = if version == "0.1.0" {
        "NULL::text"
    } else if has_log_batches(version) {
        "o_previous_secret"
    } else {
        "previous_secret"
    };
    // From 0.4.0 the worker reads the log itself (`read_batch`), and claims only what is
    // queued: `outbox.claim` would read the log first, the part a batch holds open included.
    let claim = if has_log_batches(version) {
        "outbox._claim($1, $2, $3::pg_catalog.interval, NULL, NULL)"
    } else {
        "outbox.claim($1, $2, $3::pg_catalog.interval)"
    };
    let query = format!(
        "SELECT o_delivery_id, o_attempt, o_event_id, o_url, o_secret, o_headers::pg_catalog.text,
                pg_catalog.date_part('epoch', o_timeout) OPERATOR(pg_catalog.*) 1000, o_body, {previous_secret},
                o_endpoint_id
           FROM {claim} AS c(o_delivery_id, o_event_id, o_attempt, o_endpoint_id, o_url, o_secret, o_headers,
                              o_timeout, o_event_type, o_body)"
    );
    let rows = client
        .update(
            query.as_str(),
            None,
            &[limit.into(), worker.into(), lease.as_str().into()],
        )
        .map_err(|e| e.to_string())?;
    let mut requests = Vec::with_capacity(rows.len());
    let mut unsendable = Vec::new();
    for row in rows {
        let get_err = |e: pgrx::spi::SpiError| e.to_string();
        let id: pgrx::Uuid = row.get(1).map_err(get_err)?.ok_or("claim returned no id")?;
        let attempt: i32 = row.get(2).map_err(get_err)?.unwrap_or(1);
        let endpoint: Option<pgrx::Uuid> = row.get(10).map_err(get_err)?;
        let endpoint = endpoint.map_or([0; 16], |e| *e.as_bytes());
        match RequestFields::from_row(&row, 3)?.into_request(*id.as_bytes(), attempt, settings) {
            Ok(r) => requests.push((endpoint, r)),
            Err(u) => unsendable.push(u),
        }
    }
    Ok((requests, unsendable))
}

/// What a request is made of, as the claim and a batch read return it.
struct RequestFields {
    msg_id: String,
    url: String,
    secret: String,
    headers: String,
    timeout_ms: Option<f64>,
    body: String,
    previous_secret: Option<String>,
}

impl RequestFields {
    /// The fields from seven columns of `row` starting at `first`: event id, url, secret,
    /// headers (text), timeout (ms), body, previous secret.
    fn from_row(row: &pgrx::spi::SpiHeapTupleData<'_>, first: usize) -> Result<Self, StoreError> {
        let e = |e: pgrx::spi::SpiError| e.to_string();
        Ok(RequestFields {
            msg_id: row.get(first).map_err(e)?.unwrap_or_default(),
            url: row.get(first + 1).map_err(e)?.unwrap_or_default(),
            secret: row.get(first + 2).map_err(e)?.unwrap_or_default(),
            headers: row
                .get(first + 3)
                .map_err(e)?
                .unwrap_or_else(|| "{}".into()),
            timeout_ms: row.get(first + 4).map_err(e)?,
            body: row.get(first + 5).map_err(e)?.unwrap_or_default(),
            previous_secret: row.get(first + 6).map_err(e)?,
        })
    }

    /// The signed request, or why it cannot be sent (a secret edited by hand into
    /// something unusable).
    fn into_request(
        self,
        delivery_id: [u8; 16],
        attempt: i32,
        settings: &crate::guc::WorkerSettings,
    ) -> Result<Request, Unsendable> {
        let key = SigningKey::parse(&self.secret).map_err(|e| Unsendable {
            delivery_id,
            attempt,
            error: format!("the endpoint's secret is unusable: {e}"),
        })?;
        // During a rotation both secrets sign; receivers accept either signature.
        let mut keys = vec![key];
        keys.extend(
            self.previous_secret
                .and_then(|p| SigningKey::parse(&p).ok()),
        );
        let timeout = settings.attempt_limit(
            self.timeout_ms
                .map(|ms| Duration::from_millis(ms.max(0.0) as u64)),
        );
        Ok(Request {
            delivery_id,
            attempt,
            msg_id: self.msg_id,
            url: self.url,
            keys,
            headers: parse_headers(&self.headers),
            body: self.body.into(),
            timeout,
        })
    }
}

/// Payload bytes a batch part holds at most, as `outbox._read_log`'s default: the worker
/// passes it and its event bound to `outbox._read_batch` and again to
/// `outbox._close_batch`, which must read the same part.
const READ_BYTES: i64 = 64 * 1024 * 1024;
/// Events a batch part holds at most (`outbox._read_log`'s default too); fewer when the
/// worker has fewer free request slots.
const READ_EVENTS: i32 = 5000;

/// An endpoint's id.
pub type EndpointId = [u8; 16];
/// A claimed request, with its endpoint.
pub type Claimed = (EndpointId, Request);

/// Whether this session is the log's reader, becoming it if no one is
/// (`outbox._become_reader`); `held` is the lock key it took before. Only the reader reads
/// batches whose first attempts go out before anything is recorded, and no one else reads
/// the log meanwhile. Returns the key while it is the reader. (The lock is a session lock:
/// it survives transactions and goes with the worker's process.)
pub fn hold_reader_lock(
    client: &mut SpiClient<'_>,
    held: Option<i32>,
) -> Result<Option<i32>, StoreError> {
    let t = client
        .update(
            // CASE, not OR: the lock is taken once.
            "SELECT k, CASE WHEN k OPERATOR(pg_catalog.=) $1 THEN true ELSE outbox._become_reader() END
               FROM outbox._log_lock() AS k",
            None,
            &[held.into()],
        )
        .map_err(|e| e.to_string())?;
    let row = t.first();
    let key: Option<i32> = row.get(1).map_err(|e| e.to_string())?;
    let got: Option<bool> = row.get(2).map_err(|e| e.to_string())?;
    Ok(key.filter(|_| got == Some(true)))
}

/// Where a first attempt of a batch came from: the event's place in the log and the
/// endpoint.
pub struct Pair {
    txid: i64,
    seq: i64,
    endpoint_id: [u8; 16],
}

/// A part of the log the worker read whose first attempts are out: nothing of it is
/// recorded until `close_batch`, which makes its deliveries as those attempts left them.
pub struct Batch {
    /// The cursor row it was read from; for a batch read while another was open, the row
    /// that one's close writes (set by `follow`).
    cursor_id: i64,
    snapshot: String,
    max_events: i32,
    /// Where the cursor will be once it closes: whether its snapshot has more events, and
    /// the place (txid, seq) of its last event.
    more: bool,
    last: (i64, i64),
    /// Read while another batch was open: its cursor row does not exist until that one closes.
    pub follows: bool,
    /// Whether its close makes queued deliveries, which only a claim sends: targets it did
    /// not send (held endpoints, scheduled events), attempts withdrawn, or retries.
    leaves_queued: bool,
    pub opened: std::time::Instant,
    /// The attempts sent or waiting to be, by delivery id.
    pairs: std::collections::HashMap<[u8; 16], Pair>,
    /// Those not started yet, waiting for room at their endpoint.
    pub waiting: Waiting<EndpointId, Request>,
    /// Their outcomes so far.
    outcomes: std::collections::HashMap<[u8; 16], Record>,
}

impl Batch {
    /// Once the batch before it has closed: it was read from the cursor row that close
    /// wrote, the newest (`newest_cursor`).
    pub fn follow(&mut self, cursor_id: i64) {
        self.cursor_id = cursor_id;
        self.follows = false;
    }

    /// Whether all of its first attempts have started (none waits for room).
    pub fn all_started(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Whether `delivery_id` is one of this batch's first attempts.
    pub fn has(&self, delivery_id: &[u8; 16]) -> bool {
        self.pairs.contains_key(delivery_id)
    }

    pub fn add_outcome(&mut self, r: Record) {
        self.outcomes.insert(r.delivery_id, r);
    }

    /// How many first attempts it has.
    pub fn attempts(&self) -> usize {
        self.pairs.len()
    }

    /// How many of its attempts have their outcome.
    pub fn outcomes(&self) -> usize {
        self.outcomes.len()
    }

    /// Whether every attempt has its outcome.
    pub fn complete(&self) -> bool {
        self.outcomes.len() >= self.pairs.len()
    }

    /// Gives up the attempts not started yet: the close makes their deliveries pending, to
    /// be claimed like any queued one.
    pub fn withdraw(&mut self) {
        for r in self.waiting.withdraw() {
            self.pairs.remove(&r.delivery_id);
            self.leaves_queued = true;
        }
    }

    /// Whether closing it queues deliveries for a claim (see `leaves_queued`), a retry
    /// included.
    pub fn leaves_queued(&self) -> bool {
        self.leaves_queued || self.outcomes.values().any(|r| r.outcome == "retry")
    }
}

/// The newest row of the log's cursor: after a batch's close, the one it wrote (nothing
/// else moves the cursor while the worker holds the reader's lock).
pub fn newest_cursor(client: &SpiClient<'_>) -> Result<i64, StoreError> {
    client
        .select(
            "SELECT pg_catalog.max(id) FROM outbox.log_cursor",
            None,
            &[],
        )
        .and_then(|t| t.first().get::<i64>(1))
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the log has no cursor".to_string())
}

/// Reads the next part of the log (`outbox._read_batch`) with its first attempts that may
/// go now, queued in the batch for their endpoints' room (`own`: this worker's requests
/// out to an endpoint). `None` when there was nothing to send now (what was read, if anything,
/// became deliveries already, as it does when `free` is 0).
pub fn read_batch(
    client: &mut SpiClient<'_>,
    free: i32,
    own: &dyn Fn(&EndpointId) -> usize,
    after: Option<&Batch>,
    settings: &crate::guc::WorkerSettings,
) -> Result<Option<Batch>, StoreError> {
    // A part as large as the free slots (a larger one would mostly be read again next
    // time; and a crash before the close sends the part's attempts again, which must be no
    // more than the requests the worker may have out). With no slot free, a whole part,
    // made into deliveries for anyone to claim.
    let max_events = if free > 0 {
        free.min(READ_EVENTS)
    } else {
        READ_EVENTS
    };
    // With a batch open, the part after it (see outbox._read_batch).
    let (open_cursor, open_batch, open_more, open_txid, open_seq) = match after {
        Some(b) => (
            Some(b.cursor_id),
            Some(b.snapshot.clone()),
            Some(b.more),
            Some(b.last.0),
            Some(b.last.1),
        ),
        None => (None, None, None, None, None),
    };
    let rows = client
        .update(
            "SELECT cursor_id, batch, part_events, delivery_id, txid, seq, endpoint_id, event_id, url,
                    secret, headers, timeout_ms, body, previous_secret, cap, busy,
                    part_more, part_last_txid, part_last_seq, part_held
               FROM outbox._read_batch($1, $2, $3, $4, $5::pg_catalog.pg_snapshot, $6, $7, $8)",
            None,
            &[
                free.into(),
                max_events.into(),
                READ_BYTES.into(),
                open_cursor.into(),
                open_batch.into(),
                open_more.into(),
                open_txid.into(),
                open_seq.into(),
            ],
        )
        .map_err(|e| e.to_string())?;
    let mut batch: Option<Batch> = None;
    for row in rows {
        let get_err = |e: pgrx::spi::SpiError| e.to_string();
        let b = match batch.as_mut() {
            Some(b) => b,
            None => batch.insert(Batch {
                cursor_id: row
                    .get(1)
                    .map_err(get_err)?
                    .ok_or("a batch without a cursor")?,
                snapshot: row
                    .get(2)
                    .map_err(get_err)?
                    .ok_or("a batch without a snapshot")?,
                // The part may end before max_events (see outbox._read_batch).
                max_events: row.get(3).map_err(get_err)?.unwrap_or(max_events),
                more: row.get(17).map_err(get_err)?.unwrap_or(true),
                last: (
                    row.get(18).map_err(get_err)?.unwrap_or(0),
                    row.get(19).map_err(get_err)?.unwrap_or(0),
                ),
                follows: after.is_some(),
                leaves_queued: row.get(20).map_err(get_err)?.unwrap_or(true),
                opened: std::time::Instant::now(),
                pairs: Default::default(),
                outcomes: Default::default(),
                waiting: Default::default(),
            }),
        };
        let id: pgrx::Uuid = row
            .get(4)
            .map_err(get_err)?
            .ok_or("a batch row without an id")?;
        let endpoint: pgrx::Uuid = row
            .get(7)
            .map_err(get_err)?
            .ok_or("a batch row without an endpoint")?;
        let endpoint = *endpoint.as_bytes();
        let delivery_id = *id.as_bytes();
        b.pairs.insert(
            delivery_id,
            Pair {
                txid: row.get(5).map_err(get_err)?.unwrap_or(0),
                seq: row.get(6).map_err(get_err)?.unwrap_or(0),
                endpoint_id: endpoint,
            },
        );
        let room = pace::room(
            row.get(15).map_err(get_err)?,
            row.get(16).map_err(get_err)?,
            own(&endpoint),
        );
        match RequestFields::from_row(&row, 8)?.into_request(delivery_id, 1, settings) {
            Ok(r) => b.waiting.add(endpoint, room, r),
            // Recorded as its failed attempt when the batch closes.
            Err(u) => b.add_outcome(Record::from_unsendable(u)),
        }
    }
    Ok(batch)
}

/// The retry times of `waits` (milliseconds from now, NULL for the retry schedule's), as
/// the `retry_at` array of `outbox.ack_batch` and `outbox._close_batch`; `$n` is the
/// parameter holding the waits.
fn retry_at_of(n: u32) -> String {
    format!(
        "(SELECT pg_catalog.array_agg(pg_catalog.now()
                    OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => w OPERATOR(pg_catalog./) 1000)
                ORDER BY i)
           FROM pg_catalog.unnest(${n}::pg_catalog.float8[]) WITH ORDINALITY AS t(w, i))"
    )
}

/// Closes `batch` (`outbox._close_batch`): its deliveries are made as its attempts left
/// them (those still out: in flight under this worker's lease, acknowledged later like any
/// claimed delivery), its outcomes recorded and the cursor moved on. Returns the outcomes
/// it could not record without waiting for a lock, to be acknowledged later.
pub fn close_batch(
    client: &mut SpiClient<'_>,
    batch: &Batch,
    worker: &str,
    lease: Duration,
) -> Result<Vec<Record>, StoreError> {
    let n = batch.pairs.len();
    let (mut ids, mut txids, mut seqs, mut endpoints) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut attempts, mut outcomes, mut codes, mut errors) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut durations, mut waits, mut bodies) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (id, pair) in &batch.pairs {
        let r = batch.outcomes.get(id);
        ids.push(pgrx::Uuid::from_bytes(*id));
        txids.push(pair.txid);
        seqs.push(pair.seq);
        endpoints.push(pgrx::Uuid::from_bytes(pair.endpoint_id));
        attempts.push(r.map_or(1, |r| r.attempt));
        outcomes.push(r.map(|r| r.outcome.to_string()));
        codes.push(r.and_then(|r| r.status_code));
        errors.push(r.and_then(|r| r.error.clone()));
        durations.push(r.and_then(|r| r.duration_ms));
        waits.push(r.and_then(|r| r.retry_after_ms));
        bodies.push(r.and_then(|r| r.response_body.clone()));
    }
    let lease = format!("{} seconds", lease.as_secs());
    let sql = format!(
        "SELECT d FROM outbox._close_batch($1, $2::pg_catalog.pg_snapshot, $3, $4, $5, $6, $7, $8, $9,
             $10::pg_catalog.text[]::outbox.attempt_outcome[], $11, $12, $13, {}, $15, $16,
             $17::pg_catalog.interval) AS d",
        retry_at_of(14)
    );
    let later = client
        .update(
            &sql,
            None,
            &[
                batch.cursor_id.into(),
                batch.snapshot.as_str().into(),
                batch.max_events.into(),
                READ_BYTES.into(),
                ids.into(),
                txids.into(),
                seqs.into(),
                endpoints.into(),
                attempts.into(),
                outcomes.into(),
                codes.into(),
                errors.into(),
                durations.into(),
                waits.into(),
                bodies.into(),
                worker.into(),
                lease.as_str().into(),
            ],
        )
        .map_err(|e| e.to_string())?;
    let mut deferred = Vec::new();
    for row in later {
        let id: Option<pgrx::Uuid> = row.get(1).map_err(|e| e.to_string())?;
        if let Some(r) = id.and_then(|id| batch.outcomes.get(id.as_bytes())) {
            deferred.push(r.clone());
        }
    }
    Ok(deferred)
}

fn parse_headers(json: &str) -> Vec<(String, String)> {
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json) {
        Ok(map) => map
            .into_iter()
            .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_string())))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// One attempt's record, ready for `outbox.ack_batch`.
#[derive(Clone)]
pub struct Record {
    pub delivery_id: [u8; 16],
    pub attempt: i32,
    pub outcome: &'static str,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: Option<f64>,
    /// Wait at least this long before the next attempt (a `Retry-After`); `None` lets the
    /// retry schedule decide.
    pub retry_after_ms: Option<f64>,
    pub response_body: Option<String>,
}

impl Record {
    pub fn from_unsendable(u: Unsendable) -> Record {
        Record {
            delivery_id: u.delivery_id,
            attempt: u.attempt,
            outcome: "dead",
            status_code: None,
            error: Some(u.error),
            duration_ms: None,
            retry_after_ms: None,
            response_body: None,
        }
    }

    pub fn from_outcome(o: Outcome, schedule: &outbox_core::retry::RetrySchedule) -> Record {
        use outbox_core::outcome::{decide, Class, Response};
        let attempt_no = u32::try_from(o.attempt).unwrap_or(0);
        let decision = decide(
            &o.response,
            attempt_no,
            schedule,
            std::time::SystemTime::now(),
        );
        let outcome = match decision.class {
            Class::Delivered => "delivered",
            Class::Retry => "retry",
            Class::Dead | Class::Gone => "dead",
        };
        let error = match (&o.response, decision.class) {
            (_, Class::Delivered) => None,
            (Response::Failed { error, .. } | Response::Refused { error }, _) => {
                Some(error.clone())
            }
            (Response::Status { code, .. }, Class::Gone) => {
                Some(format!("HTTP {code} Gone: endpoint disabled"))
            }
            (Response::Status { code, .. }, _) if (300..400).contains(code) => Some(format!(
                "HTTP {code}: redirects are not followed; update the endpoint's URL"
            )),
            (Response::Status { code, .. }, _) => Some(format!("HTTP {code}")),
        };
        // PostgreSQL text cannot hold NUL bytes.
        let error = error.map(|e| truncated(e.replace('\0', ""), MAX_ERROR_TRANSPORT_BYTES));
        Record {
            delivery_id: o.delivery_id,
            attempt: o.attempt,
            outcome,
            status_code: o.status_code().map(i32::from),
            error,
            duration_ms: Some(o.duration.as_secs_f64() * 1000.0),
            retry_after_ms: decision.retry_after.map(|d| d.as_secs_f64() * 1000.0),
            response_body: o.body_excerpt.map(|b| b.replace('\0', "")),
        }
    }
}

/// Locks, without waiting, what recording `records` touches (their deliveries and their
/// endpoints' state rows), and splits them into those that can be recorded now and those
/// someone else holds (an operator's open transaction): the worker never waits for a lock a
/// user can hold, and records those later.
pub fn lockable(
    client: &mut SpiClient<'_>,
    records: &[Record],
) -> Result<(Vec<Record>, Vec<Record>), StoreError> {
    if records.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let ids: Vec<pgrx::Uuid> = records
        .iter()
        .map(|r| pgrx::Uuid::from_bytes(r.delivery_id))
        .collect();
    let free: Vec<pgrx::Uuid> = client
        .update("SELECT outbox._lock_for_ack($1)", None, &[ids.into()])
        .and_then(|t| t.first().get::<Vec<pgrx::Uuid>>(1))
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let free: std::collections::HashSet<[u8; 16]> = free.iter().map(|u| *u.as_bytes()).collect();
    Ok(records
        .iter()
        .cloned()
        .partition(|r| free.contains(&r.delivery_id)))
}

/// Runs a statement that returns one bigint (a count), NULL counting as 0.
fn count(
    client: &mut SpiClient<'_>,
    sql: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> Result<i64, StoreError> {
    client
        .update(sql, None, args)
        .and_then(|t| t.first().get::<i64>(1))
        .map(|n| n.unwrap_or(0))
        .map_err(|e| e.to_string())
}

/// Takes back the leases of built-in workers that are no longer running (this worker's
/// predecessor, killed or crashed): their endpoints resume at once instead of after the
/// lease. Returns how many deliveries went back to pending.
pub fn requeue_orphaned(client: &mut SpiClient<'_>) -> Result<i64, StoreError> {
    count(client, "SELECT outbox._requeue_orphaned()::int8", &[])
}

/// Records what of `records` can be recorded without waiting (all of them, with SQL older
/// than 0.3.1); returns the rest, to be recorded later.
pub fn record_lockable(
    client: &mut SpiClient<'_>,
    records: &[Record],
    worker: &str,
    version: &str,
) -> Result<Vec<Record>, StoreError> {
    if !has_lock_free_acks(version) {
        record(client, records, worker)?;
        return Ok(Vec::new());
    }
    let (now, later) = lockable(client, records)?;
    record(client, &now, worker)?;
    Ok(later)
}

/// Records a batch of attempts in one statement; returns how many were accepted (the rest
/// were no longer held by this worker: lease expired and claimed again, or cancelled).
pub fn record(
    client: &mut SpiClient<'_>,
    records: &[Record],
    worker: &str,
) -> Result<i64, StoreError> {
    if records.is_empty() {
        return Ok(0);
    }
    let ids: Vec<pgrx::Uuid> = records
        .iter()
        .map(|r| pgrx::Uuid::from_bytes(r.delivery_id))
        .collect();
    let attempts: Vec<i32> = records.iter().map(|r| r.attempt).collect();
    let outcomes: Vec<String> = records.iter().map(|r| r.outcome.to_string()).collect();
    let codes: Vec<Option<i32>> = records.iter().map(|r| r.status_code).collect();
    let errors: Vec<Option<String>> = records.iter().map(|r| r.error.clone()).collect();
    let durations: Vec<Option<f64>> = records.iter().map(|r| r.duration_ms).collect();
    let waits: Vec<Option<f64>> = records.iter().map(|r| r.retry_after_ms).collect();
    let bodies: Vec<Option<String>> = records.iter().map(|r| r.response_body.clone()).collect();
    count(
        client,
        // Qualified throughout, like everything the worker runs: its search_path is
        // pinned as well, but a name that needs no lookup cannot be planted.
        &format!(
            "SELECT pg_catalog.count(*) FROM outbox.ack_batch(
                 $1, $2, $3::pg_catalog.text[]::outbox.attempt_outcome[], $4, $5, $6, {}, $8, $9)",
            retry_at_of(7)
        ),
        &[
            ids.into(),
            attempts.into(),
            outcomes.into(),
            codes.into(),
            errors.into(),
            durations.into(),
            waits.into(),
            bodies.into(),
            worker.into(),
        ],
    )
}

/// How long until the claim can next take something (a retry coming due, a circuit's probe,
/// a rate limit's next token), if anything waits on an enabled endpoint.
pub fn next_due(client: &SpiClient<'_>) -> Result<Option<Duration>, StoreError> {
    client
        .select("SELECT outbox._next_due()", None, &[])
        .and_then(|t| t.first().get::<f64>(1))
        // Overdue (negative) means now; NULL means nothing waits; a wait too long (or not a
        // number) to be a Duration is as good as nothing: the poll interval comes first.
        .map(|s| s.and_then(|secs| Duration::try_from_secs_f64(secs.max(0.0)).ok()))
        .map_err(|e| e.to_string())
}

/// Deletes one small batch of finished deliveries past their retention; returns how many.
pub fn purge_batch(
    client: &mut SpiClient<'_>,
    delivered: Option<Duration>,
    dead: Option<Duration>,
    batch: i32,
) -> Result<i64, StoreError> {
    // "Forever" is a century: simpler than a second query shape.
    let age =
        |d: Option<Duration>| format!("{} seconds", d.map_or(100 * 365 * 86_400, |d| d.as_secs()));
    count(
        client,
        "SELECT outbox._purge_batch($1::pg_catalog.interval, $2::pg_catalog.interval, $3)",
        &[
            age(delivered).as_str().into(),
            age(dead).as_str().into(),
            batch.into(),
        ],
    )
}

/// Gives the turn to the other table of callers' ids once the current one's is over
/// (`outbox._rotate_event_keys`): ids are remembered for `delivered` (None: for ever).
/// Returns whether it did.
pub fn rotate_event_keys(
    client: &mut SpiClient<'_>,
    delivered: Option<Duration>,
) -> Result<bool, StoreError> {
    let age = delivered.map(|d| format!("{} seconds", d.as_secs()));
    client
        .update(
            "SELECT outbox._rotate_event_keys($1::pg_catalog.interval)",
            None,
            &[age.into()],
        )
        .and_then(|t| t.first().get::<bool>(1))
        .map(|r| r.unwrap_or(false))
        .map_err(|e| e.to_string())
}

/// Truncates what of the log has been read (see `outbox._rotate_log`); returns how many
/// tables it truncated.
pub fn rotate_log(client: &mut SpiClient<'_>) -> Result<i64, StoreError> {
    count(client, "SELECT outbox._rotate_log()::int8", &[])
}

/// Corrects the endpoints' in-flight counts that differ from their deliveries in flight
/// (see `outbox._recount_endpoints`); returns how many it corrected.
pub fn recount_endpoints(client: &mut SpiClient<'_>) -> Result<i64, StoreError> {
    count(client, "SELECT outbox._recount_endpoints()::int8", &[])
}
