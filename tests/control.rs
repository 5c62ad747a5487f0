//! Endpoint health and delivery control with the worker running against real receivers:
//! circuit breaker (open, probe, close), auto-disable, rate limit, concurrency limit, and
//! ordered endpoints.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::worker::{
    collect_notifications, endpoint, scalar_i64, scalar_text, wait_settled, wait_until, FAST,
};
use common::Cluster;
use outbox_receiver::{Received, Receiver, Reply};

/// FAST plus these lines.
fn settings(extra: &[&'static str]) -> Vec<&'static str> {
    FAST.iter().chain(extra).copied().collect()
}

fn enqueue_numbered(c: &mut postgres::Client, n: usize, extra: &str) {
    c.batch_execute(&format!(
        "SELECT outbox.enqueue('order.created', jsonb_build_object('n', g){extra}) FROM generate_series(1, {n}) g"
    ))
    .unwrap();
}

/// The `n` of each request's payload, in arrival order.
fn numbers(received: &[Received]) -> Vec<i64> {
    received
        .iter()
        .map(|r| r.json().unwrap()["data"]["n"].as_i64().unwrap())
        .collect()
}

fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    b.duration_since(a).unwrap_or_default().as_secs_f64()
}

#[test]
fn a_failing_endpoint_opens_its_circuit_and_a_probe_closes_it_while_a_healthy_one_keeps_going() {
    let cluster = Cluster::start(&settings(&[
        "outbox.circuit_threshold = 5",
        "outbox.circuit_cooldown = '3s'",
    ]));
    let rx = Receiver::start().unwrap();
    rx.set_default("/bad", Reply::Status(500));
    let mut c = cluster.client();
    let bad = endpoint(&mut c, &rx.url("/bad"), "");
    endpoint(&mut c, &rx.url("/good"), "");
    let mut listener = cluster.client();
    listener.batch_execute("LISTEN outbox_operator").unwrap();

    enqueue_numbered(&mut c, 20, "");
    let open = wait_until(Duration::from_secs(10), || {
        scalar_text(
            &mut c,
            &format!(
                "SELECT circuit::text FROM outbox.endpoint_health WHERE endpoint_id = '{bad}'"
            ),
        ) == "open"
    });
    assert!(open, "the circuit did not open:\n{}", cluster.log());
    let failed_before = rx.received_on("/bad").len();

    // While it is open, the healthy endpoint keeps receiving everything at once.
    let started = Instant::now();
    enqueue_numbered(&mut c, 100, "");
    assert!(rx.wait_for(20 + 100 + failed_before, Duration::from_secs(10)));
    assert_eq!(rx.received_on("/good").len(), 120);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the healthy endpoint was slowed down: {:?}",
        started.elapsed()
    );
    // ... and the failing one gets nothing, and its deliveries keep their retries.
    assert_eq!(rx.received_on("/bad").len(), failed_before);
    let health = c
        .query_one(
            &format!(
                "SELECT consecutive_failures, next_probe_at > now(), pending FROM outbox.endpoint_health
                  WHERE endpoint_id = '{bad}'"
            ),
            &[],
        )
        .unwrap();
    assert!(health.get::<_, i32>(0) >= 5);
    assert!(health.get::<_, bool>(1), "the next probe time is shown");
    // Its deliveries are made when the batch that sent the healthy one's closes, moments
    // after the healthy endpoint received them.
    let pending = format!("SELECT pending FROM outbox.endpoint_health WHERE endpoint_id = '{bad}'");
    assert!(
        wait_until(Duration::from_secs(5), || scalar_i64(&mut c, &pending)
            == 120),
        "nothing was given up: {} pending",
        scalar_i64(&mut c, &pending)
    );

    // The receiver recovers: after the cool-down one probe goes, succeeds, and the backlog flows.
    rx.set_default("/bad", Reply::Status(200));
    assert!(
        wait_settled(&cluster, Duration::from_secs(15)),
        "{}",
        cluster.log()
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            &format!("SELECT count(*) FROM outbox.deliveries WHERE endpoint_id = '{bad}' AND status = 'delivered'")
        ),
        120
    );
    assert_eq!(
        scalar_text(
            &mut c,
            &format!(
                "SELECT circuit::text FROM outbox.endpoint_health WHERE endpoint_id = '{bad}'"
            )
        ),
        "closed"
    );
    let events = collect_notifications(&mut listener, Duration::from_secs(5), |got| {
        got.iter()
            .any(|(_, v)| v["kind"] == "outbox.endpoint.circuit_closed")
    });
    let kinds: Vec<&str> = events
        .iter()
        .filter(|(_, v)| v["endpoint_id"] == bad.as_str())
        .map(|(_, v)| v["kind"].as_str().unwrap())
        .filter(|k| k.contains("circuit"))
        .collect();
    assert_eq!(
        kinds,
        [
            "outbox.endpoint.circuit_opened",
            "outbox.endpoint.circuit_closed"
        ]
    );
}

#[test]
fn a_failed_probe_opens_the_circuit_again_for_twice_as_long() {
    let cluster = Cluster::start(&settings(&[
        "outbox.circuit_threshold = 3",
        "outbox.circuit_cooldown = '1s'",
    ]));
    let rx = Receiver::start().unwrap();
    rx.set_default("/down", Reply::Status(503));
    let mut c = cluster.client();
    let down = endpoint(&mut c, &rx.url("/down"), "");
    enqueue_numbered(&mut c, 3, "");
    let cooldown = |c: &mut postgres::Client| {
        scalar_text(
            c,
            &format!(
                "SELECT coalesce(circuit_cooldown::text, '-') FROM outbox.endpoint_health WHERE endpoint_id = '{down}'"
            ),
        )
    };
    assert!(wait_until(Duration::from_secs(10), || cooldown(&mut c) == "00:00:01"));
    // The probe (one request) fails: open again, for 2 s, then 4 s.
    assert!(wait_until(Duration::from_secs(10), || cooldown(&mut c) == "00:00:02"));
    let after_first_probe = rx.received_on("/down").len();
    assert_eq!(after_first_probe, 4, "3 failures, then exactly one probe");
    assert!(wait_until(Duration::from_secs(10), || cooldown(&mut c) == "00:00:04"));
    assert_eq!(rx.received_on("/down").len(), 5);
    // Retries were not used up while the circuit was open: nothing is dead yet.
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM outbox.dead_letters"),
        0
    );
}

#[test]
fn an_endpoint_failing_for_too_long_is_disabled_and_enabling_it_resumes_its_queue() {
    let cluster = Cluster::start(&settings(&[
        "outbox.circuit_threshold = 0",
        "outbox.auto_disable_after = '2s'",
        // Enough retries to keep failing for longer than that.
        "outbox.retry_schedule = '200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms'",
    ]));
    let rx = Receiver::start().unwrap();
    rx.set_default("/broken", Reply::Status(502));
    let mut c = cluster.client();
    let broken = endpoint(&mut c, &rx.url("/broken"), "");
    let mut listener = cluster.client();
    listener.batch_execute("LISTEN outbox_operator").unwrap();
    enqueue_numbered(&mut c, 5, "");

    let started = Instant::now();
    let disabled = wait_until(Duration::from_secs(10), || {
        scalar_text(
            &mut c,
            &format!("SELECT enabled::text FROM outbox.endpoints WHERE id = '{broken}'"),
        ) == "false"
    });
    assert!(disabled, "{}", cluster.log());
    assert!(started.elapsed() >= Duration::from_secs(2));
    let reason = scalar_text(
        &mut c,
        &format!("SELECT disabled_reason FROM outbox.endpoints WHERE id = '{broken}'"),
    );
    assert!(
        reason.contains("disabled after 00:00:02 of failures"),
        "{reason}"
    );
    let events = collect_notifications(&mut listener, Duration::from_secs(5), |got| {
        got.iter()
            .any(|(_, v)| v["kind"] == "outbox.endpoint.disabled")
    });
    assert!(events.iter().any(
        |(_, v)| v["kind"] == "outbox.endpoint.disabled" && v["endpoint_id"] == broken.as_str()
    ));

    // Its deliveries wait (none dead), and nothing more is sent.
    std::thread::sleep(Duration::from_millis(500));
    let sent = rx.received_on("/broken").len();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(rx.received_on("/broken").len(), sent);
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.delivery WHERE status = 'pending'"
        ),
        5
    );

    rx.set_default("/broken", Reply::Status(204));
    c.batch_execute(&format!("SELECT outbox.enable_endpoint('{broken}')"))
        .unwrap();
    assert!(wait_settled(&cluster, Duration::from_secs(10)));
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
        ),
        5
    );
}

#[test]
fn a_rate_limited_endpoint_gets_its_rate_and_the_others_full_speed() {
    let cluster = Cluster::start(FAST);
    let rx = Receiver::start().unwrap();
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/limited"), ", rate_limit => 20");
    endpoint(&mut c, &rx.url("/free"), "");
    let started = SystemTime::now();
    enqueue_numbered(&mut c, 120, "");
    assert!(
        rx.wait_for(240, Duration::from_secs(20)),
        "{}",
        cluster.log()
    );

    let free = rx.received_on("/free");
    assert!(
        secs_between(started, free.last().unwrap().received_at) < 1.5,
        "the unlimited endpoint was held back"
    );
    // A second's worth may go at once; after that the bucket refills at 20/s.
    let limited = rx.received_on("/limited");
    let steady = &limited[20..];
    let span = secs_between(steady[0].received_at, steady.last().unwrap().received_at);
    let rate = (steady.len() - 1) as f64 / span;
    assert!(
        (16.0..=24.0).contains(&rate),
        "measured {rate:.1}/s over {span:.2} s for a limit of 20/s"
    );
    // No second anywhere saw more than the burst plus a second's worth (40), give or take
    // the same 20 % for the spread between claiming and arriving.
    for (i, r) in limited.iter().enumerate() {
        let within = limited[i..]
            .iter()
            .take_while(|o| secs_between(r.received_at, o.received_at) < 1.0)
            .count();
        assert!(within <= 48, "{within} requests within one second");
    }
}

#[test]
fn max_in_flight_bounds_the_requests_one_slow_endpoint_holds() {
    let cluster = Cluster::start(FAST);
    let rx = Receiver::start().unwrap();
    rx.set_default("/slow", Reply::Delay(Duration::from_millis(300), 200));
    let mut c = cluster.client();
    let slow = endpoint(&mut c, &rx.url("/slow"), ", max_in_flight => 3");
    endpoint(&mut c, &rx.url("/fast"), "");
    enqueue_numbered(&mut c, 24, "");

    let mut most = 0;
    let started = Instant::now();
    while rx.received_on("/slow").len() < 24 && started.elapsed() < Duration::from_secs(15) {
        most = most.max(scalar_i64(
            &mut c,
            &format!(
                "SELECT count(*) FROM outbox.delivery WHERE endpoint_id = '{slow}' AND status = 'in_flight'"
            ),
        ));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(wait_settled(&cluster, Duration::from_secs(10)));
    assert!((1..=3).contains(&most), "{most} in flight at once");
    // Arrivals come in waves of at most 3 per 300 ms answer.
    let arrivals = rx.received_on("/slow");
    for w in arrivals.windows(4) {
        assert!(
            secs_between(w[0].received_at, w[3].received_at) >= 0.25,
            "a fourth request arrived while three were unanswered"
        );
    }
    let fast = rx.received_on("/fast");
    assert_eq!(fast.len(), 24);
    assert!(
        secs_between(arrivals[0].received_at, fast.last().unwrap().received_at) < 1.0,
        "the other endpoint waited for the slow one"
    );
}

#[test]
fn an_ordered_endpoint_delivers_in_exact_order_despite_failures() {
    let cluster = Cluster::start(FAST);
    let rx = Receiver::start().unwrap();
    // Every 9th request fails once; request 50 onwards fails 4 times in a row, which is the
    // whole retry schedule: that event goes dead and releases the ones behind it.
    let mut replies = Vec::new();
    for i in 0..260 {
        if i == 50 {
            replies.extend(std::iter::repeat_n(Reply::Status(500), 4));
        } else if i % 9 == 4 {
            replies.push(Reply::Status(503));
        }
        replies.push(Reply::Status(200));
    }
    rx.script("/ordered", replies);
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/ordered"), ", ordered => true");
    endpoint(&mut c, &rx.url("/unordered"), "");
    enqueue_numbered(&mut c, 200, "");
    assert!(
        wait_settled(&cluster, Duration::from_secs(60)),
        "{}",
        cluster.log()
    );

    let requests = numbers(&rx.received_on("/ordered"));
    // Never ahead of an unfinished event: the sequence only repeats (retries) or moves on.
    assert!(
        requests
            .windows(2)
            .all(|w| w[1] == w[0] || w[1] == w[0] + 1),
        "out of order: {requests:?}"
    );
    let dead: Vec<i64> = c
        .query(
            "SELECT (payload->>'n')::bigint FROM outbox.dead_letters",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        dead.len(),
        1,
        "exactly the event that failed 4 times is dead"
    );
    let mut tried = requests.clone();
    tried.dedup();
    assert_eq!(
        tried,
        (1..=200).collect::<Vec<i64>>(),
        "every event was tried, in order"
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered' AND endpoint_url LIKE '%/ordered'"
        ),
        199
    );
    // The unordered endpoint is not held back by the ordered one.
    assert_eq!(rx.received_on("/unordered").len(), 200);
}
