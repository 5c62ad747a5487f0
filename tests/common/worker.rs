//! Helpers for tests that run the background worker against a real receiver.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;

use super::Cluster;

/// postgresql.conf lines for a cluster whose worker retries fast.
pub const FAST: &[&str] = &[
    "shared_preload_libraries = 'webhook_outbox'",
    "outbox.retry_schedule = '300ms, 300ms, 300ms'",
    "outbox.poll_interval = '200ms'",
    "outbox.lease = 10",
];

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn scalar_i64(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

pub fn scalar_text(c: &mut postgres::Client, sql: &str) -> String {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// Creates an endpoint at `url` with the test secret and returns its id.
pub fn endpoint(c: &mut postgres::Client, url: &str, extra: &str) -> String {
    scalar_text(
        c,
        &format!("SELECT outbox.create_endpoint('{url}', secret => '{SECRET}'{extra})::text"),
    )
}

/// Waits until no delivery is pending or in flight.
pub fn wait_settled(cluster: &Cluster, timeout: Duration) -> bool {
    let mut c = cluster.client();
    wait_until(timeout, || {
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.delivery WHERE status IN ('pending', 'in_flight')",
        ) == 0
    })
}

/// Waits until nothing is pending or in flight, connecting afresh each time so that it
/// carries on through crashes and restarts of the server.
pub fn wait_settled_through_restarts(cluster: &Cluster, timeout: Duration) -> bool {
    wait_until(timeout, || {
        let Ok(mut c) = postgres::Client::connect(&cluster.conninfo(), postgres::NoTls) else {
            return false;
        };
        c.query_one(
            "SELECT count(*) FROM outbox.delivery WHERE status IN ('pending', 'in_flight')",
            &[],
        )
        .map(|r| r.get::<_, i64>(0) == 0)
        .unwrap_or(false)
    })
}

/// The worker's process id, once it runs.
pub fn worker_pid(cluster: &Cluster) -> i32 {
    let mut c = cluster.client();
    let mut pid = 0;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let rows = c
                .query(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'webhook_outbox worker'",
                    &[],
                )
                .unwrap();
            pid = rows.first().map(|r| r.get(0)).unwrap_or(0);
            pid != 0
        }),
        "the worker did not start:\n{}",
        cluster.log()
    );
    pid
}

/// Collects notifications (channel, JSON payload) until `until` says enough or `timeout` passes.
pub fn collect_notifications(
    c: &mut postgres::Client,
    timeout: Duration,
    until: impl Fn(&[(String, serde_json::Value)]) -> bool,
) -> Vec<(String, serde_json::Value)> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while Instant::now() < deadline && !until(&got) {
        let mut n = c.notifications();
        let mut it = n.timeout_iter(Duration::from_millis(200));
        while let Ok(Some(note)) = it.next() {
            got.push((
                note.channel().to_string(),
                serde_json::from_str(note.payload()).unwrap(),
            ));
        }
    }
    got
}
