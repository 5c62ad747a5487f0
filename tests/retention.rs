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
