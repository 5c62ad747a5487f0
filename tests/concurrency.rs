//! Everything at once: producers enqueueing on many connections, operators retrying,
//! replaying, cancelling, disabling, enabling and deleting endpoints, an external sender
//! claiming beside the worker. No delivery may be held by two senders, no statement may
//! fail with a deadlock or a constraint violation, and producers never see an error.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::worker::{endpoint, scalar_i64, wait_until, FAST};
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
    let cluster = Cluster::start(FAST);
    let rx = Receiver::start().unwrap();
    rx.set_default("/flaky", Reply::Status(503));
    let mut c = cluster.client();
    let stable = endpoint(&mut c, &rx.url("/stable"), "");
    let flaky = endpoint(&mut c, &rx.url("/flaky"), "");
    let shared = endpoint(&mut c, &rx.url("/shared"), "");
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();

    // Producers: fan-out enqueues in small transactions.
    for p in 0..4 {
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
    let acked = Arc::new(Mutex::new(0usize));
    let ext_acked = acked.clone();
    let ext_endpoint = shared.clone();
    workers.push(spawn_loop(&cluster, &stop, move |c, _| {
        let rows = c.query(
            "SELECT delivery_id::text, attempt FROM outbox.claim(10, 'external', '30 seconds', $1::text::uuid)",
            &[&ext_endpoint],
        )?;
        for r in &rows {
            let (id, attempt): (String, i32) = (r.get(0), r.get(1));
            c.execute(
                "SELECT outbox.ack($1::text::uuid, $2, 'delivered', 200, worker => 'external')",
                &[&id, &attempt],
            )?;
            *ext_acked.lock().unwrap() += 1;
        }
        Ok(())
    }));

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
    rx.set_default("/flaky", Reply::Status(200));
    c.batch_execute(&format!("SELECT outbox.enable_endpoint('{flaky}')"))
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(90), || scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.delivery WHERE status IN ('pending', 'in_flight')"
        ) == 0),
        "{}",
        cluster.log()
    );
    // No attempt was held by two senders: each (delivery, attempt) was acknowledged once.
    // (Only where no operator restarted the count: retry_dead begins again at attempt 1.)
    assert_eq!(
        scalar_i64(
            &mut c,
            &format!(
                "SELECT count(*) FROM (SELECT a.delivery_id, a.attempt FROM outbox.attempt a
                   JOIN outbox.delivery d ON d.id = a.delivery_id
                  WHERE a.outcome IN ('delivered', 'retry', 'dead') AND d.endpoint_id <> '{flaky}'
                  GROUP BY 1, 2 HAVING count(*) > 1) twice"
            )
        ),
        0
    );
    // ... and no delivery was delivered twice over (replays are deliveries of their own).
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM (SELECT delivery_id FROM outbox.attempt WHERE outcome = 'delivered'
               GROUP BY 1 HAVING count(*) > 1) twice"
        ),
        0
    );
    // Both senders served the shared endpoint, and the external one's acks all counted.
    let external = scalar_i64(
        &mut c,
        "SELECT count(*) FROM outbox.attempt WHERE worker = 'external'",
    );
    assert_eq!(external as usize, *acked.lock().unwrap());
    assert!(external > 0, "the external sender got nothing");
    assert!(
        scalar_i64(
            &mut c,
            &format!(
                "SELECT count(*) FROM outbox.attempt a JOIN outbox.delivery d ON d.id = a.delivery_id
                  WHERE d.endpoint_id = '{shared}' AND a.worker LIKE 'worker:%'"
            )
        ) > 0,
        "the worker got nothing of the shared endpoint"
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
