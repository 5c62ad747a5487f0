//! Soak: a steady load for a long time with retention on, reported minute by minute, so
//! that drift (throughput falling, latency or memory or tables growing) shows. Run with
//! autovacuum off for the outbox tables (`soak-novacuum`), it shows whether their size
//! depends on VACUUM keeping up.

use std::time::{Duration, Instant, SystemTime};

use crate::harness::{seconds_between, Bench};
use crate::latency::{percentile, sleep_until};
use crate::memory::status_kib;
use crate::report::Rows;
use crate::Result;

const WINDOW: Duration = Duration::from_secs(60);
const MB: f64 = 1024.0 * 1024.0;

/// What was seen at the end of one window.
struct Sample {
    rss_kib: u64,
    /// The worker's own memory: VmRSS also counts the pages of shared buffers it touched.
    anon_kib: u64,
    /// Each table of the extension (a partitioned one as a whole), indexes and TOAST
    /// included, largest first.
    tables: Vec<(String, i64)>,
    /// Every table of the extension.
    outbox_bytes: i64,
    pending: i64,
}

pub fn run(bench: &Bench, rate: f64, seconds: f64, autovacuum: bool) -> Result<Rows> {
    let mut rows = Rows::new(if autovacuum { "soak" } else { "soak-novacuum" });
    if !autovacuum {
        bench.client().batch_execute(
            "DO $$ DECLARE t regclass; BEGIN
                 FOR t IN SELECT c.oid FROM pg_class c
                           WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind = 'r' LOOP
                     EXECUTE format('ALTER TABLE %s SET (autovacuum_enabled = off)', t);
                 END LOOP;
             END $$",
        )?;
    }
    let count = (rate * seconds).round().max(1.0) as u64;
    bench.sink.reset(true);
    let mut client = bench.client();
    let mut probe = bench.client();
    // Every other event with a caller's id, as an idempotent producer gives it (kept in
    // outbox.event_key_0/_1, which take turns), the rest without, as outbox.trigger's come.
    let statement =
        client.prepare("SELECT outbox.enqueue('bench.soak', jsonb_build_object('n', $1::int8))")?;
    let keyed = client.prepare(
        "SELECT outbox.enqueue('bench.soak', jsonb_build_object('n', $1::int8), event_id => $2::text)",
    )?;
    let run = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let pid = bench.worker_pid();
    eprintln!("soak: {count} events at {rate}/s, reported per minute");

    let start = Instant::now();
    let mut committed: Vec<(String, SystemTime, usize)> = Vec::with_capacity(count as usize);
    let mut samples: Vec<Sample> = Vec::new();
    let sample = |probe: &mut postgres::Client| -> Result<Sample> {
        let tables: Vec<(String, i64)> = probe
            .query(
                "SELECT coalesce(p.inhparent, c.oid)::regclass::text, sum(pg_total_relation_size(c.oid))::int8
                   FROM pg_class c LEFT JOIN pg_inherits p ON p.inhrelid = c.oid
                  WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind = 'r'
                  GROUP BY 1 ORDER BY 2 DESC, 1",
                &[],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let pending: i64 = probe
            .query_one("SELECT pending FROM outbox.stats()", &[])?
            .get(0);
        Ok(Sample {
            rss_kib: status_kib(pid, "VmRSS").unwrap_or(0),
            anon_kib: status_kib(pid, "RssAnon").unwrap_or(0),
            outbox_bytes: tables.iter().map(|(_, b)| b).sum(),
            tables,
            pending,
        })
    };
    for i in 0..count {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        sleep_until(due);
        let window = (due - start).as_secs() as usize / WINDOW.as_secs() as usize;
        while samples.len() < window {
            samples.push(sample(&mut probe)?);
        }
        let id: String = if i % 2 == 0 {
            client.query_one(&keyed, &[&(i as i64), &format!("soak-{run}-{i}")])?
        } else {
            client.query_one(&statement, &[&(i as i64)])?
        }
        .get(0);
        committed.push((id, SystemTime::now(), window));
    }
    if let Err(e) = bench.sink.wait_for(count, Duration::from_secs(60)) {
        eprintln!("soak: {e}");
    }
    samples.push(sample(&mut probe)?);

    let windows = committed.last().map_or(0, |c| c.2 + 1);
    for w in 0..windows {
        let mut ms: Vec<f64> = committed
            .iter()
            .filter(|c| c.2 == w)
            .filter_map(|(id, at, _)| {
                Some(1000.0 * seconds_between(*at, bench.sink.arrival_of(id)?))
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        let sent = committed.iter().filter(|c| c.2 == w).count();
        let minute = w + 1;
        rows.add(
            format!("minute {minute}: events sent"),
            sent as f64,
            "events",
        );
        rows.add(
            format!("minute {minute}: received"),
            ms.len() as f64,
            "events",
        );
        // The last window may be shorter than a minute.
        let window_seconds =
            (seconds - (w as f64) * WINDOW.as_secs_f64()).clamp(1.0, WINDOW.as_secs_f64());
        rows.add(
            format!("minute {minute}: deliveries/s"),
            ms.len() as f64 / window_seconds,
            "/s",
        );
        if !ms.is_empty() {
            rows.add(
                format!("minute {minute}: p50 commit -> receipt"),
                percentile(&ms, 0.5),
                "ms",
            );
            rows.add(
                format!("minute {minute}: p99 commit -> receipt"),
                percentile(&ms, 0.99),
                "ms",
            );
        }
        if let Some(s) = samples.get(w) {
            rows.add(
                format!("minute {minute}: worker RSS"),
                s.rss_kib as f64 / 1024.0,
                "MiB",
            );
            rows.add(
                format!("minute {minute}: worker RssAnon"),
                s.anon_kib as f64 / 1024.0,
                "MiB",
            );
            // The tables that hold anything worth a line.
            for (table, bytes) in s.tables.iter().filter(|(_, b)| *b >= 1024 * 1024) {
                rows.add(
                    format!("minute {minute}: {table} size"),
                    *bytes as f64 / MB,
                    "MB",
                );
            }
            rows.add(
                format!("minute {minute}: all outbox tables size"),
                s.outbox_bytes as f64 / MB,
                "MB",
            );
            rows.add(
                format!("minute {minute}: pending at its end"),
                s.pending as f64,
                "deliveries",
            );
        }
    }
    // The run as a whole: nothing lost, and how much the worker's memory moved from the
    // end of the first minute (warm-up) to the end.
    let received = committed
        .iter()
        .filter(|(id, _, _)| bench.sink.arrival_of(id).is_some())
        .count();
    rows.add("total: committed", committed.len() as f64, "events");
    rows.add(
        "total: lost (committed, never received)",
        (committed.len() - received) as f64,
        "events",
    );
    if let [first, .., last] = samples.as_slice() {
        rows.add(
            "total: worker RSS change after minute 1",
            (last.rss_kib as f64 - first.rss_kib as f64) / 1024.0,
            "MiB",
        );
        rows.add(
            "total: worker RssAnon change after minute 1",
            (last.anon_kib as f64 - first.anon_kib as f64) / 1024.0,
            "MiB",
        );
    }
    Ok(rows)
}
