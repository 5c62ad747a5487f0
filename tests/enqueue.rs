//! `outbox.enqueue` between real connections: it belongs to the caller's transaction, and an
//! event id deduplicates even when two transactions race with it.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::worker::read_log;
use common::Cluster;

/// Deliveries once everything committed has been read from the log (no worker runs here:
/// the test reads as an `outbox.claim` would).
fn deliveries(c: &mut postgres::Client) -> i64 {
    read_log(c);
    c.query_one("SELECT count(*) FROM outbox.delivery", &[])
        .unwrap()
        .get(0)
}

#[test]
fn a_rolled_back_enqueue_leaves_nothing() {
    let cluster = Cluster::start(&[]);
    let mut c = cluster.client();
    c.batch_execute("SELECT outbox.create_endpoint('http://127.0.0.1:9/hook')")
        .unwrap();
    let mut t = c.transaction().unwrap();
    t.batch_execute("SELECT outbox.enqueue('a.b', '{}') FROM generate_series(1, 5)")
        .unwrap();
    t.rollback().unwrap();
    assert_eq!(deliveries(&mut c), 0);
    let logged: i64 = c
        .query_one("SELECT count(*) FROM outbox.log", &[])
        .unwrap()
        .get(0);
    assert_eq!(logged, 0);
    let events: i64 = c
        .query_one("SELECT count(*) FROM outbox.event", &[])
        .unwrap()
        .get(0);
    assert_eq!(events, 0);
    c.batch_execute("BEGIN; SELECT outbox.enqueue('a.b', '{}'); COMMIT;")
        .unwrap();
    assert_eq!(deliveries(&mut c), 1);
}

/// Two transactions enqueue the same event id at once; `first_commits` decides whether the
/// first one commits or rolls back while the second is waiting on it.
fn race(first_commits: bool) {
    let cluster = Cluster::start(&[]);
    let mut a = cluster.client();
    a.batch_execute("SELECT outbox.create_endpoint('http://127.0.0.1:9/hook')")
        .unwrap();
    let mut b = cluster.client();

    let q = "SELECT outbox.enqueue('order.paid', jsonb_build_object('by', $1::text), event_id => 'order-7-paid')";
    let mut ta = a.transaction().unwrap();
    let first: String = ta.query_one(q, &[&"a"]).unwrap().get(0);

    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut tb = b.transaction().unwrap();
        // The same event: idempotent, whichever way the first transaction ends.
        let second = tb.query_one(q, &[&"a"]).map(|r| r.get::<_, String>(0));
        tx.send(()).unwrap();
        tb.commit().unwrap();
        second.unwrap()
    });
    // The second transaction must wait for the first, not create a twin.
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "second enqueue did not wait"
    );
    if first_commits {
        ta.commit().unwrap();
    } else {
        ta.rollback().unwrap();
    }
    let second = waiter.join().unwrap();
    assert_eq!(
        (first.as_str(), second.as_str()),
        ("order-7-paid", "order-7-paid")
    );
    assert_eq!(deliveries(&mut a), 1);
    // One event in the log: the first transaction's if it committed, else the second's.
    let logged: i64 = a
        .query_one("SELECT count(*) FROM outbox.log", &[])
        .unwrap()
        .get(0);
    assert_eq!(logged, 1);
}

#[test]
fn concurrent_enqueues_of_one_event_id_create_one_delivery() {
    race(true);
}

#[test]
fn an_enqueue_waiting_on_a_rolled_back_twin_creates_the_delivery() {
    race(false);
}

/// Endpoints get the same treatment: two deploys creating one under the same uid at once
/// end with one endpoint, whichever commits first.
#[test]
fn concurrent_creates_of_one_endpoint_uid_make_one_endpoint() {
    let cluster = Cluster::start(&[]);
    let mut a = cluster.client();
    let mut b = cluster.client();
    let q = "SELECT outbox.create_endpoint('http://127.0.0.1:9/hook', event_types => '{order.*}', uid => 'orders')::text";
    let mut ta = a.transaction().unwrap();
    let first: String = ta.query_one(q, &[]).unwrap().get(0);
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let second = b.query_one(q, &[]).map(|r| r.get::<_, String>(0));
        tx.send(()).unwrap();
        second.unwrap()
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "the second create did not wait for the first"
    );
    ta.commit().unwrap();
    assert_eq!(waiter.join().unwrap(), first);
    let endpoints: i64 = a
        .query_one("SELECT count(*) FROM outbox.endpoints", &[])
        .unwrap()
        .get(0);
    assert_eq!(endpoints, 1);
}
