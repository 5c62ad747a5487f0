//! The delivery engine end to end: a cluster with the worker preloaded, the bundled receiver
//! on 127.0.0.1, signatures checked by the `standardwebhooks` crate.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use common::worker::{
    endpoint, scalar_i64, scalar_text, wait_settled, wait_settled_through_restarts, wait_until,
    worker_pid, FAST, SECRET,
};
use common::Cluster;
use outbox_receiver::{Receiver, Reply};

/// `ALTER SYSTEM SET name = value` and reload (each its own statement: ALTER SYSTEM refuses
/// to run inside a transaction block).
fn set_system(c: &mut postgres::Client, name: &str, value: &str) {
    c.batch_execute(&format!("ALTER SYSTEM SET {name} = {value}"))
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
}

fn receiver() -> Receiver {
    let rx = Receiver::start().unwrap();
    rx.set_secret(Some(SECRET.into()));
    rx
}

#[test]
fn a_commit_is_delivered_signed_and_a_rollback_never_sent() {
    let cluster = Cluster::start(FAST);
    worker_pid(&cluster);
    let rx = receiver();
    let mut c = cluster.client();
    endpoint(
        &mut c,
        &rx.url("/hook"),
        ", headers => '{\"X-Env\": \"test\"}'",
    );

    c.batch_execute("BEGIN; SELECT outbox.enqueue('order.cancelled', '{\"id\": 1}'); ROLLBACK;")
        .unwrap();
    let committed = SystemTime::now();
    c.batch_execute(
        "SELECT outbox.enqueue('order.created', '{\"id\": 42}', event_id => 'order-42')",
    )
    .unwrap();
    assert!(
        rx.wait_for(1, Duration::from_secs(10)),
        "nothing arrived:\n{}",
        cluster.log()
    );
    let got = rx.received().remove(0);
    let latency = got
        .received_at
        .duration_since(committed)
        .unwrap_or_default();
    eprintln!("commit -> receipt: {latency:?}");
    assert!(
        latency < Duration::from_secs(1),
        "woken at commit, not by polling: {latency:?}"
    );

    assert_eq!(
        got.verified,
        Some(true),
        "standardwebhooks accepts the signature"
    );
    assert_eq!(got.webhook_id, "order-42");
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("x-env"), Some("test"));
    // The extension's own version, not the HTTP crate's.
    assert_eq!(
        got.header("user-agent"),
        Some(concat!("webhook_outbox/", env!("CARGO_PKG_VERSION")))
    );
    let body = got.json().unwrap();
    assert_eq!(body["type"], "order.created");
    assert_eq!(body["data"]["id"], 42);
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));

    assert!(wait_settled(&cluster, Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.count(), 1, "the rolled-back event was never sent");
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT concat_ws('|', status, attempts, last_status_code) FROM outbox.deliveries"
        ),
        "delivered|1|200"
    );
    assert_eq!(
        scalar_text(&mut c, "SELECT concat_ws('|', attempt, outcome, status_code, duration_ms > 0) FROM outbox.attempts"),
        "1|delivered|200|t"
    );
}

#[test]
fn a_thousand_events_in_one_transaction_are_all_delivered() {
    let cluster = Cluster::start(FAST);
    let rx = receiver();
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/bulk"), "");
    let started = Instant::now();
    c.batch_execute(
        "BEGIN;
         SELECT outbox.enqueue('bulk.item', jsonb_build_object('n', g), event_id => 'bulk-' || g)
           FROM generate_series(1, 1000) g;
         COMMIT;",
    )
    .unwrap();
    assert!(
        rx.wait_for(1000, Duration::from_secs(60)),
        "only {} arrived",
        rx.count()
    );
    eprintln!("1000 deliveries in {:?}", started.elapsed());
    let ids: HashSet<String> = rx.received().into_iter().map(|r| r.webhook_id).collect();
    assert_eq!(ids.len(), 1000);
    assert!(rx.received().iter().all(|r| r.verified == Some(true)));
    assert!(wait_settled(&cluster, Duration::from_secs(10)));
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
        ),
        1000
    );
}

#[test]
fn failures_are_retried_and_classified() {
    let cluster = Cluster::start(FAST);
    let rx = receiver();
    let mut c = cluster.client();
    rx.script("/flaky", vec![Reply::Status(500), Reply::Status(503)]);
    rx.set_default("/reject", Reply::Status(400));
    rx.set_default("/gone", Reply::Status(410));
    rx.set_default(
        "/moved",
        Reply::StatusWithHeaders(301, vec![("Location".into(), "/elsewhere".into())]),
    );
    rx.set_default("/broken", Reply::Status(500));
    let flaky = endpoint(&mut c, &rx.url("/flaky"), "");
    let reject = endpoint(&mut c, &rx.url("/reject"), "");
    let gone = endpoint(&mut c, &rx.url("/gone"), "");
    let moved = endpoint(&mut c, &rx.url("/moved"), "");
    let broken = endpoint(&mut c, &rx.url("/broken"), "");
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    assert!(
        wait_settled(&cluster, Duration::from_secs(20)),
        "{}",
        cluster.log()
    );

    let history = |c: &mut postgres::Client, ep: &str| {
        scalar_text(
            c,
            &format!(
                "SELECT string_agg(concat(outcome, ':', status_code), ',' ORDER BY attempt)
                   FROM outbox.attempts WHERE endpoint_id = '{ep}'"
            ),
        )
    };
    let status = |c: &mut postgres::Client, ep: &str| {
        scalar_text(
            c,
            &format!("SELECT status::text FROM outbox.deliveries WHERE endpoint_id = '{ep}'"),
        )
    };
    // 500, 503, then 200: delivered on the third attempt.
    assert_eq!(history(&mut c, &flaky), "retry:500,retry:503,delivered:200");
    assert_eq!(status(&mut c, &flaky), "delivered");
    assert_eq!(rx.received_on("/flaky").len(), 3);
    let ids: HashSet<String> = rx
        .received_on("/flaky")
        .into_iter()
        .map(|r| r.webhook_id)
        .collect();
    assert_eq!(ids.len(), 1, "webhook-id is stable across retries");
    // 400: dead after one attempt.
    assert_eq!(history(&mut c, &reject), "dead:400");
    assert_eq!(status(&mut c, &reject), "dead");
    // 410: dead, and the endpoint is disabled with the reason.
    assert_eq!(history(&mut c, &gone), "dead:410");
    assert_eq!(
        scalar_text(&mut c, &format!("SELECT concat_ws('|', enabled, disabled_reason) FROM outbox.endpoints WHERE id = '{gone}'")),
        "f|receiver answered 410 Gone"
    );
    // 301: not followed, a permanent failure.
    assert_eq!(history(&mut c, &moved), "dead:301");
    assert_eq!(rx.received_on("/elsewhere").len(), 0);
    // Always 500: four attempts (schedule of three retries), then dead.
    assert_eq!(
        history(&mut c, &broken),
        "retry:500,retry:500,retry:500,dead:500"
    );
    assert!(scalar_text(
        &mut c,
        &format!("SELECT last_error FROM outbox.dead_letters WHERE endpoint_id = '{broken}'")
    )
    .contains("retry schedule exhausted"));
}

#[test]
fn a_timeout_is_retried() {
    let cluster = Cluster::start(FAST);
    let rx = receiver();
    let mut c = cluster.client();
    rx.script("/slow", vec![Reply::Hang]);
    let ep = endpoint(&mut c, &rx.url("/slow"), ", timeout => '400 milliseconds'");
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    assert!(
        wait_settled(&cluster, Duration::from_secs(15)),
        "{}",
        cluster.log()
    );
    assert_eq!(
        scalar_text(
            &mut c,
            &format!("SELECT string_agg(concat(outcome, ':', coalesce(status_code::text, error)), ',' ORDER BY attempt) FROM outbox.attempts WHERE endpoint_id = '{ep}'")
        ),
        "retry:timed out after 400 ms,delivered:200"
    );
}

#[test]
fn retry_after_is_honoured() {
    let cluster = Cluster::start(FAST);
    let rx = receiver();
    let mut c = cluster.client();
    rx.script(
        "/busy",
        vec![Reply::StatusWithHeaders(
            429,
            vec![("Retry-After".into(), "2".into())],
        )],
    );
    endpoint(&mut c, &rx.url("/busy"), "");
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    assert!(rx.wait_for(2, Duration::from_secs(15)), "{}", cluster.log());
    let got = rx.received();
    let gap = got[1]
        .received_at
        .duration_since(got[0].received_at)
        .unwrap();
    assert!(
        gap >= Duration::from_millis(1900),
        "waited only {gap:?} (schedule says 300 ms)"
    );
    assert!(gap < Duration::from_secs(5), "waited {gap:?}");
}

#[test]
fn a_reload_changes_the_workers_behaviour() {
    let cluster = Cluster::start(FAST);
    let rx = receiver();
    let mut c = cluster.client();
    rx.set_default("/body", Reply::Body(400, b"abcdefghijklmnop".to_vec()));
    let ep = endpoint(&mut c, &rx.url("/body"), "");
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    assert!(wait_settled(&cluster, Duration::from_secs(10)));
    set_system(&mut c, "outbox.max_response_body", "4");
    std::thread::sleep(Duration::from_millis(700));
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    assert!(wait_settled(&cluster, Duration::from_secs(10)));
    assert_eq!(
        scalar_text(
            &mut c,
            &format!("SELECT string_agg(response_body, ',' ORDER BY created_at) FROM outbox.attempts WHERE endpoint_id = '{ep}'")
        ),
        "abcdefghijklmnop,abcd"
    );
}

#[test]
fn the_worker_waits_for_the_extension_and_survives_drop_extension() {
    let cluster = Cluster::start(FAST);
    let pid = worker_pid(&cluster);
    let rx = receiver();
    let mut c = cluster.client();
    c.batch_execute("DROP EXTENSION webhook_outbox").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    c.batch_execute("CREATE EXTENSION webhook_outbox").unwrap();
    endpoint(&mut c, &rx.url("/again"), "");
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    assert!(rx.wait_for(1, Duration::from_secs(15)), "{}", cluster.log());
    assert_eq!(worker_pid(&cluster), pid, "the same worker carried on");
}

/// Enqueues `n` events (one transaction) whose ids are `prefix-1` … `prefix-n`.
fn enqueue_many(c: &mut postgres::Client, prefix: &str, n: usize) -> HashSet<String> {
    c.batch_execute(&format!(
        "SELECT outbox.enqueue('load.item', jsonb_build_object('n', g), event_id => '{prefix}-' || g)
           FROM generate_series(1, {n}) g"
    ))
    .unwrap();
    (1..=n).map(|i| format!("{prefix}-{i}")).collect()
}

#[test]
fn deliveries_pending_at_a_restart_are_delivered_afterwards() {
    let mut cluster = Cluster::start(FAST);
    let rx = receiver();
    rx.set_default("/slow", Reply::Delay(Duration::from_millis(700), 200));
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/slow"), "");
    set_system(&mut c, "outbox.max_in_flight", "10");
    std::thread::sleep(Duration::from_millis(500));
    let expected = enqueue_many(&mut c, "restart", 60);
    assert!(rx.wait_for(5, Duration::from_secs(10)));
    drop(c);
    cluster.restart("fast");
    assert!(
        wait_settled(&cluster, Duration::from_secs(60)),
        "{}",
        cluster.log()
    );
    let got: HashSet<String> = rx.received().into_iter().map(|r| r.webhook_id).collect();
    assert_eq!(got, expected, "every committed event arrived");
    let mut c = cluster.client();
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
        ),
        60
    );
}

#[test]
fn a_killed_worker_loses_nothing() {
    let cluster = Cluster::start(FAST);
    let rx = receiver();
    rx.set_default("/k", Reply::Delay(Duration::from_millis(200), 200));
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/k"), "");
    set_system(&mut c, "outbox.max_in_flight", "20");
    std::thread::sleep(Duration::from_millis(500));
    let pid = worker_pid(&cluster);
    let expected = enqueue_many(&mut c, "kill", 300);
    assert!(rx.wait_for(40, Duration::from_secs(20)));
    let before_kill = rx.count();
    // SIGKILL: the postmaster treats it as a crash and restarts every backend.
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    drop(c);
    let settled = wait_settled_through_restarts(&cluster, Duration::from_secs(90));
    assert!(settled, "{}", cluster.log());
    assert_ne!(worker_pid(&cluster), pid, "a new worker took over");
    let received: Vec<String> = rx.received().into_iter().map(|r| r.webhook_id).collect();
    let distinct: HashSet<String> = received.iter().cloned().collect();
    assert_eq!(distinct, expected, "every committed event arrived");
    let duplicates = received.len() - distinct.len();
    eprintln!("{before_kill} received before the kill, {duplicates} duplicates");
    assert!(
        duplicates <= 20,
        "duplicates ({duplicates}) only for requests in flight at the kill (at most 20)"
    );
}

#[test]
fn a_rotated_secret_signs_beside_the_new_one_until_the_overlap_ends() {
    let cluster = Cluster::start(FAST);
    let rx = receiver();
    let mut c = cluster.client();
    let ep = endpoint(&mut c, &rx.url("/rot"), "");
    let new_secret = scalar_text(
        &mut c,
        &format!("SELECT outbox.rotate_secret('{ep}', overlap => '2 seconds')"),
    );
    assert_ne!(new_secret, SECRET);
    assert_eq!(
        scalar_text(&mut c, &format!("SELECT outbox.endpoint_secret('{ep}')")),
        new_secret
    );

    // Within the overlap: two signatures, and each secret verifies on its own.
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    assert!(rx.wait_for(1, Duration::from_secs(10)), "{}", cluster.log());
    let first = rx.received().remove(0);
    assert_eq!(first.signature.split(' ').count(), 2, "{}", first.signature);
    let verify = |secret: &str, r: &outbox_receiver::Received| {
        let mut headers = http::HeaderMap::new();
        headers.insert("webhook-id", r.webhook_id.parse().unwrap());
        headers.insert("webhook-timestamp", r.timestamp.parse().unwrap());
        headers.insert("webhook-signature", r.signature.parse().unwrap());
        standardwebhooks::Webhook::new(secret)
            .unwrap()
            .verify(&r.body, &headers)
            .is_ok()
    };
    assert!(
        verify(SECRET, &first),
        "the old secret verifies during the overlap"
    );
    assert!(
        verify(&new_secret, &first),
        "the new secret verifies during the overlap"
    );

    // After it: only the new one.
    std::thread::sleep(Duration::from_millis(2100));
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    assert!(rx.wait_for(2, Duration::from_secs(10)), "{}", cluster.log());
    let second = rx.received().remove(1);
    assert_eq!(second.signature.split(' ').count(), 1);
    assert!(verify(&new_secret, &second));
    assert!(
        !verify(SECRET, &second),
        "the old secret no longer verifies"
    );

    // Bad overlaps are refused.
    let err = c
        .batch_execute(&format!(
            "SELECT outbox.rotate_secret('{ep}', overlap => '-1 hour')"
        ))
        .unwrap_err();
    assert_eq!(common::sqlstate(&err), "22023");
}

#[test]
fn an_idle_worker_sleeps_and_enabling_an_endpoint_wakes_it() {
    // The default 5 s poll interval: any quick reaction below comes from a wake-up.
    let cluster = Cluster::start(&["shared_preload_libraries = 'webhook_outbox'"]);
    let pid = worker_pid(&cluster);
    let rx = receiver();
    let mut c = cluster.client();
    let ep = endpoint(&mut c, &rx.url("/idle"), ", enabled => false");
    c.batch_execute(&format!(
        "SELECT outbox.enqueue('x.y', '{{}}', endpoint_id => '{ep}')"
    ))
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));

    // Idle (its only delivery waits on a disabled endpoint): a handful of cycles, not one
    // every 50 ms.
    let cycles = |c: &mut postgres::Client| -> i64 {
        c.query_one(
            "SELECT (SELECT xact_commit FROM pg_stat_get_backend_idset() i
                      CROSS JOIN LATERAL (SELECT pg_stat_get_backend_pid(i) AS pid,
                                                 pg_stat_get_backend_xact_commit(i) AS xact_commit) x
                     WHERE x.pid = $1)",
            &[&pid],
        )
        .map(|r| r.get::<_, Option<i64>>(0).unwrap_or(0))
        .unwrap_or(0)
    };
    let before = cycles(&mut c);
    std::thread::sleep(Duration::from_secs(3));
    let idle_cycles = cycles(&mut c) - before;
    assert!(idle_cycles <= 4, "{idle_cycles} cycles in 3 s while idle");

    let enabled = Instant::now();
    c.batch_execute(&format!("SELECT outbox.enable_endpoint('{ep}')"))
        .unwrap();
    assert!(rx.wait_for(1, Duration::from_secs(10)));
    assert!(
        enabled.elapsed() < Duration::from_secs(2),
        "took {:?}",
        enabled.elapsed()
    );
}

#[test]
fn several_workers_share_the_queue_and_send_each_delivery_once() {
    let settings: Vec<&str> = FAST
        .iter()
        .copied()
        .chain(["outbox.workers = 2", "outbox.batch_size = 50"])
        .collect();
    let cluster = Cluster::start(&settings);
    let rx = receiver();
    rx.set_default("/slowish", Reply::Delay(Duration::from_millis(20), 200));
    let mut c = cluster.client();
    // A rate limit (too high to hold anything back) keeps first attempts out of the reading
    // worker's batches: every delivery is queued, for both workers to claim.
    endpoint(
        &mut c,
        &rx.url("/slowish"),
        ", max_in_flight => 1000, rate_limit => 100000",
    );
    assert!(wait_until(Duration::from_secs(20), || {
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'webhook_outbox worker'",
        ) == 2
    }));
    let ids = enqueue_many(&mut c, "multi", 2000);
    assert!(
        wait_settled(&cluster, Duration::from_secs(60)),
        "{}",
        cluster.log()
    );
    let received: Vec<String> = rx.received().into_iter().map(|r| r.webhook_id).collect();
    let distinct: HashSet<String> = received.iter().cloned().collect();
    assert_eq!(distinct, ids, "every event arrived");
    assert_eq!(received.len(), ids.len(), "and none twice");
    // Both workers took part.
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(DISTINCT worker) FROM outbox.attempts"),
        2
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT max(attempt)::bigint FROM outbox.attempts"),
        1
    );
}
