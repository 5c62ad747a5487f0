//! A receiver that misbehaves at random: errors, connections closed without an answer or
//! in the middle of one, answers after the timeout, bodies dripping in slower than the
//! timeout allows. Every delivery must still end as the retry policy says, the history
//! must match what the receiver saw, and the worker's memory must stay flat.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::worker::{endpoint, scalar_i64, wait_settled, worker_pid, FAST};
use common::Cluster;
use outbox_receiver::{Receiver, Reply};

/// Attempts a delivery may have: the first and one per delay of the retry schedule.
const MAX_ATTEMPTS: i32 = 4;
const DELIVERIES: usize = 300;
/// Rounds of DELIVERIES each, with the worker's memory read after each.
const WAVES: usize = 12;

/// A small deterministic generator, so that a failing run can be repeated.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// One misbehaviour (or a success) per request, in arrival order.
fn chaos_script(seed: u64, n: usize) -> Vec<Reply> {
    let mut rng = Lcg(seed);
    (0..n)
        .map(|_| match rng.next() % 100 {
            0..=39 => Reply::Status(200),
            40..=51 => Reply::Status(500),
            52..=63 => Reply::Drop,
            64..=75 => Reply::Break(200),
            // Stalls past the 300 ms timeout, then says 200 (too late to count).
            76..=83 => Reply::Delay(Duration::from_millis(700), 200),
            84..=91 => Reply::Delay(Duration::from_millis(1500), 503),
            _ => Reply::Drip {
                status: 200,
                bytes: 10,
                every: Duration::from_millis(100),
            },
        })
        .collect()
}

/// A field of /proc/<pid>/status in KiB: VmRSS (all resident memory, including the pages
/// of shared buffers the process touched) or RssAnon (its private memory: where a leak
/// would show).
fn status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn every_delivery_ends_as_the_retry_policy_says_whatever_the_receiver_does() {
    let settings: Vec<&str> = FAST
        .iter()
        .copied()
        .chain([
            "outbox.retry_schedule = '100ms, 100ms, 100ms'",
            // The breaker has tests of its own; here every attempt must follow the schedule.
            "outbox.circuit_threshold = 0",
        ])
        .collect();
    let cluster = Cluster::start(&settings);
    let rx = Receiver::start().unwrap();
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261122);
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/chaos"), ", timeout => '300 milliseconds'");
    let pid = worker_pid(&cluster);

    // Warm up (connection pools, plans), then measure memory across waves of chaos.
    c.batch_execute("SELECT outbox.enqueue('warm.up', '{}', event_id => 'warm-' || g) FROM generate_series(1, 20) g")
        .unwrap();
    assert!(wait_settled(&cluster, Duration::from_secs(30)));
    let waves: usize = std::env::var("CHAOS_WAVES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(WAVES);
    let mut rss = vec![status_kib(pid, "VmRSS")];
    let mut anon = vec![status_kib(pid, "RssAnon")];
    rx.clear();
    let started = std::time::Instant::now();
    for wave in 0..waves {
        rx.script(
            "/chaos",
            chaos_script(seed + wave as u64, DELIVERIES * MAX_ATTEMPTS as usize),
        );
        c.batch_execute(&format!(
            "SELECT outbox.enqueue('chaos.event', jsonb_build_object('n', g), event_id => 'chaos-{wave}-' || g)
               FROM generate_series(1, {DELIVERIES}) g"
        ))
        .unwrap();
        assert!(
            wait_settled(&cluster, Duration::from_secs(60)),
            "seed {seed}, wave {wave}:\n{}",
            cluster.log()
        );
        rss.push(status_kib(pid, "VmRSS"));
        anon.push(status_kib(pid, "RssAnon"));
    }
    eprintln!(
        "{waves} waves of {DELIVERIES} in {:?}, {} requests; worker at start and after each wave (KiB): VmRSS {rss:?}, RssAnon {anon:?}",
        started.elapsed(),
        rx.count()
    );
    assert_eq!(worker_pid(&cluster), pid, "the worker never restarted");

    // Each delivery's history: retries, then one final outcome; dead only once the schedule
    // is used up (or at once, for a 4xx, which this receiver never sends).
    let rows = c
        .query(
            "SELECT d.event_id, d.status::text, d.attempts,
                    array_agg(a.outcome::text ORDER BY a.attempt), array_agg(a.attempt ORDER BY a.attempt)
               FROM outbox.deliveries d JOIN outbox.attempts a ON a.delivery_id = d.id
              WHERE d.event_id LIKE 'chaos-%'
              GROUP BY d.event_id, d.status, d.attempts",
            &[],
        )
        .unwrap();
    assert_eq!(
        rows.len(),
        DELIVERIES * waves,
        "seed {seed}: every delivery has a history"
    );
    let seen: HashMap<String, usize> =
        rx.received().into_iter().fold(HashMap::new(), |mut m, r| {
            *m.entry(r.webhook_id).or_default() += 1;
            m
        });
    let (mut delivered, mut dead) = (0, 0);
    for row in &rows {
        let id: String = row.get(0);
        let status: String = row.get(1);
        let attempts: i32 = row.get(2);
        let outcomes: Vec<String> = row.get(3);
        let numbers: Vec<i32> = row.get(4);
        assert_eq!(
            numbers,
            (1..=attempts).collect::<Vec<_>>(),
            "seed {seed}: {id} has one history row per attempt"
        );
        let (last, before) = outcomes.split_last().unwrap();
        assert!(
            before.iter().all(|o| o == "retry"),
            "seed {seed}: {id}: {outcomes:?}"
        );
        match status.as_str() {
            "delivered" => {
                assert_eq!(last, "delivered");
                delivered += 1;
            }
            "dead" => {
                assert_eq!(last, "dead");
                assert_eq!(
                    attempts, MAX_ATTEMPTS,
                    "seed {seed}: {id} died before its retries were used up"
                );
                dead += 1;
            }
            other => panic!("seed {seed}: {id} ended {other}"),
        }
        assert!(attempts <= MAX_ATTEMPTS);
        // The receiver's count and the history agree exactly, not just "at least": every
        // misbehaviour happens after the whole request arrived (so each attempt reached
        // the receiver and was logged there), nothing crashed (so each attempt's outcome
        // was recorded), and the lease (10 s) is far longer than any request can take
        // (300 ms timeout), so no attempt was taken over by a second one. With crashes the
        // receiver may see more (see crash.rs); here neither side may differ.
        assert_eq!(
            seen.get(&id).copied().unwrap_or(0),
            attempts as usize,
            "seed {seed}: {id}: the receiver's log and the history disagree"
        );
    }
    assert_eq!(seen.len(), DELIVERIES * waves);
    assert!(
        delivered > 0 && dead > 0,
        "seed {seed}: {delivered} delivered, {dead} dead"
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.dead_letters WHERE event_id LIKE 'chaos-%'"
        ),
        dead
    );
    // Memory. VmRSS also counts the pages of shared buffers the worker has touched, which
    // grow with the tables (up to shared_buffers) and are no leak: it must merely stay
    // bounded. The worker's private memory (RssAnon) must be flat once the first waves have
    // warmed the allocator, caches and connection pool up: later waves add next to nothing
    // (about 20 KiB a wave here; a leak of 1 KiB per request would add 500 KiB a wave).
    let (start, end) = (rss[0], *rss.last().unwrap());
    assert!(
        end < start + 32 * 1024,
        "worker RSS grew from {start} KiB to {end} KiB: {rss:?}"
    );
    let (warm, end) = (anon[2], *anon.last().unwrap());
    assert!(
        end < warm + 2 * 1024,
        "the worker's private memory kept growing after the second wave: {anon:?}"
    );
}
