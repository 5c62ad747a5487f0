//! Fan-out and faults: ten endpoints, of which two go bad — one answers 500 to everything,
//! one stalls past its timeout. The healthy eight must keep (nearly) their full rate.

use std::time::{Duration, Instant};

use outbox_receiver::Reply;

use crate::harness::{seconds_between, Bench};
use crate::report::Rows;
use crate::Result;

const ENDPOINTS: usize = 10;
const HEALTHY: usize = 8;

/// One run: `events` events fanned out to every endpoint; returns the healthy endpoints'
/// delivery rate, first enqueue to their last delivery.
fn healthy_rate(bench: &Bench, healthy: &[String], events: u32) -> Result<f64> {
    let mut c = bench.client();
    let before: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.delivery WHERE status = 'delivered' AND endpoint_id::text = ANY ($1)",
            &[&healthy],
        )?
        .get(0);
    let span = bench.enqueue(events, 2, None)?;
    let want = before + i64::from(events) * healthy.len() as i64;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done: i64 = c
            .query_one(
                "SELECT count(*) FROM outbox.delivery WHERE status = 'delivered' AND endpoint_id::text = ANY ($1)",
                &[&healthy],
            )?
            .get(0);
        if done >= want {
            let seconds = seconds_between(span.start, std::time::SystemTime::now());
            return Ok((done - before) as f64 / seconds);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {want} healthy deliveries after 10 minutes",
                done
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `n` deliveries per run (n / 10 events, each to the ten endpoints).
pub fn run(bench: &Bench, n: u32) -> Result<Rows> {
    let mut rows = Rows::new("fanout");
    let mut c = bench.client();
    // The harness's own endpoint takes no part.
    c.execute(
        "SELECT outbox.disable_endpoint($1::text::uuid)",
        &[&bench.endpoint],
    )?;
    let mut ids = Vec::new();
    for i in 0..ENDPOINTS {
        let url = bench
            .sink
            .url_answering(&format!("/fan{i}"), Reply::Status(200));
        let id: String = c
            .query_one(
                "SELECT outbox.create_endpoint($1::text, timeout => '5 seconds')::text",
                &[&url],
            )?
            .get(0);
        ids.push(id);
    }
    let healthy = &ids[..HEALTHY];
    let events = (n / ENDPOINTS as u32).max(1);

    eprintln!("fanout: {events} events to {ENDPOINTS} healthy endpoints");
    let reference = healthy_rate(bench, healthy, events)?;
    bench.wait_settled(Duration::from_secs(600))?;

    // Two go bad: one fails fast, one hangs until the 5 s timeout.
    bench.sink.url_answering("/fan8", Reply::Status(500));
    bench
        .sink
        .url_answering("/fan9", Reply::Delay(Duration::from_secs(30), 200));
    eprintln!("fanout: {events} events, 2 of the endpoints failing (500, and stalling past 5 s)");
    let faulty = healthy_rate(bench, healthy, events)?;
    let circuits: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.endpoint_health WHERE circuit <> 'closed'",
            &[],
        )?
        .get(0);

    rows.add(
        "deliveries per run (all endpoints)",
        f64::from(events) * ENDPOINTS as f64,
        "deliveries",
    );
    rows.add("healthy 8, all 10 healthy", reference, "deliveries/s");
    rows.add("healthy 8, 2 failing/stalling", faulty, "deliveries/s");
    rows.add("healthy rate kept", 100.0 * faulty / reference, "%");
    rows.add("circuits open at the end", circuits as f64, "endpoints");
    Ok(rows)
}
