//! One scenario's world: a fresh cluster with the worker preloaded, the in-process receiver,
//! and one endpoint pointing at it. Every scenario gets its own, so no run inherits another
//! run's table bloat, autovacuum debt or warm caches.

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use crate::common::worker::worker_pid;
use crate::common::Cluster;
use crate::cpu;
use crate::sink::Sink;
use crate::Result;

/// Events per producer transaction in the bulk scenarios.
pub const BATCH: u32 = 1000;

/// postgresql.conf lines every benchmark cluster gets, after the test harness's own.
///
/// The test harness turns fsync off to make tests fast; a benchmark that did so would
/// report commits that never reach the disk, so it is switched back on here (a later line
/// in postgresql.conf wins). `synchronous_commit` and `outbox.poll_interval` keep their
/// defaults.
const BASE_SETTINGS: &[&str] = &["shared_preload_libraries = 'webhook_outbox'", "fsync = on"];

pub struct Bench {
    pub cluster: Cluster,
    pub sink: Sink,
    /// The id of the endpoint at the receiver.
    pub endpoint: String,
    postmaster: i32,
    worker: i32,
}

/// The first and the last moment of a bulk enqueue.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub start: SystemTime,
    pub end: SystemTime,
}

impl Span {
    pub fn seconds(&self) -> f64 {
        seconds_between(self.start, self.end)
    }
}

/// One outbox table's size, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct RelationSize {
    pub table: &'static str,
    /// `pg_total_relation_size`: heap, TOAST and indexes.
    pub total: i64,
    /// `pg_indexes_size`: the indexes alone.
    pub indexes: i64,
}

/// `to - from` in seconds, negative when `to` is earlier.
pub fn seconds_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

impl Bench {
    /// Starts the cluster with `extra` postgresql.conf lines (they come last and win), the
    /// receiver, and the endpoint, and waits until a first delivery went through.
    pub fn start(extra: &[String]) -> Result<Bench> {
        let settings: Vec<&str> = BASE_SETTINGS
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
            .collect();
        let cluster = Cluster::start(&settings);
        let postmaster = cpu::postmaster_pid(&cluster.data_dir())?;
        let sink = Sink::start()?;
        let endpoint: String = cluster
            .client()
            .query_one(
                "SELECT outbox.create_endpoint($1::text)::text",
                &[&sink.url()],
            )?
            .get(0);
        let mut bench = Bench {
            cluster,
            sink,
            endpoint,
            postmaster,
            worker: 0,
        };
        bench.warm_up()?;
        // Looked up after the warm-up, so it is the process that is actually delivering.
        bench.worker = worker_pid(&bench.cluster);
        Ok(bench)
    }

    pub fn client(&self) -> postgres::Client {
        self.cluster.client()
    }

    /// The delivering worker's process id.
    pub fn worker_pid(&self) -> i32 {
        self.worker
    }

    /// Sends one event and waits for it, so that measurements start with the worker past
    /// its start-up (it looks for the extension only every few seconds) and with its
    /// connection to the receiver open.
    fn warm_up(&self) -> Result<()> {
        self.sink.reset(false);
        self.client()
            .execute("SELECT outbox.enqueue('bench.warmup', '{}'::jsonb)", &[])?;
        self.sink
            .wait_for(1, Duration::from_secs(30))
            .map_err(|e| format!("warm-up: {e}\n{}", self.cluster.log()))?;
        self.wait_settled(Duration::from_secs(30))?;
        self.sink.reset(false);
        Ok(())
    }

    /// CPU counters of the cluster, the worker and this process, now.
    pub fn cpu_snapshot(&self) -> cpu::Snapshot {
        cpu::snapshot(self.postmaster, self.worker)
    }

    /// Waits until `outbox.stats()` shows nothing pending or in flight and the event log
    /// nothing unread, and returns when that was seen.
    pub fn wait_settled(&self, timeout: Duration) -> Result<SystemTime> {
        let mut c = self.client();
        let deadline = Instant::now() + timeout;
        loop {
            let open: i64 = c
                .query_one(
                    "SELECT pending + in_flight + (SELECT unread FROM outbox.log_status) FROM outbox.stats()",
                    &[],
                )?
                .get(0);
            if open == 0 {
                return Ok(SystemTime::now());
            }
            if Instant::now() > deadline {
                return Err(format!("{open} deliveries still open after {timeout:?}").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many deliveries of events of type `event_type` have status `delivered` (the
    /// type leaves the warm-up delivery out).
    pub fn delivered(&self, event_type: &str) -> Result<i64> {
        let row = self.client().query_one(
            "SELECT count(*) FROM outbox.deliveries
              WHERE status = 'delivered' AND event_type = $1::text",
            &[&event_type],
        )?;
        Ok(row.get(0))
    }

    /// Each outbox table's total size and the part of it that is indexes, in bytes: a
    /// backlog that bloats an index but not the heap (or the reverse) shows which one.
    pub fn relation_sizes(&self) -> Result<Vec<RelationSize>> {
        let mut c = self.client();
        let mut sizes = Vec::new();
        for table in [
            "outbox.delivery",
            "outbox.event",
            "outbox.attempt",
            "outbox.history_0",
            "outbox.history_1",
            "outbox.history_2",
        ] {
            let row = c.query_one(
                "SELECT pg_total_relation_size($1::text::regclass),
                        pg_indexes_size($1::text::regclass)",
                &[&table],
            )?;
            sizes.push(RelationSize {
                table,
                total: row.get(0),
                indexes: row.get(1),
            });
        }
        Ok(sizes)
    }

    /// Enqueues events `1..=n` in transactions of [`BATCH`], the batches dealt round-robin
    /// over `producers` connections running in threads. With `endpoint` each event goes to
    /// that endpoint even if it is disabled; without, it fans out to the enabled ones.
    /// Connections are opened before the clock starts.
    pub fn enqueue(&self, n: u32, producers: usize, endpoint: Option<&str>) -> Result<Span> {
        self.enqueue_batched(n, BATCH, producers, endpoint)
    }

    /// [`Bench::enqueue`] with `batch` events per transaction (one statement each), for
    /// filling a backlog as fast as the server takes it rather than as an application would.
    pub fn enqueue_batched(
        &self,
        n: u32,
        batch: u32,
        producers: usize,
        endpoint: Option<&str>,
    ) -> Result<Span> {
        let clients: Vec<postgres::Client> = (0..producers).map(|_| self.client()).collect();
        // All threads and the clock start together.
        let go = Arc::new(Barrier::new(producers + 1));
        let threads: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(k, client)| {
                let batches = batches(n, batch.max(1), k, producers);
                let endpoint = endpoint.map(str::to_owned);
                let go = go.clone();
                std::thread::spawn(move || {
                    go.wait();
                    produce(client, &batches, endpoint.as_deref())
                })
            })
            .collect();
        go.wait();
        let start = SystemTime::now();
        for t in threads {
            t.join().map_err(|_| "a producer thread panicked")??;
        }
        Ok(Span {
            start,
            end: SystemTime::now(),
        })
    }

    /// Everything worth knowing about the server a result came from.
    pub fn server_info(&self) -> Result<serde_json::Value> {
        let mut c = self.client();
        let version: String = c.query_one("SELECT version()", &[])?.get(0);
        let extension: String = c
            .query_one(
                "SELECT extversion FROM pg_extension WHERE extname = 'webhook_outbox'",
                &[],
            )?
            .get(0);
        let mut settings = serde_json::Map::new();
        for row in c.query(
            "SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings
              WHERE name LIKE 'outbox.%' OR name IN ('fsync', 'synchronous_commit',
                    'shared_buffers', 'wal_level', 'max_wal_size', 'checkpoint_timeout',
                    'autovacuum', 'shared_preload_libraries')
              ORDER BY name",
            &[],
        )? {
            settings.insert(row.get(0), serde_json::Value::String(row.get(1)));
        }
        Ok(serde_json::json!({
            "version": version,
            "extension_version": extension,
            "settings": settings,
        }))
    }

    /// The tail of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        tail(&self.cluster.log(), 40)
    }
}

/// The `[lo, hi]` ranges of `batch` events that producer `k` of `producers` enqueues.
fn batches(n: u32, batch: u32, k: usize, producers: usize) -> Vec<(i32, i32)> {
    (0..n.div_ceil(batch))
        .skip(k)
        .step_by(producers)
        .map(|b| {
            let lo = b * batch + 1;
            let hi = (lo + batch - 1).min(n);
            (lo as i32, hi as i32)
        })
        .collect()
}

/// One producer: each batch is one autocommit statement, so one transaction.
fn produce(
    mut client: postgres::Client,
    batches: &[(i32, i32)],
    endpoint: Option<&str>,
) -> Result<()> {
    let statement = match endpoint {
        None => client.prepare(
            "SELECT outbox.enqueue('bench.item', jsonb_build_object('n', g))
               FROM generate_series($1::int, $2::int) g",
        )?,
        Some(_) => client.prepare(
            "SELECT outbox.enqueue('bench.item', jsonb_build_object('n', g),
                                   endpoint_id => $3::text::uuid)
               FROM generate_series($1::int, $2::int) g",
        )?,
    };
    for &(lo, hi) in batches {
        let rows = match endpoint {
            None => client.execute(&statement, &[&lo, &hi])?,
            Some(id) => client.execute(&statement, &[&lo, &hi, &id])?,
        };
        // One event id per event.
        let events = (hi - lo + 1) as u64;
        if rows != events {
            return Err(format!("enqueue of {lo}..={hi} returned {rows} event ids").into());
        }
    }
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The repository root (the bench crate lives in `bench/`).
pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}
