//! The holes a review of 0.3.0 found, each reproduced against a real cluster with the worker
//! running and a receiver on loopback: what an attacker with a little access, a careless
//! producer or an operator who walks away could do to everyone's delivery.

mod common;

use std::time::{Duration, Instant};

use common::worker::{
    collect_notifications, endpoint, scalar_i64, scalar_text, wait_read, wait_settled, wait_until,
    worker_pid, FAST,
};
use common::{sqlstate, Cluster};
use outbox_receiver::{FakeDns, Receiver, Reply};

/// `FAST` plus more settings (later lines win).
fn settings(extra: &[&'static str]) -> Vec<&'static str> {
    FAST.iter().copied().chain(extra.iter().copied()).collect()
}

fn error_of(c: &mut postgres::Client, sql: &str) -> (String, String) {
    let e = c
        .batch_execute(sql)
        .expect_err(&format!("should fail: {sql}"));
    let message = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    (sqlstate(&e), message)
}

/// A role that may create objects in `public` (as a database owner may) plants functions
/// that an unqualified call in the worker's statements would pick over pg_catalog's: an
/// exact-type `unnest(float8[])` that would run its code as the worker's role on every ack,
/// and a plain `array_agg(timestamptz)` that would make every ack fail.
#[test]
fn functions_planted_in_public_never_run_in_the_worker() {
    let cluster = Cluster::start(FAST);
    let rx = Receiver::start().unwrap();
    let mut c = cluster.client();
    c.batch_execute("CREATE ROLE mallory LOGIN; GRANT CREATE ON SCHEMA public TO mallory;")
        .unwrap();
    let mut m = cluster.client_as("mallory");
    m.batch_execute(
        "CREATE TABLE public.ran (who text, what text);
         GRANT INSERT ON public.ran TO PUBLIC;
         CREATE FUNCTION public.unnest(float8[]) RETURNS SETOF float8 LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO public.ran VALUES (current_user, 'unnest');
             RETURN QUERY SELECT pg_catalog.unnest($1);
         END $$;
         CREATE FUNCTION public.array_agg(timestamptz) RETURNS timestamptz[] LANGUAGE sql
             AS $$ SELECT ARRAY[$1] $$;",
    )
    .unwrap();
    // Retries too, so that acks carry retry times (the statement the plants aim at).
    rx.script("/hook", vec![Reply::Status(503), Reply::Status(503)]);
    endpoint(&mut c, &rx.url("/hook"), "");
    c.batch_execute(
        "SELECT outbox.enqueue('order.created', jsonb_build_object('n', g)) FROM generate_series(1, 20) g",
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
        ) == 20),
        "delivery stopped:\n{}",
        cluster.log()
    );
    assert_eq!(rx.count(), 22, "each event sent once, plus two retries");
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM public.ran"),
        0,
        "planted code ran inside the worker"
    );
}

/// `deliver_at => 'infinity'` used to make every cycle of the worker fail; absurd values are
/// refused, a row that has one anyway (left by an older release) holds only itself, and a
/// far-future head of an ordered endpoint shows as what holds that endpoint.
#[test]
fn absurd_deliver_at_is_refused_and_never_stops_the_worker() {
    let cluster = Cluster::start(FAST);
    let rx = Receiver::start().unwrap();
    let mut c = cluster.client();
    let ep = endpoint(&mut c, &rx.url("/hook"), "");
    for bad in ["'infinity'", "'-infinity'", "now() + interval '2 years'"] {
        let (state, message) = error_of(
            &mut c,
            &format!("SELECT outbox.enqueue('x.y', '{{}}', deliver_at => {bad})"),
        );
        assert_eq!(state, "22023", "{bad}: {message}");
        assert!(message.contains("deliver_at"), "{message}");
    }
    // Long past means now.
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}', deliver_at => '1970-01-01')")
        .unwrap();
    assert!(rx.wait_for(1, Duration::from_secs(10)), "{}", cluster.log());

    // A row with a non-finite due time, as 0.3.0 accepted: it may wait, nobody else may.
    // (Its delivery exists once the event was read, after the commit.)
    c.batch_execute(&format!(
        "SELECT outbox.disable_endpoint('{ep}');
         SELECT outbox.enqueue('x.stuck', '{{}}', event_id => 'stuck', endpoint_id => '{ep}');"
    ))
    .unwrap();
    wait_read(&mut c);
    assert_eq!(
        c.execute(
            "UPDATE outbox.delivery SET due_at = 'infinity' WHERE event_id = 'stuck'",
            &[]
        )
        .unwrap(),
        1
    );
    c.batch_execute(&format!(
        "SELECT outbox.enable_endpoint('{ep}');
         SELECT outbox.enqueue('x.after', jsonb_build_object('n', g)) FROM generate_series(1, 10) g;"
    ))
    .unwrap();
    assert!(
        rx.wait_for(11, Duration::from_secs(15)),
        "delivery stopped behind one infinite due time:\n{}",
        cluster.log()
    );
    wait_read(&mut c);
    assert!(
        !cluster.log().contains("cannot subtract infinite"),
        "{}",
        cluster.log()
    );

    // Ordered: a head scheduled for tomorrow holds the queue, and says so.
    let ordered = endpoint(&mut c, &rx.url("/ordered"), ", ordered => true");
    c.batch_execute(&format!(
        "SELECT outbox.enqueue('x.later', '{{}}', endpoint_id => '{ordered}', deliver_at => now() + interval '1 day');
         SELECT outbox.enqueue('x.now', '{{}}', endpoint_id => '{ordered}');"
    ))
    .unwrap();
    wait_read(&mut c);
    let held = c
        .query_one(
            &format!(
                "SELECT held_reason, held_until > now() + interval '23 hours'
                   FROM outbox.endpoint_health WHERE endpoint_id = '{ordered}'"
            ),
            &[],
        )
        .unwrap();
    let reason: Option<String> = held.get(0);
    assert!(
        reason.as_deref().unwrap_or("").contains("ordered"),
        "{reason:?}"
    );
    assert_eq!(held.get::<_, Option<bool>>(1), Some(true));
    // A free endpoint is held by nothing.
    assert_eq!(
        scalar_i64(
            &mut c,
            &format!("SELECT count(*) FROM outbox.endpoint_health WHERE endpoint_id = '{ep}' AND held_reason IS NULL")
        ),
        1
    );
}

/// Caller event ids are scoped per tenant: the same id in two tenants is two events, each
/// delivered with its own type and payload to its own tenant's endpoints; a known id with
/// a different type or payload is refused; and a named endpoint must be the tenant's own.
#[test]
fn event_ids_are_scoped_per_tenant() {
    let cluster = Cluster::start(FAST);
    let rx = Receiver::start().unwrap();
    let mut c = cluster.client();
    let acme = endpoint(&mut c, &rx.url("/acme"), ", tenant_id => 'acme'");
    endpoint(&mut c, &rx.url("/globex"), ", tenant_id => 'globex'");
    c.batch_execute(
        "SELECT outbox.enqueue('order.created', '{\"for\": \"acme\"}', event_id => 'order-42', tenant_id => 'acme');
         SELECT outbox.enqueue('invoice.paid', '{\"for\": \"globex\"}', event_id => 'order-42', tenant_id => 'globex');",
    )
    .unwrap();
    assert!(rx.wait_for(2, Duration::from_secs(10)), "{}", cluster.log());
    for (path, ty, tenant) in [
        ("/acme", "order.created", "acme"),
        ("/globex", "invoice.paid", "globex"),
    ] {
        let got = rx.received_on(path);
        assert_eq!(got.len(), 1, "{path}");
        let body = got[0].json().unwrap();
        assert_eq!(got[0].webhook_id, "order-42");
        assert_eq!(body["type"], ty, "{path}: {body}");
        assert_eq!(body["data"]["for"], tenant, "{path}: {body}");
    }
    assert!(wait_settled(&cluster, Duration::from_secs(10)));

    // The same event again is the same event: nothing new is sent.
    let again = c
        .query(
            "SELECT * FROM outbox.enqueue('order.created', '{\"for\": \"acme\"}', event_id => 'order-42', tenant_id => 'acme')",
            &[],
        )
        .unwrap();
    assert_eq!(again.len(), 1);
    // A different one under a known id is refused, not mixed up.
    for other in [
        "'order.created', '{\"for\": \"someone else\"}'",
        "'order.deleted', '{\"for\": \"acme\"}'",
    ] {
        let (state, message) = error_of(
            &mut c,
            &format!("SELECT outbox.enqueue({other}, event_id => 'order-42', tenant_id => 'acme')"),
        );
        assert_eq!(state, "23505", "{message}");
        assert!(message.contains("order-42"), "{message}");
    }
    // Another tenant's endpoint (or none's) cannot be named.
    for tenant in ["'globex'", "NULL"] {
        let (state, message) = error_of(
            &mut c,
            &format!(
                "SELECT outbox.enqueue('x.y', '{{}}', endpoint_id => '{acme}', tenant_id => {tenant})"
            ),
        );
        assert_eq!(state, "P0002", "{message}");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.count(), 2);
}

/// A hostile receiver (or sender) can produce error texts far beyond what NOTIFY carries;
/// before, the pg_notify of a dying delivery aborted the batch that recorded it, forever.
#[test]
fn long_error_texts_are_bounded_and_never_roll_back_a_batch() {
    // No worker: this test is the sender, through the same statements the worker uses.
    let cluster = Cluster::start(&["outbox.circuit_threshold = 1"]);
    let mut c = cluster.client();
    let ep = scalar_text(
        &mut c,
        "SELECT outbox.create_endpoint('https://example.com/hook')::text",
    );
    c.batch_execute(
        "SELECT outbox.enqueue('x.y', jsonb_build_object('n', g)) FROM generate_series(1, 3) g",
    )
    .unwrap();
    let mut listener = cluster.client();
    listener
        .batch_execute("LISTEN outbox_operator; LISTEN outbox_feed")
        .unwrap();
    let acked = scalar_i64(
        &mut c,
        "SELECT count(*) FROM outbox.ack_batch(
             (SELECT array_agg(delivery_id) FROM outbox.claim(3, 'external')),
             ARRAY[1, 1, 1], ARRAY['dead', 'dead', 'dead']::outbox.attempt_outcome[],
             ARRAY[NULL, NULL, NULL]::integer[],
             ARRAY[repeat('é', 50000), repeat('x', 100000), repeat('y', 9000)],
             response_bodies => ARRAY[repeat('z', 1000000), NULL, NULL],
             worker => 'external')",
    );
    assert_eq!(acked, 3, "the batch was recorded");
    let longest = c
        .query_one(
            "SELECT max(octet_length(error))::int4, max(octet_length(response_body))::int4 FROM outbox.attempts",
            &[],
        )
        .unwrap();
    let (error, body): (i32, i32) = (longest.get(0), longest.get(1));
    assert!(error <= 4000, "error texts are bounded: {error} bytes");
    assert!(body <= 65536, "response bodies are bounded: {body} bytes");
    assert!(
        scalar_i64(
            &mut c,
            &format!("SELECT octet_length(last_error)::int8 FROM outbox.endpoint_state WHERE endpoint_id = '{ep}'")
        ) <= 4000
    );
    let got = collect_notifications(&mut listener, Duration::from_secs(5), |got| {
        got.iter()
            .filter(|(_, v)| v["kind"] == "outbox.delivery.dead")
            .count()
            >= 3
            && got
                .iter()
                .any(|(_, v)| v["kind"] == "outbox.endpoint.circuit_opened")
    });
    assert!(
        got.iter()
            .any(|(_, v)| v["kind"] == "outbox.endpoint.circuit_opened"),
        "{got:?}"
    );
    for (_, v) in &got {
        assert!(
            v.get("error").is_none() && v.get("last_error").is_none(),
            "{v}"
        );
    }
}

/// An operator who runs `BEGIN; SELECT outbox.enable_endpoint(x);` and walks away holds
/// x's rows; the worker used to wait for them at its next ack, and nobody got anything.
#[test]
fn an_idle_operator_transaction_holds_back_only_its_endpoint() {
    let cluster = Cluster::start(FAST);
    let rx = Receiver::start().unwrap();
    rx.set_default("/slow", Reply::Delay(Duration::from_millis(1500), 200));
    let mut c = cluster.client();
    let slow = endpoint(&mut c, &rx.url("/slow"), ", event_types => '{x.slow}'");
    endpoint(&mut c, &rx.url("/fast"), ", event_types => '{x.fast}'");
    c.batch_execute(&format!(
        "SELECT outbox.enqueue('x.slow', '{{}}', endpoint_id => '{slow}')"
    ))
    .unwrap();
    assert!(wait_until(Duration::from_secs(10), || scalar_i64(
        &mut c,
        "SELECT count(*) FROM outbox.delivery WHERE status = 'in_flight'"
    ) == 1));
    let mut operator = cluster.client();
    operator
        .batch_execute(&format!("BEGIN; SELECT outbox.enable_endpoint('{slow}');"))
        .unwrap();
    // The slow request finishes while the operator's transaction is open, and its outcome
    // needs the rows the operator holds; only then does other work arrive.
    std::thread::sleep(Duration::from_millis(2500));
    c.batch_execute(
        "SELECT outbox.enqueue('x.fast', jsonb_build_object('n', g)) FROM generate_series(1, 30) g",
    )
    .unwrap();
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || rx.received_on("/fast").len()
            == 30),
        "the other endpoint got {} of 30 while the operator's transaction was open:\n{}",
        rx.received_on("/fast").len(),
        cluster.log()
    );
    eprintln!(
        "30 deliveries to the free endpoint in {:?}",
        started.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    operator.batch_execute("COMMIT").unwrap();
    assert!(
        wait_settled(&cluster, Duration::from_secs(15)),
        "{}",
        cluster.log()
    );
    assert_eq!(
        rx.received_on("/slow").len(),
        1,
        "the held ack was recorded late, not sent again:\n{}",
        cluster.log()
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
        ),
        31
    );
}

/// LISTEN needs no privilege, so channels carry ids only; operators see header names but
/// not their values; deleting an endpoint and the end of a rotation overlap clear secrets.
#[test]
fn channels_views_and_deleted_endpoints_give_away_no_secret() {
    let cluster = Cluster::start(&settings(&[
        "outbox.live_feed = on",
        "outbox.circuit_threshold = 1",
        "outbox.retention_delivered = '10s'",
    ]));
    let rx = Receiver::start().unwrap();
    rx.set_default("/reject", Reply::Body(400, b"token s3cret-body".to_vec()));
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE ROLE nobody LOGIN; CREATE ROLE oncall LOGIN; CREATE ROLE platform LOGIN;
         SELECT outbox.grant_operator('oncall'); SELECT outbox.grant_admin('platform');",
    )
    .unwrap();
    let ep = endpoint(
        &mut c,
        &rx.url("/reject"),
        ", headers => '{\"Authorization\": \"Bearer s3cret-token\"}'",
    );
    let mut nobody = cluster.client_as("nobody");
    nobody
        .batch_execute(&format!(
            "LISTEN outbox_operator; LISTEN outbox_feed; LISTEN \"outbox_feed_{ep}\""
        ))
        .unwrap();
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || scalar_i64(
        &mut c,
        "SELECT count(*) FROM outbox.delivery WHERE status = 'dead'"
    ) == 1));
    c.batch_execute(&format!(
        "SELECT outbox.disable_endpoint('{ep}', 'because s3cret-reason')"
    ))
    .unwrap();
    let got = collect_notifications(&mut nobody, Duration::from_secs(10), |got| {
        got.iter()
            .any(|(_, v)| v["kind"] == "outbox.endpoint.disabled")
            && got.iter().any(|(_, v)| v["kind"] == "outbox.delivery.dead")
    });
    assert!(
        got.iter().any(|(_, v)| v["kind"] == "outbox.delivery.dead"),
        "{got:?}"
    );
    for (channel, v) in &got {
        let text = v.to_string();
        for secret in ["s3cret", "127.0.0.1", "HTTP 400", "reason"] {
            assert!(!text.contains(secret), "{channel}: {text}");
        }
    }

    // Operators see which headers are set, not their values; administrators see both.
    let mut oncall = cluster.client_as("oncall");
    let seen: serde_json::Value = serde_json::from_str(&scalar_text(
        &mut oncall,
        &format!("SELECT headers::text FROM outbox.endpoints WHERE id = '{ep}'"),
    ))
    .unwrap();
    assert!(seen.get("Authorization").is_some(), "{seen}");
    assert!(!seen.to_string().contains("s3cret"), "{seen}");
    let mut platform = cluster.client_as("platform");
    let full: serde_json::Value = serde_json::from_str(&scalar_text(
        &mut platform,
        &format!("SELECT headers::text FROM outbox.endpoints WHERE id = '{ep}'"),
    ))
    .unwrap();
    assert_eq!(full["Authorization"], "Bearer s3cret-token");

    // A rotation's old secret goes once its overlap is over; a deleted endpoint keeps none.
    let rotated = endpoint(&mut c, &rx.url("/rotated"), "");
    c.batch_execute(&format!(
        "SELECT outbox.rotate_secret('{rotated}', overlap => '1 second');
         SELECT outbox.delete_endpoint('{ep}');"
    ))
    .unwrap();
    let left = c
        .query_one(
            &format!(
                "SELECT secret IS NULL, headers = '{{}}', previous_secret IS NULL
                   FROM outbox.endpoint WHERE id = '{ep}'"
            ),
            &[],
        )
        .unwrap();
    assert!(
        left.get::<_, bool>(0) && left.get::<_, bool>(1) && left.get::<_, bool>(2),
        "a deleted endpoint keeps its secrets"
    );
    assert!(
        wait_until(Duration::from_secs(15), || {
            scalar_i64(
            &mut c,
            &format!("SELECT count(*) FROM outbox.endpoint WHERE id = '{rotated}' AND previous_secret IS NULL")
        ) == 1
        }),
        "the expired previous secret was kept:\n{}",
        cluster.log()
    );
}

/// A worker killed while its endpoint had all of its `max_in_flight` requests out: the
/// restarted worker takes its predecessor's leases back at once instead of waiting a whole
/// lease (60 s here) with the endpoint counted as full.
#[test]
fn a_restarted_worker_takes_back_its_predecessors_leases_at_once() {
    let cluster = Cluster::start(&settings(&["outbox.lease = 60"]));
    let rx = Receiver::start().unwrap();
    rx.set_default("/slow", Reply::Delay(Duration::from_millis(1500), 200));
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/slow"), ", max_in_flight => 4");
    c.batch_execute(
        "SELECT outbox.enqueue('x.y', jsonb_build_object('n', g), event_id => 'e-' || g) FROM generate_series(1, 12) g",
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(10), || scalar_i64(
        &mut c,
        "SELECT count(*) FROM outbox.delivery WHERE status = 'in_flight'"
    ) == 4));
    let pid = worker_pid(&cluster);
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let killed = Instant::now();
    let distinct = || {
        let mut ids: Vec<String> = rx.received().into_iter().map(|r| r.webhook_id).collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    assert!(
        wait_until(Duration::from_secs(40), || distinct() == 12),
        "{} of 12 delivered {:?} after the kill:\n{}",
        distinct(),
        killed.elapsed(),
        cluster.log()
    );
    let took = killed.elapsed();
    eprintln!("all 12 delivered {took:?} after the kill");
    assert!(
        took < Duration::from_secs(25),
        "delivery resumed only after {took:?}"
    );
}

/// `retry_dead` used to start a delivery's attempts at 1 again, so a late ack of the old
/// attempt 1 could be taken for the new one. The fencing token only grows; the retry
/// schedule starts afresh all the same.
#[test]
fn retry_dead_keeps_the_fencing_token_increasing() {
    let cluster = Cluster::start(FAST);
    let rx = Receiver::start().unwrap();
    rx.script(
        "/hook",
        vec![
            Reply::Status(400),
            Reply::Status(503),
            Reply::Status(503),
            Reply::Status(503),
        ],
    );
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/hook"), "");
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}', event_id => 'again')")
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || scalar_i64(
        &mut c,
        "SELECT count(*) FROM outbox.delivery WHERE status = 'dead'"
    ) == 1));
    let id = scalar_text(&mut c, "SELECT id::text FROM outbox.delivery");
    c.batch_execute(&format!("SELECT outbox.retry_dead('{id}')"))
        .unwrap();
    // The fresh run gets the whole schedule (three retries) before it succeeds.
    assert!(
        wait_until(Duration::from_secs(15), || scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
        ) == 1),
        "{}",
        cluster.log()
    );
    let attempts: Vec<i32> = c
        .query(
            "SELECT attempt FROM outbox.attempts WHERE outcome IN ('delivered', 'retry', 'dead') ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(attempts, vec![1, 2, 3, 4, 5]);
    let (state, message) = error_of(
        &mut c,
        &format!("SELECT outbox.ack('{id}', 1, 'delivered', 200)"),
    );
    assert_eq!(state, "55000", "{message}");
}

/// Name lookups used to run getaddrinfo on four blocking threads without a timeout: a few
/// endpoints whose DNS never answers held them all, and requests to healthy endpoints
/// timed out behind them. Now they are asynchronous, bounded by outbox.dns_timeout.
#[test]
fn a_name_server_that_never_answers_holds_up_only_its_own_endpoints() {
    let dns = FakeDns::start(
        &[("good.test", std::net::Ipv4Addr::LOCALHOST)],
        &["black-hole.test"],
    )
    .unwrap();
    let dns_servers = format!("outbox.dns_servers = '{}'", dns.addr());
    let mut conf: Vec<&str> = settings(&["outbox.dns_timeout = '3s'"]);
    conf.push(&dns_servers);
    let cluster = Cluster::start(&conf);
    let rx = Receiver::start().unwrap();
    let mut c = cluster.client();
    for i in 0..8 {
        endpoint(
            &mut c,
            &format!("http://stuck-{i}.black-hole.test:{}/stuck", rx.port()),
            ", event_types => '{x.stuck}'",
        );
    }
    endpoint(
        &mut c,
        &format!("http://good.test:{}/good", rx.port()),
        ", event_types => '{x.good}'",
    );
    c.batch_execute(
        "SELECT outbox.enqueue('x.stuck', '{}') FROM generate_series(1, 4);
         SELECT outbox.enqueue('x.good', jsonb_build_object('n', g)) FROM generate_series(1, 20) g;",
    )
    .unwrap();
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || rx.received_on("/good").len()
            == 20),
        "{} of 20 reached the endpoint whose name resolves:\n{}",
        rx.received_on("/good").len(),
        cluster.log()
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "the healthy endpoint waited {took:?}, as long as the lookups that never end"
    );
    // The stuck ones fail their attempt after the DNS timeout, and are retried.
    assert!(
        wait_until(Duration::from_secs(15), || {
            scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.attempts WHERE outcome = 'retry' AND error LIKE '%DNS lookup of stuck-%timed out%'"
        ) >= 32
        }),
        "{:?}",
        c.query("SELECT DISTINCT error FROM outbox.attempts", &[])
            .unwrap()
            .iter()
            .map(|r| r.get::<_, Option<String>>(0))
            .collect::<Vec<_>>()
    );
    assert!(dns.queries("good.test") >= 1);
}
