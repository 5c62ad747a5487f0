//! Commit-to-receipt latency at a steady, moderate rate: what one application transaction
//! experiences when the queue is not backed up.

use std::time::{Duration, Instant, SystemTime};

use crate::harness::{seconds_between, Bench};
use crate::report::Rows;
use crate::{cpu, Result};

/// One event per autocommit statement at `rate` per second for `seconds`, paced against
/// fixed deadlines so that a slow statement does not shift the schedule; each latency runs
/// from the moment the commit returned to the client to the receiver's arrival time (same
/// process, same clock).
pub fn run(bench: &Bench, rate: f64, seconds: f64) -> Result<Rows> {
    let mut rows = Rows::new("latency");
    let usage = measure_into(&mut rows, "", bench, rate, seconds)?.1;
    rows.add_cpu(&usage);
    Ok(rows)
}

/// The measurement behind [`run`], its figures added to `rows` with labels prefixed by
/// `prefix` (so that one scenario can measure twice); returns the p99 commit -> receipt
/// (ms; `None` when nothing arrived) and the CPU split.
pub fn measure_into(
    rows: &mut Rows,
    prefix: &str,
    bench: &Bench,
    rate: f64,
    seconds: f64,
) -> Result<(Option<f64>, cpu::Usage)> {
    let count = (rate * seconds).round().max(1.0) as u64;
    bench.sink.reset(true);
    let mut client = bench.client();
    let statement = client
        .prepare("SELECT outbox.enqueue('bench.latency', '{}'::jsonb, event_id => $1::text)")?;
    let before = bench.cpu_snapshot();
    // Event ids of their own per measurement: a second one in the same cluster must not
    // find the first one's events (enqueueing a known event again sends nothing).
    let run = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);

    eprintln!("latency: {count} events at {rate}/s");
    let start = Instant::now();
    let mut committed = Vec::with_capacity(count as usize);
    let mut statement_ms = Vec::with_capacity(count as usize);
    for i in 0..count {
        sleep_until(start + Duration::from_secs_f64(i as f64 / rate));
        let id = format!("lat-{run}-{i}");
        let issued = Instant::now();
        client.execute(&statement, &[&id])?;
        statement_ms.push(1000.0 * issued.elapsed().as_secs_f64());
        committed.push((id, SystemTime::now()));
    }
    let sending = start.elapsed().as_secs_f64();
    let achieved = count as f64 / sending;
    if achieved < 0.95 * rate {
        // Each statement waits for its commit to be flushed; when enqueue and commit take
        // longer than 1/rate the producer runs back to back and the latencies are those
        // of this lower rate.
        eprintln!(
            "latency: asked for {rate}/s, achieved {achieved:.0}/s: enqueue + commit took longer than 1/rate"
        );
    }
    // Missing deliveries are reported as a count below rather than failing the run.
    if let Err(e) = bench.sink.wait_for(count, Duration::from_secs(30)) {
        eprintln!("latency: {e}");
    }
    let usage = cpu::Usage::between(&before, &bench.cpu_snapshot());

    let mut ms: Vec<f64> = committed
        .iter()
        .filter_map(|(id, at)| Some(1000.0 * seconds_between(*at, bench.sink.arrival_of(id)?)))
        .collect();
    ms.sort_by(f64::total_cmp);
    rows.add(format!("{prefix}events sent"), count as f64, "events");
    rows.add(format!("{prefix}achieved rate"), achieved, "events/s");
    statement_ms.sort_by(f64::total_cmp);
    let mean_statement = statement_ms.iter().sum::<f64>() / statement_ms.len() as f64;
    rows.add(
        format!("{prefix}enqueue + commit, mean"),
        mean_statement,
        "ms",
    );
    rows.add(
        format!("{prefix}enqueue + commit, p99"),
        percentile(&statement_ms, 0.99),
        "ms",
    );
    rows.add(format!("{prefix}received"), ms.len() as f64, "events");
    if !ms.is_empty() {
        rows.add(
            format!("{prefix}p50 commit -> receipt"),
            percentile(&ms, 0.50),
            "ms",
        );
        rows.add(
            format!("{prefix}p95 commit -> receipt"),
            percentile(&ms, 0.95),
            "ms",
        );
        rows.add(
            format!("{prefix}p99 commit -> receipt"),
            percentile(&ms, 0.99),
            "ms",
        );
        rows.add(
            format!("{prefix}max commit -> receipt"),
            ms[ms.len() - 1],
            "ms",
        );
        rows.add(
            format!("{prefix}mean commit -> receipt"),
            ms.iter().sum::<f64>() / ms.len() as f64,
            "ms",
        );
    }
    let p99 = (!ms.is_empty()).then(|| percentile(&ms, 0.99));
    Ok((p99, usage))
}

pub(crate) fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

/// Nearest-rank percentile of sorted values: the smallest value with at least `q` of all
/// values at or below it.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.50), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.95), 7.0);
    }
}
