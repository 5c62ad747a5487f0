//! Retention by the worker: finished deliveries past their age are deleted in small batches
//! (or truncated with their partition of the history) while delivery goes on, and the
//! tables stop growing in a steady state.

mod common;

use std::time::Duration;

use common::worker::{endpoint, scalar_i64, wait_settled, wait_until, FAST};
use common::Cluster;
use outbox_receiver::Receiver;

#[test]
fn the_worker_keeps_the_tables_flat() {
    let mut settings = FAST.to_vec();
    settings.extend([
        "outbox.retention_delivered = 1",
        "outbox.retention_dead = 1",
    ]);
    let cluster = Cluster::start(&settings);
    let rx = Receiver::start().unwrap();
    rx.keep_received(false);
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/r"), "");

    let size = |c: &mut postgres::Client| {
        scalar_i64(
            c,
            "SELECT pg_total_relation_size('outbox.delivery') + pg_total_relation_size('outbox.attempt')
                  + pg_total_relation_size('outbox.event') + pg_total_relation_size('outbox.history_0')
                  + pg_total_relation_size('outbox.history_1') + pg_total_relation_size('outbox.history_2')",
        )
    };
    let mut sizes = Vec::new();
    for round in 0..6 {
        c.batch_execute(&format!(
            "SELECT outbox.enqueue('r.{round}', jsonb_build_object('n', g)) FROM generate_series(1, 2000) g"
        ))
        .unwrap();
        assert!(
            wait_settled(&cluster, Duration::from_secs(60)),
            "{}",
            cluster.log()
        );
        // Retention runs each second when idle (a tenth of the shortest age, at least a
        // second), at once while it finds full batches; wait for this round's rows to pass
        // their one-second age and go: deleted from outbox.delivery, truncated with their
        // partition of outbox.history.
        assert!(
            wait_until(Duration::from_secs(90), || scalar_i64(
                &mut c,
                "SELECT count(*) FROM outbox.deliveries"
            ) == 0),
            "round {round}: {} deliveries left",
            scalar_i64(&mut c, "SELECT count(*) FROM outbox.deliveries")
        );
        c.batch_execute("VACUUM outbox.delivery, outbox.attempt, outbox.event")
            .unwrap();
        sizes.push(size(&mut c));
    }
    eprintln!("table + index bytes after each round: {sizes:?}");
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox.event"), 0);
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox.attempt"), 0);
    // The successes went to outbox.history, and left it by TRUNCATE, never DELETE.
    let history = |c: &mut postgres::Client, column: &str| {
        scalar_i64(
            c,
            &format!(
                "SELECT coalesce(sum({column}), 0)::int8 FROM pg_stat_user_tables
                  WHERE relname IN ('history_0', 'history_1', 'history_2') AND schemaname = 'outbox'"
            ),
        )
    };
    assert!(
        wait_until(Duration::from_secs(10), || history(&mut c, "n_tup_ins")
            >= 6000),
        "{} history rows inserted",
        history(&mut c, "n_tup_ins")
    );
    assert_eq!(history(&mut c, "n_tup_del"), 0);
    assert!(
        sizes[5] <= sizes[1] * 5 / 4,
        "tables kept growing: {sizes:?}"
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT total FROM outbox.delivery_stats('1 hour')"),
        12000,
        "statistics remain"
    );
}

/// Callers' ids are forgotten by their tables taking turns, never by DELETE: with
/// retention at two seconds an id is known for two seconds at least, and gone after a few.
#[test]
fn the_worker_gives_the_tables_of_event_ids_their_turns() {
    let mut settings = FAST.to_vec();
    settings.push("outbox.retention_delivered = 2");
    let cluster = Cluster::start(&settings);
    let rx = Receiver::start().unwrap();
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/r"), "");
    let enqueue = |c: &mut postgres::Client, payload: &str| {
        c.batch_execute(&format!(
            "SELECT outbox.enqueue('r.id', '{payload}', event_id => 'order-1')"
        ))
        .unwrap()
    };
    let turns = |c: &mut postgres::Client| {
        scalar_i64(c, "SELECT generation FROM outbox.event_key_rotation")
    };
    let first_turn = turns(&mut c);
    enqueue(&mut c, r#"{"n": 1}"#);
    // Known at once: enqueued again, it is not sent again.
    enqueue(&mut c, r#"{"n": 1}"#);
    assert!(rx.wait_for(1, Duration::from_secs(20)), "{}", cluster.log());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.count(), 1);
    // Two turns later the table that held it was emptied: the id names a new event.
    assert!(
        wait_until(Duration::from_secs(30), || turns(&mut c) >= first_turn + 2),
        "the tables took {} turns: {}",
        turns(&mut c) - first_turn,
        cluster.log()
    );
    enqueue(&mut c, r#"{"n": 2}"#);
    assert!(rx.wait_for(2, Duration::from_secs(20)), "{}", cluster.log());
    let ids: Vec<String> = rx.received().into_iter().map(|r| r.webhook_id).collect();
    assert_eq!(ids, ["order-1", "order-1"]);
    let deleted = scalar_i64(
        &mut c,
        "SELECT coalesce(sum(n_tup_del), 0)::int8 FROM pg_stat_user_tables
          WHERE schemaname = 'outbox' AND relname IN ('event_key_0', 'event_key_1')",
    );
    assert_eq!(deleted, 0, "ids were deleted, not truncated");
}
