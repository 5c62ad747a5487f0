//! `outbox.claim` between real connections: SKIP LOCKED never hands one delivery to two
//! claimers, and a lease that expires makes its delivery claimable again.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::worker::read_log;
use common::{sqlstate, Cluster};

fn setup(cluster: &Cluster, events: usize) {
    let mut c = cluster.client();
    c.batch_execute(&format!(
        "SELECT outbox.create_endpoint('http://127.0.0.1:9/hook', max_in_flight => 10000);
         SELECT outbox.enqueue('test.event', jsonb_build_object('n', g)) FROM generate_series(1, {events}) g;"
    ))
    .unwrap();
    read_log(&mut c);
}

#[test]
fn concurrent_claimers_never_share_a_delivery() {
    let cluster = Cluster::start(&[]);
    let mut c = cluster.client();
    c.batch_execute(
        "SELECT outbox.create_endpoint('http://127.0.0.1:9/' || g, max_in_flight => 10000) FROM generate_series(1, 3) g;
         SELECT outbox.enqueue('test.event', jsonb_build_object('n', g)) FROM generate_series(1, 1000) g;",
    )
    .unwrap();
    read_log(&mut c);
    // The first claims overlap for certain: each claimer keeps its first claim's
    // transaction open until all three have claimed, so they must have passed by each
    // other's locks. Afterwards they race freely until the queue is empty.
    let clients: Vec<postgres::Client> = (0..3).map(|_| cluster.client()).collect();
    let claimed = std::sync::Arc::new(std::sync::Barrier::new(3));
    let claimers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(w, mut c)| {
            let claimed = claimed.clone();
            std::thread::spawn(move || {
                let mut first = c.transaction().unwrap();
                let rows = first
                    .query(
                        "SELECT delivery_id::text FROM outbox.claim(37, $1)",
                        &[&format!("w{w}")],
                    )
                    .unwrap();
                let mut mine: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                claimed.wait();
                first.commit().unwrap();
                loop {
                    let rows = c
                        .query(
                            "SELECT delivery_id::text FROM outbox.claim(37, $1)",
                            &[&format!("w{w}")],
                        )
                        .unwrap();
                    mine.extend(rows.iter().map(|r| r.get::<_, String>(0)));
                    // An empty claim may only mean that the others were serving every
                    // endpoint at that moment: stop when nothing is pending any more.
                    if rows.is_empty()
                        && c.query_one(
                            "SELECT count(*) FROM outbox.delivery WHERE status = 'pending'",
                            &[],
                        )
                        .unwrap()
                        .get::<_, i64>(0)
                            == 0
                    {
                        return mine;
                    }
                }
            })
        })
        .collect();
    let results: Vec<Vec<String>> = claimers.into_iter().map(|t| t.join().unwrap()).collect();
    let total: usize = results.iter().map(Vec::len).sum();
    let distinct: HashSet<&String> = results.iter().flatten().collect();
    assert_eq!(total, 3000, "every delivery claimed once");
    assert_eq!(distinct.len(), 3000, "no delivery claimed twice");
    assert!(
        results.iter().all(|r| r.len() >= 37),
        "all claimers took part: {:?}",
        results.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let in_flight: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.delivery WHERE status = 'in_flight' AND attempts = 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(in_flight, 3000);
    // The per-endpoint counters agree with the rows.
    let counted: i64 = c
        .query_one("SELECT sum(in_flight) FROM outbox.endpoint_state", &[])
        .unwrap()
        .get(0);
    assert_eq!(counted, 3000);
}

#[test]
fn a_claim_passes_by_an_endpoint_another_claimer_is_serving() {
    let cluster = Cluster::start(&[]);
    let mut c = cluster.client();
    let first: String = c
        .query_one(
            "SELECT outbox.create_endpoint('http://127.0.0.1:9/a')::text",
            &[],
        )
        .unwrap()
        .get(0);
    c.batch_execute(
        "SELECT outbox.create_endpoint('http://127.0.0.1:9/b');
         SELECT outbox.enqueue('test.event', jsonb_build_object('n', g)) FROM generate_series(1, 10) g;",
    )
    .unwrap();
    read_log(&mut c);
    let mut a = cluster.client();
    let mut b = cluster.client();
    let mut ta = a.transaction().unwrap();
    let held = ta
        .query(
            &format!("SELECT delivery_id FROM outbox.claim(4, 'a', endpoint_id => '{first}')"),
            &[],
        )
        .unwrap();
    assert_eq!(held.len(), 4);
    // b is not blocked by a's open transaction: it passes that endpoint by and takes the
    // other one's ten.
    b.batch_execute("SET lock_timeout = '2s'").unwrap();
    let other = b
        .query(
            "SELECT delivery_id, endpoint_id::text FROM outbox.claim(100, 'b')",
            &[],
        )
        .unwrap();
    assert_eq!(other.len(), 10);
    assert!(other.iter().all(|r| r.get::<_, String>(1) != first));
    ta.rollback().unwrap();
    // a rolled back: all ten of the first endpoint are claimable, as first attempts.
    let again = b
        .query("SELECT attempt FROM outbox.claim(100, 'b')", &[])
        .unwrap();
    assert_eq!(again.len(), 10);
    assert!(again.iter().all(|r| r.get::<_, i32>(0) == 1));
}

#[test]
fn an_expired_lease_is_claimed_again_and_the_stale_ack_refused() {
    let cluster = Cluster::start(&[]);
    setup(&cluster, 1);
    let mut first = cluster.client();
    let mut second = cluster.client();
    let row = first
        .query_one(
            "SELECT delivery_id::text, attempt FROM outbox.claim(10, 'first', '1 second')",
            &[],
        )
        .unwrap();
    let (id, attempt): (String, i32) = (row.get(0), row.get(1));
    assert_eq!(attempt, 1);
    assert!(
        second
            .query("SELECT 1 FROM outbox.claim(10, 'second')", &[])
            .unwrap()
            .is_empty(),
        "a live lease is not claimable"
    );

    std::thread::sleep(Duration::from_millis(1300));
    let row = second
        .query_one(
            "SELECT delivery_id::text, attempt FROM outbox.claim(10, 'second', '30 seconds')",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), id);
    assert_eq!(row.get::<_, i32>(1), 2);

    let stale = first
        .execute(
            &format!("SELECT outbox.ack('{id}', 1, 'delivered', 200)") as &str,
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&stale), "55000", "{stale}");
    second
        .execute(
            &format!("SELECT outbox.ack('{id}', 2, 'delivered', 200)") as &str,
            &[],
        )
        .unwrap();
    let row = second
        .query_one(
            "SELECT status::text, attempts, (SELECT count(*) FROM outbox.attempts a WHERE a.delivery_id = d.id)
               FROM outbox.deliveries d",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "delivered");
    assert_eq!(row.get::<_, i32>(1), 2);
    assert_eq!(
        row.get::<_, i64>(2),
        1,
        "only the accepted ack is in the history"
    );
}
