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

fn scalar(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// Ends the current turn of the tables of callers' ids, as retention does once it is a
/// retention old.
fn rotate(c: &mut impl postgres::GenericClient) -> bool {
    c.batch_execute("UPDATE outbox.event_key_rotation SET since = now() - interval '2 hours'")
        .unwrap();
    c.query_one("SELECT outbox._rotate_event_keys('1 hour')", &[])
        .unwrap()
        .get(0)
}

fn repeatable_read(c: &mut postgres::Client) -> postgres::Transaction<'_> {
    c.build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap()
}

fn sqlstate(e: &postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

/// The tables of callers' ids take turns while producers enqueue: no id is ever taken
/// twice, whatever the rotation meets.
#[test]
fn ids_stay_unique_while_their_tables_take_turns() {
    let cluster = Cluster::start(&[]);
    let mut a = cluster.client();
    let mut b = cluster.client();
    a.batch_execute("SELECT outbox.create_endpoint('http://127.0.0.1:9/hook')")
        .unwrap();
    let q = |id: &str| format!("SELECT outbox.enqueue('order.paid', '{{}}', event_id => '{id}')");

    // An enqueuer still open holds the rotation back (a moment, then it gives up and
    // retries later) rather than leave an id behind that a newer snapshot would not see.
    let mut tb = b.transaction().unwrap();
    tb.batch_execute(&q("open")).unwrap();
    let started = std::time::Instant::now();
    assert!(
        !rotate(&mut a),
        "rotated while an id was going into its table"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    tb.commit().unwrap();
    assert!(rotate(&mut a));
    assert_eq!(
        scalar(
            &mut a,
            "SELECT current::int8 FROM outbox.event_key_rotation"
        ),
        1
    );

    // An enqueuer that read the turn just before a rotation committed puts its id into
    // both tables: the one it read and the one whose turn began.
    let mut r = cluster.client();
    let mut tr = r.transaction().unwrap();
    assert!(rotate(&mut tr));
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut tb = b.transaction().unwrap();
        let r = tb.batch_execute(&q("during"));
        tx.send(()).unwrap();
        r.unwrap();
        tb.commit().unwrap();
        b
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "the enqueue did not wait for the rotation"
    );
    tr.commit().unwrap();
    let mut b = waiter.join().unwrap();
    assert_eq!(
        scalar(
            &mut a,
            "SELECT (SELECT count(*) FROM outbox.event_key_0 WHERE id = 'during')
                  + (SELECT count(*) FROM outbox.event_key_1 WHERE id = 'during')"
        ),
        2
    );

    // REPEATABLE READ: a snapshot from before a rotation cannot tell which ids committed
    // since, so its enqueue of an id fails to serialize (and succeeds when retried)...
    let mut ta = repeatable_read(&mut a);
    ta.batch_execute("SELECT 1").unwrap();
    assert!(rotate(&mut b));
    let e = ta.batch_execute(&q("rr-1")).unwrap_err();
    assert_eq!(sqlstate(&e), "40001", "{e}");
    ta.rollback().unwrap();
    let mut ta = repeatable_read(&mut a);
    ta.batch_execute(&q("rr-1")).unwrap();
    ta.commit().unwrap();
    // ...and so does one racing an id committed after its snapshot.
    let mut ta = repeatable_read(&mut a);
    ta.batch_execute("SELECT 1").unwrap();
    b.batch_execute(&q("rr-2")).unwrap();
    let e = ta.batch_execute(&q("rr-2")).unwrap_err();
    assert_eq!(sqlstate(&e), "40001", "{e}");
    ta.rollback().unwrap();

    // Every id named one event in the log.
    assert_eq!(
        scalar(&mut a, "SELECT count(*) FROM outbox.log"),
        scalar(&mut a, "SELECT count(DISTINCT id) FROM outbox.log")
    );
    assert_eq!(scalar(&mut a, "SELECT count(*) FROM outbox.log"), 4);
}
