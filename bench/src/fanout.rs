//! Fan-out and faults: ten endpoints, of which two go bad — one answers 500 to everything,
//! one stalls past its 5 s timeout. The healthy eight must keep (nearly) their full rate:
//! the circuit breaker and the per-endpoint concurrency limit are what should protect them,
//! and the scenario runs with their defaults so that it measures what a user gets.

use std::time::{Duration, SystemTime};

use outbox_receiver::Reply;

use crate::harness::{seconds_between, Bench};
use crate::report::Rows;
use crate::Result;

const ENDPOINTS: usize = 10;
const HEALTHY: usize = 8;

/// Producer connections, as in the throughput scenario.
const PRODUCERS: usize = 2;

/// The bad endpoints' own timeout, and how long the stalling one holds a request (well past
/// it, so that every request to it ends in a timeout).
const BAD_TIMEOUT: &str = "5 seconds";
const STALL: Duration = Duration::from_secs(30);

/// Longest wait for the next healthy receipt before the run counts as stuck: past the
/// circuit breaker's default cooldown, so that a pause it causes is measured, not fatal.
const STUCK: Duration = Duration::from_secs(120);

/// What one run did at the healthy endpoints.
struct HealthyRun {
    /// When the first enqueue started.
    started: SystemTime,
    /// Healthy deliveries per second, first enqueue to the last healthy receipt.
    rate: f64,
    /// The slowest healthy endpoint's own rate, first enqueue to its last receipt.
    slowest: f64,
    /// The longest time one healthy endpoint went without a request, once it had one.
    longest_gap: Duration,
}

fn path(i: usize) -> String {
    format!("/fan{i}")
}

/// One run: `events` events fanned out to every enabled endpoint, timed at the receiver
/// until each healthy endpoint has had all of its own; then checked in the table.
fn healthy_run(bench: &Bench, healthy: &[(String, String)], events: u32) -> Result<HealthyRun> {
    let mut c = bench.client();
    let delivered_sql = "SELECT count(*) FROM outbox.deliveries
                          WHERE status = 'delivered' AND endpoint_id::text = ANY ($1)";
    let ids: Vec<String> = healthy.iter().map(|(_, id)| id.clone()).collect();
    let before: i64 = c.query_one(delivered_sql, &[&ids])?.get(0);
    bench.sink.reset(false);

    let span = bench.enqueue(events, PRODUCERS, None)?;
    let paths: Vec<String> = healthy.iter().map(|(p, _)| p.clone()).collect();
    let want = u64::from(events) * paths.len() as u64;
    let arrived = bench.sink.wait_for_paths(&paths, want, STUCK)?;
    let last = arrived.last.ok_or("no healthy delivery arrived")?;

    let mut slowest = f64::INFINITY;
    let mut longest_gap = Duration::ZERO;
    for p in &paths {
        let at = bench.sink.arrivals_at(p);
        let end = at.last.unwrap_or(last);
        slowest = slowest.min(at.count as f64 / seconds_between(span.start, end).max(1e-9));
        longest_gap = longest_gap.max(at.longest_gap);
    }

    // Receipt is not yet success: the acks must be recorded too (a request answered after
    // its timeout would be counted by the receiver and retried).
    let want_rows = before + i64::from(events) * healthy.len() as i64;
    let deadline = SystemTime::now() + Duration::from_secs(60);
    loop {
        let done: i64 = c.query_one(delivered_sql, &[&ids])?.get(0);
        if done >= want_rows {
            break;
        }
        if SystemTime::now() > deadline {
            return Err(format!(
                "{} of {} healthy deliveries recorded as delivered a minute after receipt",
                done - before,
                want_rows - before
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(HealthyRun {
        started: span.start,
        rate: arrived.count as f64 / seconds_between(span.start, last).max(1e-9),
        slowest,
        longest_gap,
    })
}

/// When each of `bad` (path, id) had its circuit opened, waiting a little for those not
/// open yet: failed attempts at the stalling endpoint are recorded only at its timeout, and
/// a short run may end before that.
fn circuits_opened(
    c: &mut postgres::Client,
    bad: &[(String, String)],
) -> Result<Vec<Option<SystemTime>>> {
    let deadline = SystemTime::now() + Duration::from_secs(15);
    loop {
        let mut opened = Vec::new();
        for (_, id) in bad {
            // No row: the circuit is closed.
            let epoch: Option<f64> = c
                .query_opt(
                    "SELECT extract(epoch FROM circuit_opened_at)::float8
                       FROM outbox.endpoint_health
                      WHERE endpoint_id = $1::text::uuid AND circuit <> 'closed'",
                    &[id],
                )?
                .and_then(|r| r.get(0));
            opened.push(epoch.map(|e| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(e)));
        }
        if opened.iter().all(Option::is_some) || SystemTime::now() > deadline {
            return Ok(opened);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `n` deliveries per run over all ten endpoints (n / 10 events, each to every endpoint):
/// a reference run with all ten healthy, then the same with two gone bad.
pub fn run(bench: &Bench, n: u32) -> Result<Rows> {
    let mut rows = Rows::new("fanout");
    let mut c = bench.client();
    // The harness's own endpoint takes no part.
    c.execute(
        "SELECT outbox.disable_endpoint($1::text::uuid)",
        &[&bench.endpoint],
    )?;
    // (path, endpoint id); the last two are the ones that go bad, with their own timeout.
    let mut endpoints: Vec<(String, String)> = Vec::new();
    for i in 0..ENDPOINTS {
        let url = bench.sink.url_answering(&path(i), Reply::Status(200));
        let id: String = if i < HEALTHY {
            c.query_one("SELECT outbox.create_endpoint($1::text)::text", &[&url])?
        } else {
            c.query_one(
                "SELECT outbox.create_endpoint($1::text, timeout => $2::text::interval)::text",
                &[&url, &BAD_TIMEOUT],
            )?
        }
        .get(0);
        endpoints.push((path(i), id));
    }
    let healthy = &endpoints[..HEALTHY];
    let events = (n / ENDPOINTS as u32).max(1);

    eprintln!("fanout: {events} events to {ENDPOINTS} healthy endpoints");
    let reference = healthy_run(bench, healthy, events)?;
    bench.wait_settled(Duration::from_secs(600))?;

    let (failing, stalling) = (&endpoints[HEALTHY].0, &endpoints[HEALTHY + 1].0);
    bench.sink.url_answering(failing, Reply::Status(500));
    bench.sink.url_answering(stalling, Reply::Delay(STALL, 200));
    eprintln!(
        "fanout: {events} events, one endpoint answering 500, one stalling {STALL:?} past its {BAD_TIMEOUT} timeout"
    );
    let faulty = healthy_run(bench, healthy, events)?;
    let bad_requests = |p: &str| bench.sink.arrivals_at(p).count as f64;
    let (to_failing, to_stalling) = (bad_requests(failing), bad_requests(stalling));
    let opened = circuits_opened(&mut c, &endpoints[HEALTHY..])?;

    rows.add(
        "deliveries per run (all endpoints)",
        f64::from(events) * ENDPOINTS as f64,
        "deliveries",
    );
    rows.add("healthy 8, all 10 healthy", reference.rate, "deliveries/s");
    rows.add("healthy 8, 2 failing/stalling", faulty.rate, "deliveries/s");
    rows.add(
        "healthy rate kept (target >= 90 %)",
        100.0 * faulty.rate / reference.rate,
        "%",
    );
    rows.add(
        "slowest healthy endpoint, all 10 healthy",
        reference.slowest,
        "deliveries/s",
    );
    rows.add(
        "slowest healthy endpoint, 2 failing/stalling",
        faulty.slowest,
        "deliveries/s",
    );
    rows.add(
        "longest pause at a healthy endpoint, all 10 healthy",
        reference.longest_gap.as_secs_f64(),
        "s",
    );
    rows.add(
        "longest pause at a healthy endpoint, 2 failing/stalling",
        faulty.longest_gap.as_secs_f64(),
        "s",
    );
    rows.add(
        "requests to the failing endpoint (500) in the run",
        to_failing,
        "requests",
    );
    rows.add(
        "requests to the stalling endpoint in the run",
        to_stalling,
        "requests",
    );
    let circuits = opened.iter().filter(|o| o.is_some()).count();
    rows.add(
        "bad endpoints with circuit open (waited up to 15 s after the run)",
        circuits as f64,
        "endpoints",
    );
    for (label, at) in ["failing (500)", "stalling"].iter().zip(&opened) {
        if let Some(at) = at {
            rows.add(
                format!("circuit of the {label} endpoint opened, after run start"),
                seconds_between(faulty.started, *at),
                "s",
            );
        }
    }
    Ok(rows)
}
