//! Everything at once: producers enqueueing on many connections, operators retrying,
//! replaying, cancelling, disabling, enabling and deleting endpoints, an external sender
//! claiming beside the worker. No delivery may be held by two senders, no statement may
//! fail with a deadlock or a constraint violation, and producers never see an error.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::worker::{endpoint, scalar_i64, scalar_text, wait_until, FAST};
use common::Cluster;
use outbox_receiver::{Receiver, Reply};

/// Runs `step` in a loop on its own connection until stopped; returns the errors it saw
/// (as "SQLSTATE message").
fn spawn_loop(
    cluster: &Cluster,
    stop: &Arc<AtomicBool>,
    mut step: impl FnMut(&mut postgres::Client, u64) -> Result<(), postgres::Error> + Send + 'static,
) -> JoinHandle<Vec<String>> {
    let mut c = cluster.client();
    let stop = stop.clone();
    std::thread::spawn(move || {
        let mut errors = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            if let Err(e) = step(&mut c, i) {
                errors.push(format!(
                    "{} {}",
                    common::sqlstate(&e),
                    e.as_db_error().map(|d| d.message()).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        errors
    })
}

#[test]
fn producers_operators_and_two_senders_at_once() {
    // LOG level, so that errors the worker recovers from (logged, not raised) show too.
    let settings: Vec<&str> = FAST
        .iter()
        .copied()
        .chain(["log_min_messages = log"])
        .collect();
    let cluster = Cluster::start(&settings);
    let rx = Receiver::start().unwrap();
    // The flaky endpoint fails often, for good (400: dead at once, for retry_dead to bring
    // back) or for now (503: retried), and sometimes succeeds.
    let mix = [
        Reply::Status(400),
        Reply::Status(503),
        Reply::Status(400),
        Reply::Status(200),
    ];
    rx.script(
        "/flaky",
        mix.iter().cycle().take(100_000).cloned().collect(),
    );
    let mut c = cluster.client();
    let stable = endpoint(&mut c, &rx.url("/stable"), "");
    let flaky = endpoint(&mut c, &rx.url("/flaky"), "");
    // Served by the worker and an external sender alike; no per-endpoint cap, so that
    // the external sender is not shut out while the worker holds the endpoint's slots. A
    // rate limit (too high to hold anything back) keeps its first attempts out of the
    // worker's batches: they are queued, for both senders to claim.
    let shared = endpoint(
        &mut c,
        &rx.url("/shared"),
        ", max_in_flight => 10000, rate_limit => 100000",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();

    // Producers: fan-out enqueues in small transactions, each on its own connection.
    for p in 0..6 {
        workers.push(spawn_loop(&cluster, &stop, move |c, i| {
            let mut tx = c.transaction()?;
            for k in 0..3 {
                tx.execute(
                    "SELECT outbox.enqueue('load.event', jsonb_build_object('p', $1::int, 'i', $2::bigint, 'k', $3::int))",
                    &[&p, &(i as i64), &k],
                )?;
            }
            tx.commit()
        }));
    }
    // And bursts for the shared endpoint alone, which both of its senders race for.
    let burst_endpoint = shared.clone();
    workers.push(spawn_loop(&cluster, &stop, move |c, i| {
        if i % 50 != 1 {
            return Ok(());
        }
        c.batch_execute(&format!(
            "SELECT outbox.enqueue('burst.event', jsonb_build_object('i', {i}, 'n', g), endpoint_id => '{burst_endpoint}')
               FROM generate_series(1, 200) g"
        ))
    }));
    let producer_count = workers.len();

    // Operators: repair and steer, as fast as they can.
    let ops_flaky = flaky.clone();
    workers.push(spawn_loop(&cluster, &stop, move |c, i| {
        match i % 4 {
            0 => c.execute(
                "SELECT outbox.retry_dead(endpoint_id => $1::text::uuid)",
                &[&ops_flaky],
            ),
            1 => c.execute(
                "SELECT outbox.disable_endpoint($1::text::uuid, 'load test')",
                &[&ops_flaky],
            ),
            2 => c.execute(
                "SELECT outbox.enable_endpoint($1::text::uuid)",
                &[&ops_flaky],
            ),
            _ => c.execute(
                "SELECT outbox.cancel(delivery_id => d.id) FROM (SELECT id FROM outbox.delivery
                   WHERE status = 'pending' AND endpoint_id = $1::text::uuid LIMIT 1) d",
                &[&ops_flaky],
            ),
        }
        .map(|_| ())
    }));
    let ops_stable = stable.clone();
    workers.push(spawn_loop(&cluster, &stop, move |c, i| {
        match i % 3 {
            0 => c.execute(
                "SELECT outbox.replay($1::text::uuid, now() - interval '1 second')",
                &[&ops_stable],
            ),
            1 => c.execute("SELECT * FROM outbox.endpoint_health", &[]),
            _ => c.execute(
                // Endpoints come and go while producers fan out to them.
                "SELECT outbox.delete_endpoint(outbox.create_endpoint($1))",
                &[&format!("http://127.0.0.1:9/short-lived-{i}")],
            ),
        }
        .map(|_| ())
    }));

    // An external sender on one endpoint, beside the worker: claims, "sends", acks.
    // It runs until the queue has drained, so it keeps racing the worker to the end.
    let stop_external = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<(String, i32)>::new()));
    let ext_acked = acked.clone();
    let ext_endpoint = shared.clone();
    let external = spawn_loop(&cluster, &stop_external, move |c, _| {
        let rows = c.query(
            "SELECT delivery_id::text, attempt, event_id FROM outbox.claim(50, worker => 'external', lease => '30 seconds', endpoint_id => $1::text::uuid)",
            &[&ext_endpoint],
        )?;
        for r in &rows {
            let (id, attempt, event): (String, i32, String) = (r.get(0), r.get(1), r.get(2));
            c.execute(
                "SELECT outbox.ack($1::text::uuid, $2, 'delivered', 200, worker => 'external')",
                &[&id, &attempt],
            )?;
            ext_acked.lock().unwrap().push((event, attempt));
        }
        Ok(())
    });

    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, Ordering::SeqCst);
    let errors: Vec<Vec<String>> = workers.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, errs) in errors.iter().enumerate() {
        if i < producer_count {
            assert!(errs.is_empty(), "producer {i} saw errors: {errs:?}");
        }
        let bad: Vec<&String> = errs
            .iter()
            .filter(|e| e.starts_with("40P01") || e.starts_with("23") || e.starts_with("XX"))
            .collect();
        assert!(
            bad.is_empty(),
            "thread {i}: deadlocks or broken constraints: {bad:?}\n{}",
            cluster
                .log()
                .lines()
                .filter(|l| l.contains("deadlock")
                    || l.contains("Process")
                    || l.contains("STATEMENT")
                    || l.contains("CONTEXT"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // The operators' only refusals are the documented ones for a vanished delivery.
    for errs in &errors[producer_count..] {
        assert!(
            errs.iter().all(|e| e.starts_with("P0002")),
            "unexpected operator errors: {errs:?}"
        );
    }

    // Let the queue drain (the flaky endpoint's deliveries die or get cancelled).
    rx.script("/flaky", Vec::new());
    c.batch_execute(&format!("SELECT outbox.enable_endpoint('{flaky}')"))
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(90), || scalar_i64(
            &mut c,
            "SELECT count(*) + (SELECT unread FROM outbox.log_status) FROM outbox.delivery
              WHERE status IN ('pending', 'in_flight')"
        ) == 0),
        "{}",
        cluster.log()
    );
    stop_external.store(true, Ordering::SeqCst);
    let external_errors = external.join().unwrap();
    assert!(
        external_errors.is_empty(),
        "the external sender saw errors: {external_errors:?}"
    );
    // No attempt was held by two senders: each (delivery, attempt) was acknowledged once.
    // retry_dead starts a delivery's count again at 1 after its 'requeued' row, so attempts
    // are numbered within each run between such rows.
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM (
                SELECT delivery_id, run, attempt FROM (
                    SELECT delivery_id, attempt, outcome,
                           count(*) FILTER (WHERE outcome = 'requeued')
                               OVER (PARTITION BY delivery_id ORDER BY id) AS run
                      FROM outbox.attempts) h
                 WHERE outcome IN ('delivered', 'retry', 'dead')
                 GROUP BY 1, 2, 3 HAVING count(*) > 1) twice"
        ),
        0
    );
    assert!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.attempts WHERE outcome = 'requeued'"
        ) > 0,
        "retry_dead never requeued anything: the runs above were not exercised"
    );
    // ... and no delivery was delivered twice over (replays are deliveries of their own).
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM (SELECT delivery_id FROM outbox.attempts WHERE outcome = 'delivered'
               GROUP BY 1 HAVING count(*) > 1) twice"
        ),
        0
    );
    // Both senders served the shared endpoint, and the external one's acks all counted.
    let external = scalar_i64(
        &mut c,
        "SELECT count(*) FROM outbox.attempts WHERE worker = 'external'",
    );
    let acked = acked.lock().unwrap().clone();
    assert_eq!(external as usize, acked.len());
    assert!(
        external >= 200,
        "the external sender barely raced the worker: {external} attempts"
    );
    // Sender side: no delivery was claimed twice. The external sender never got the same
    // delivery twice, and what it took never reached the receiver from the worker; the
    // worker sent each of the shared endpoint's events once (the receiver always says 200).
    let acked_events: HashSet<&String> = acked.iter().map(|(e, _)| e).collect();
    assert_eq!(
        acked_events.len(),
        acked.len(),
        "external got a delivery twice"
    );
    let on_shared = rx.received_on("/shared");
    let mut shared_counts: HashMap<&str, usize> = HashMap::new();
    for r in &on_shared {
        *shared_counts.entry(r.webhook_id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = shared_counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent twice by the worker: {twice:?}");
    let both: Vec<&&String> = acked_events
        .iter()
        .filter(|e| shared_counts.contains_key(e.as_str()))
        .collect();
    assert!(both.is_empty(), "claimed by both senders: {both:?}");
    // Every request the worker made to the always-healthy endpoints is in the history,
    // once, and nothing else is: the receiver's count per webhook-id equals the number of
    // recorded attempts of that event there (replays are deliveries of the same event).
    for (path, ep) in [("/stable", &stable), ("/shared", &shared)] {
        let history: HashMap<String, i64> = c
            .query(
                "SELECT d.event_id, count(*) FROM outbox.attempts a
                   JOIN outbox.deliveries d ON d.id = a.delivery_id
                  WHERE d.endpoint_id = $1::text::uuid AND a.worker LIKE 'worker:%'
                    AND a.outcome IN ('delivered', 'retry', 'dead')
                  GROUP BY 1",
                &[ep],
            )
            .unwrap()
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut seen: HashMap<String, i64> = HashMap::new();
        for r in rx.received_on(path) {
            *seen.entry(r.webhook_id).or_default() += 1;
        }
        assert!(!seen.is_empty(), "nothing reached {path}");
        assert_eq!(
            seen, history,
            "{path}: the receiver and the history disagree"
        );
    }
    // Nothing the worker recovered from quietly: no deadlock, no broken constraint, no
    // wait for a lock long enough to time out.
    let log = cluster.log();
    let trouble: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("deadlock") || l.contains("violates") || l.contains("lock timeout"))
        .collect();
    assert!(trouble.is_empty(), "{trouble:?}");
    assert!(
        scalar_i64(
            &mut c,
            &format!(
                "SELECT count(*) FROM outbox.attempts a JOIN outbox.deliveries d ON d.id = a.delivery_id
                  WHERE d.endpoint_id = '{shared}' AND a.worker LIKE 'worker:%'"
            )
        ) > 0,
        "the worker got nothing of the shared endpoint"
    );
    eprintln!(
        "{}",
        scalar_text(
            &mut c,
            "SELECT format('%s deliveries, %s attempts recorded (%s by the external sender), %s requeued by retry_dead, %s replays, %s cancelled',
                    (SELECT count(*) FROM outbox.deliveries), (SELECT count(*) FROM outbox.attempts WHERE outcome IN ('delivered', 'retry', 'dead')),
                    (SELECT count(*) FROM outbox.attempts WHERE worker = 'external'),
                    (SELECT count(*) FROM outbox.attempts WHERE outcome = 'requeued'),
                    (SELECT count(*) FROM outbox.delivery WHERE replay_of IS NOT NULL),
                    (SELECT count(*) FROM outbox.delivery WHERE status = 'cancelled'))"
        )
    );
    // The per-endpoint in-flight counters came back to zero with the queue.
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT coalesce(sum(in_flight), 0) FROM outbox.endpoint_state"
        ),
        0
    );
}
