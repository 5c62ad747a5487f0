//! Replication: the queue is in WAL, so a streaming standby has it; nothing is sent from the
//! standby while it is in recovery (whether a worker process exists there or not), nothing
//! fills its log, and once it is promoted its worker delivers what is pending.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::worker::{endpoint, scalar_i64, wait_until, FAST};
use common::Cluster;
use outbox_receiver::Receiver;

fn worker_pids(c: &mut postgres::Client) -> Vec<i32> {
    c.query(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'webhook_outbox worker' ORDER BY pid",
        &[],
    )
    .unwrap()
    .into_iter()
    .map(|r| r.get(0))
    .collect()
}

/// Server log lines that would show a worker misbehaving on a standby: its own messages,
/// errors of any kind, and background workers exiting (a restart loop).
fn suspicious(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.contains("webhook_outbox")
                || l.contains("ERROR")
                || l.contains("PANIC")
                || l.contains("exited with exit code")
                || l.contains("terminated by signal")
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn a_standby_has_the_queue_sends_nothing_and_delivers_after_promotion() {
    // The primary has no worker (the library is not preloaded there), so what it queues
    // stays pending: only the standby could send it, and any request is the standby's.
    let primary = Cluster::start_empty(&[]);
    let rx = Receiver::start().unwrap();
    let mut p = primary.client();
    p.batch_execute("CREATE EXTENSION webhook_outbox").unwrap();
    endpoint(&mut p, &rx.url("/replica"), "");
    p.batch_execute("SELECT outbox.enqueue('replicated.event', jsonb_build_object('n', g), event_id => 'r-' || g) FROM generate_series(1, 20) g")
        .unwrap();

    // The standby preloads the library, with the worker's messages (LOG level) shown.
    let settings: Vec<&str> = FAST
        .iter()
        .copied()
        .chain(["log_min_messages = log"])
        .collect();
    let standby = Cluster::standby_of(&primary, &settings);
    let mut s = standby.client();
    assert_eq!(
        scalar_i64(&mut s, "SELECT pg_is_in_recovery()::int::bigint"),
        1
    );
    assert_eq!(
        scalar_i64(
            &mut s,
            "SELECT count(*) FROM pg_settings WHERE name = 'shared_preload_libraries' AND setting LIKE '%webhook_outbox%'"
        ),
        1
    );
    // More work arrives through streaming replication.
    p.batch_execute("SELECT outbox.enqueue('replicated.event', jsonb_build_object('n', g), event_id => 'r-' || g) FROM generate_series(21, 25) g")
        .unwrap();
    // Nothing read them (the primary has no worker): they wait in the log.
    assert!(wait_until(Duration::from_secs(30), || scalar_i64(
        &mut s,
        "SELECT unread FROM outbox.log_status"
    ) == 25));
    // The ids their callers gave are known there too.
    assert_eq!(
        scalar_i64(
            &mut s,
            "SELECT (SELECT count(*) FROM outbox.event_key_0) + (SELECT count(*) FROM outbox.event_key_1)"
        ),
        25
    );
    assert_eq!(
        scalar_i64(&mut s, "SELECT count(*) FROM outbox.endpoint"),
        1
    );
    assert_eq!(scalar_i64(&mut s, "SELECT count(*) FROM outbox.attempt"), 0);

    // In recovery the standby sends nothing. A worker process may exist there (idle until
    // promotion) or not at all, but never more than one, and never one that keeps
    // restarting; the log stays quiet.
    let log_at_start = standby.log().len();
    let pids_before = worker_pids(&mut s);
    std::thread::sleep(Duration::from_secs(3));
    let pids_after = worker_pids(&mut s);
    assert!(
        pids_after.len() <= 1,
        "workers on the standby: {pids_after:?}"
    );
    assert_eq!(
        pids_before, pids_after,
        "the standby's worker came and went (a restart loop?)"
    );
    assert_eq!(rx.count(), 0, "a standby sent something");
    let noise = suspicious(&standby.log()[log_at_start..]);
    assert!(
        noise.len() <= 1,
        "the standby's log filled up in recovery:\n{}",
        noise.join("\n")
    );
    assert!(
        noise
            .iter()
            .all(|l| !l.contains("ERROR") && !l.contains("exit")),
        "{noise:?}"
    );
    assert_eq!(
        scalar_i64(
            &mut s,
            "SELECT count(*) FROM outbox.delivery WHERE status <> 'pending'"
        ),
        0,
        "the standby's queue is untouched"
    );

    // The primary is gone; the standby takes over and delivers everything, once.
    drop(p);
    drop(primary);
    standby.promote();
    assert!(
        rx.wait_for(25, Duration::from_secs(30)),
        "{}",
        standby.log()
    );
    let mut s = standby.client();
    assert!(wait_until(Duration::from_secs(20), || scalar_i64(
        &mut s,
        "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
    ) == 25));
    assert_eq!(worker_pids(&mut s).len(), 1);
    // The promoted server is a primary like any other: a new commit is delivered too.
    s.batch_execute("SELECT outbox.enqueue('after.promotion', '{}', event_id => 'r-26')")
        .unwrap();
    assert!(
        rx.wait_for(26, Duration::from_secs(15)),
        "{}",
        standby.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    let ids: Vec<String> = rx.received().into_iter().map(|r| r.webhook_id).collect();
    let expected: HashSet<String> = (1..=26).map(|g| format!("r-{g}")).collect();
    assert_eq!(ids.len(), 26, "each event once: {ids:?}");
    assert_eq!(ids.into_iter().collect::<HashSet<_>>(), expected);
}
