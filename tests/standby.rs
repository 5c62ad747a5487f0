//! Replication: the queue is in WAL, so a streaming standby has it; no worker runs (and
//! nothing is sent) while the server is in recovery, and one starts delivering once the
//! standby is promoted.

mod common;

use std::time::Duration;

use common::worker::{endpoint, scalar_i64, wait_until, FAST};
use common::Cluster;
use outbox_receiver::Receiver;

#[test]
fn a_standby_has_the_queue_sends_nothing_and_delivers_after_promotion() {
    // The primary has no worker (the library is not preloaded there), so what it queues
    // stays pending: only the standby could send it.
    let primary = Cluster::start_empty(&[]);
    let rx = Receiver::start().unwrap();
    let mut p = primary.client();
    p.batch_execute("CREATE EXTENSION webhook_outbox").unwrap();
    endpoint(&mut p, &rx.url("/replica"), "");
    p.batch_execute("SELECT outbox.enqueue('replicated.event', jsonb_build_object('n', g)) FROM generate_series(1, 20) g")
        .unwrap();

    let standby = Cluster::standby_of(&primary, FAST);
    let mut s = standby.client();
    assert_eq!(
        scalar_i64(&mut s, "SELECT pg_is_in_recovery()::int::bigint"),
        1
    );
    // More work arrives through streaming replication.
    p.batch_execute("SELECT outbox.enqueue('replicated.event', jsonb_build_object('n', g)) FROM generate_series(21, 25) g")
        .unwrap();
    assert!(wait_until(Duration::from_secs(30), || scalar_i64(
        &mut s,
        "SELECT count(*) FROM outbox.delivery WHERE status = 'pending'"
    ) == 25));
    // No worker runs on the standby, and nothing is sent.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        scalar_i64(
            &mut s,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'webhook_outbox worker'"
        ),
        0
    );
    assert_eq!(rx.count(), 0, "a standby sent something");

    // The primary is gone; the standby takes over and delivers everything.
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
        "SELECT count(*) FROM outbox.delivery WHERE status = 'delivered'"
    ) == 25));
    assert_eq!(
        scalar_i64(
            &mut s,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'webhook_outbox worker'"
        ),
        1
    );
}
