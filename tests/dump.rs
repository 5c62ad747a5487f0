//! pg_dump and pg_restore: the extension's tables are user data. A dump of a database with
//! endpoints, a queue in every state and a history, restored into a new cluster, gives back
//! all of it, and the restored cluster's worker delivers what was queued.

mod common;

use std::time::Duration;

use common::worker::{endpoint, scalar_i64, scalar_text, wait_read, wait_until, FAST, SECRET};
use common::{lines, pg_command, Cluster};
use outbox_receiver::{Receiver, Reply};

fn settings() -> Vec<&'static str> {
    // Retries far apart, so that a retrying delivery is still waiting when it is dumped.
    FAST.iter()
        .copied()
        .chain(["outbox.retry_schedule = '1h'"])
        .collect()
}

fn port(cluster: &Cluster) -> String {
    let info = cluster.conninfo();
    info.split_whitespace()
        .find_map(|kv| kv.strip_prefix("port="))
        .unwrap()
        .to_string()
}

fn run(mut cmd: std::process::Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What must come back, one line per row, in a stable order.
fn snapshot(c: &mut postgres::Client) -> Vec<String> {
    lines(
        c,
        "SELECT 'endpoint ' || concat_ws('|', id, url, enabled, event_types, outbox.endpoint_secret(id))
           FROM outbox.endpoints
         UNION ALL
         SELECT 'delivery ' || concat_ws('|', id, event_id, endpoint_id, status, attempts, due_at, finished_at, last_error)
           FROM outbox.delivery
         UNION ALL
         SELECT 'event ' || concat_ws('|', id, event_type, payload, tenant_id) FROM outbox.event
         UNION ALL
         SELECT 'event id ' || concat_ws('|', id, tenant_key, event_type, payload_hash) FROM outbox.event_key_0
         UNION ALL
         SELECT 'event id ' || concat_ws('|', id, tenant_key, event_type, payload_hash) FROM outbox.event_key_1
         UNION ALL
         SELECT 'attempt ' || concat_ws('|', id, delivery_id, attempt, outcome, status_code, error) FROM outbox.attempt
         UNION ALL
         SELECT 'history ' || concat_ws('|', part, delivery_id, event_id, endpoint_id, payload, attempt_id, status_code, finished_at)
           FROM outbox.history
         UNION ALL
         SELECT 'stats ' || concat_ws('|', hour, endpoint_id, outcome, deliveries, attempts) FROM outbox.stats_hourly
         ORDER BY 1",
    )
}

#[test]
fn a_dump_restored_elsewhere_keeps_endpoints_queue_and_history_and_delivers() {
    let rx = Receiver::start().unwrap();
    rx.set_secret(Some(SECRET.into()));
    rx.script("/hook", vec![Reply::Status(400), Reply::Status(503)]);
    let old = Cluster::start(&settings());
    let mut c = old.client();
    let hook = endpoint(&mut c, &rx.url("/hook"), ", event_types => '{a.*}'");
    let held = endpoint(
        &mut c,
        &rx.url("/held"),
        ", event_types => '{b.*}', enabled => false, tenant_id => 'acme'",
    );
    // One dead, one retrying, one delivered, in that order (the receiver's script).
    for (event, status) in [("a.1", "dead"), ("a.2", "pending"), ("a.3", "delivered")] {
        c.batch_execute(&format!(
            "SELECT outbox.enqueue('{event}', '{{\"n\": 1}}', event_id => replace('{event}', '.', '-'))"
        ))
        .unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || {
                scalar_i64(
                &mut c,
                &format!("SELECT count(*) FROM outbox.deliveries WHERE event_id = replace('{event}', '.', '-') AND status = '{status}' AND attempts = 1")
            ) == 1
            }),
            "{event} did not become {status}:\n{}",
            old.log()
        );
    }
    // And five waiting for an endpoint that is disabled.
    c.batch_execute(&format!(
        "SELECT outbox.enqueue('b.queued', jsonb_build_object('n', g), endpoint_id => '{held}', tenant_id => 'acme')
           FROM generate_series(1, 5) g"
    ))
    .unwrap();
    // Events the worker has not read yet are not in a dump (docs/operations.md).
    wait_read(&mut c);
    let before = snapshot(&mut c);
    // a.3, delivered at its first attempt, is a row of outbox.history.
    assert!(
        before.iter().any(|l| l.starts_with("history ")),
        "{before:?}"
    );
    let attempts_before = scalar_i64(&mut c, "SELECT max(id) FROM outbox.attempts");

    let file = old.data_dir().parent().unwrap().join("outbox.dump");
    let mut dump = pg_command("pg_dump");
    dump.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port(&old),
        "-U",
        "postgres",
        "-Fc",
        "-f",
    ])
    .arg(&file)
    .arg("postgres");
    run(dump);

    let new = Cluster::start_empty(&settings());
    let mut restore = pg_command("pg_restore");
    restore
        .args(["-h", "127.0.0.1", "-p", &port(&new), "-U", "postgres"])
        .args(["--exit-on-error", "-d", "postgres"])
        .arg(&file);
    run(restore);
    drop(old);

    let mut n = new.client();
    assert_eq!(
        snapshot(&mut n),
        before,
        "the restore differs from the dump"
    );
    // Every restored endpoint has its (fresh) state again.
    assert_eq!(
        scalar_i64(
            &mut n,
            "SELECT count(*) FROM outbox.endpoint_health WHERE circuit = 'closed'"
        ),
        2
    );

    // Delivery resumes: the queue of the disabled endpoint once it is enabled, the dead
    // delivery once retried (its attempt number goes on), signed with the restored secret.
    n.batch_execute(&format!(
        "SELECT outbox.enable_endpoint('{held}');
         SELECT outbox.retry_dead(endpoint_id => '{hook}');"
    ))
    .unwrap();
    assert!(
        rx.wait_for(3 + 5 + 1, Duration::from_secs(20)),
        "{} requests; {:?}\n{}",
        rx.count(),
        n.query("SELECT concat_ws(' ', event_id, status, attempts, due_at, lease_owner, last_error, endpoint_id) FROM outbox.delivery", &[]).unwrap().iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(),
        new.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || scalar_i64(
            &mut n,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
        ) == 7),
        "{}",
        new.log()
    );
    let held_got = rx.received_on("/held");
    assert_eq!(held_got.len(), 5);
    assert!(held_got.iter().all(|r| r.verified == Some(true)));
    assert_eq!(
        scalar_text(
            &mut n,
            "SELECT attempts || ' ' || status FROM outbox.delivery WHERE event_id = 'a-1'"
        ),
        "2 delivered"
    );
    // New history continues the restored one's numbering.
    assert!(
        scalar_i64(
            &mut n,
            &format!("SELECT count(*) FROM outbox.attempts WHERE id > {attempts_before}")
        ) >= 7
    );
    // The retrying delivery still waits for its time.
    assert_eq!(
        scalar_text(
            &mut n,
            "SELECT status::text FROM outbox.delivery WHERE event_id = 'a-2'"
        ),
        "pending"
    );
}
