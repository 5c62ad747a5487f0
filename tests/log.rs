//! The event log between real transactions: every committed event is read exactly once
//! whatever order transactions start and commit in, a rolled-back one never, and the log's
//! partitions are truncated only once everything in them was read, without ever making a
//! producer wait.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::worker::{endpoint, scalar_i64, scalar_text, wait_until, FAST, SECRET};
use common::Cluster;
use outbox_receiver::{Receiver, Reply};

fn receiver() -> Receiver {
    let rx = Receiver::start().unwrap();
    rx.set_secret(Some(SECRET.into()));
    rx
}

/// How many times each webhook id arrived.
fn arrivals(rx: &Receiver) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for r in rx.received() {
        *seen.entry(r.webhook_id).or_insert(0) += 1;
    }
    seen
}

#[test]
fn late_commits_rollbacks_and_subtransactions_are_read_exactly_once() {
    let cluster = Cluster::start(FAST);
    let rx = receiver();
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/hook"), "");

    // A transaction that takes its transaction id first and commits last, while others
    // commit (and are delivered) around it: a "last id seen" cursor would skip it.
    let mut late = cluster.client();
    late.batch_execute("BEGIN; SELECT outbox.enqueue('t.late', '{}', event_id => 'late')")
        .unwrap();
    // Another that will roll back.
    let mut doomed = cluster.client();
    doomed
        .batch_execute("BEGIN; SELECT outbox.enqueue('t.doomed', '{}', event_id => 'doomed')")
        .unwrap();
    for i in 0..30 {
        c.batch_execute(&format!(
            "SELECT outbox.enqueue('t.quick', '{{}}', event_id => 'quick-{i}')"
        ))
        .unwrap();
    }
    assert!(
        rx.wait_for(30, Duration::from_secs(20)),
        "{}",
        cluster.log()
    );
    // Many batches went by (each closed moments after its events were received); the long
    // transaction's event waits for its commit.
    assert!(wait_until(Duration::from_secs(5), || scalar_i64(
        &mut c,
        "SELECT count(*) FROM outbox.log_cursor"
    ) > 1));
    assert!(!arrivals(&rx).contains_key("late"));

    // Subtransactions: the event of a rolled-back savepoint is gone, the others stay with
    // the top-level transaction (all stamped with its id).
    late.batch_execute(
        "SAVEPOINT a; SELECT outbox.enqueue('t.sub', '{}', event_id => 'sub-undone'); ROLLBACK TO SAVEPOINT a;
         SAVEPOINT b; SELECT outbox.enqueue('t.sub', '{}', event_id => 'sub-kept');
         SAVEPOINT c; SELECT outbox.enqueue('t.sub', '{}', event_id => 'sub-nested'); RELEASE SAVEPOINT c;
         RELEASE SAVEPOINT b;",
    )
    .unwrap();
    late.batch_execute("COMMIT").unwrap();
    doomed.batch_execute("ROLLBACK").unwrap();
    assert!(
        rx.wait_for(33, Duration::from_secs(20)),
        "{}",
        cluster.log()
    );
    // A little longer: anything read twice or wrongly would arrive now.
    std::thread::sleep(Duration::from_secs(1));
    let seen = arrivals(&rx);
    assert_eq!(seen.len(), 33, "{seen:?}");
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    for id in ["late", "sub-kept", "sub-nested"] {
        assert!(seen.contains_key(id), "{id} missing: {seen:?}");
    }
    assert!(!seen.contains_key("sub-undone") && !seen.contains_key("doomed"));
}

#[test]
fn a_batch_larger_than_one_read_is_read_in_parts_across_a_restart() {
    // No worker: reading is driven by hand, as an external sender's outbox.claim does.
    let cluster = Cluster::start(&[]);
    let mut c = cluster.client();
    c.batch_execute("SELECT outbox.create_endpoint('https://example.com/hook')")
        .unwrap();
    c.batch_execute(
        "SELECT outbox.enqueue('t.bulk', jsonb_build_object('n', g)) FROM generate_series(1, 250) g;
         SELECT outbox.enqueue('t.bulk', jsonb_build_object('n', g)) FROM generate_series(251, 300) g;",
    )
    .unwrap();
    // 300 events in two transactions, read 120 at a time: the first part ends inside the
    // first transaction's events, and the cursor remembers where.
    assert_eq!(
        scalar_i64(&mut c, "SELECT outbox._read_log(120)::int8"),
        120
    );
    assert!(c
        .query_one("SELECT outbox._log_behind()", &[])
        .unwrap()
        .get::<_, bool>(0));
    // A part read in a transaction that then fails is read again.
    let mut t = c.transaction().unwrap();
    assert_eq!(
        t.query_one("SELECT outbox._read_log(120)::int8", &[])
            .unwrap()
            .get::<_, i64>(0),
        120
    );
    t.rollback().unwrap();
    // And a crash of the whole server in the middle loses nothing.
    drop(c);
    let mut cluster = cluster;
    cluster.restart("immediate");
    let mut c = cluster.client();
    assert_eq!(
        scalar_i64(&mut c, "SELECT outbox._read_log(120)::int8"),
        120
    );
    assert_eq!(scalar_i64(&mut c, "SELECT outbox._read_log(120)::int8"), 60);
    assert_eq!(scalar_i64(&mut c, "SELECT outbox._read_log(120)::int8"), 0);
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(DISTINCT (payload->>'n')::int) FROM outbox.event"
        ),
        300
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM outbox.delivery"),
        300
    );
    assert!(!c
        .query_one("SELECT outbox._log_behind()", &[])
        .unwrap()
        .get::<_, bool>(0));
}

#[test]
fn large_payloads_are_read_in_parts_bounded_by_bytes() {
    let cluster = Cluster::start(&[]);
    let mut c = cluster.client();
    c.batch_execute("SELECT outbox.create_endpoint('https://example.com/hook')")
        .unwrap();
    // Five events of about 10 kB each (all different), one transaction.
    c.batch_execute(
        "SELECT outbox.enqueue('t.big', to_jsonb((SELECT string_agg(md5(g::text || '-' || k::text), '')
                                                   FROM generate_series(1, 320) k)))
           FROM generate_series(1, 5) g",
    )
    .unwrap();
    // A part takes events until their payloads reach the bound, the first one always:
    // with a bound below any payload, each part is one event; the count limit is far.
    let part = |c: &mut postgres::Client, bound: i64| {
        scalar_i64(c, &format!("SELECT outbox._read_log(1000, {bound})::int8"))
    };
    for _ in 0..3 {
        assert_eq!(part(&mut c, 1), 1);
    }
    // A bound of a few payloads takes the rest at once: the last two.
    assert_eq!(part(&mut c, 1_000_000), 2);
    assert_eq!(part(&mut c, 1), 0);
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(DISTINCT payload) FROM outbox.event"),
        5
    );
}

/// Uses up transaction ids until the next one is in the window `window` (of 65,536, as
/// `outbox._log_part` counts them) and a few ids into it: one transaction whose
/// subtransactions each take one.
fn burn_to_window(c: &mut postgres::Client, window: i64) {
    let next = scalar_i64(
        c,
        "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8",
    );
    let n = ((window << 16) + 10 - next).max(0);
    c.batch_execute(&format!(
        "CREATE TEMP TABLE IF NOT EXISTS burn (x int);
         DO $$ BEGIN
             FOR i IN 1 .. {n} LOOP
                 BEGIN INSERT INTO burn VALUES (i); EXCEPTION WHEN others THEN NULL; END;
             END LOOP;
         END $$;
         TRUNCATE burn;"
    ))
    .unwrap();
}

fn log_rows(c: &mut postgres::Client) -> i64 {
    scalar_i64(c, "SELECT count(*) FROM outbox.log")
}

#[test]
fn rotation_frees_only_what_was_read_and_never_waits_for_anyone() {
    let cluster = Cluster::start(&[]);
    let mut c = cluster.client();
    c.batch_execute("SELECT outbox.create_endpoint('https://example.com/hook')")
        .unwrap();
    c.batch_execute(
        "SELECT outbox.enqueue('t.old', jsonb_build_object('n', g)) FROM generate_series(1, 10) g",
    )
    .unwrap();
    let first_part = scalar_i64(
        &mut c,
        "SELECT min(outbox._log_part(txid))::int8 FROM outbox.log",
    );
    let first_window = scalar_i64(&mut c, "SELECT min(txid::text::int8 >> 16) FROM outbox.log");
    // Two windows of transaction ids later, producers write to another partition, but the
    // reader has not read the first ten: nothing may go.
    burn_to_window(&mut c, first_window + 2);
    c.batch_execute("SELECT outbox.enqueue('t.new', '{}')")
        .unwrap();
    assert_ne!(
        scalar_i64(
            &mut c,
            "SELECT outbox._log_part(max(txid))::int8 FROM outbox.log"
        ),
        first_part
    );
    scalar_i64(&mut c, "SELECT outbox._rotate_log()::int8");
    assert_eq!(log_rows(&mut c), 11, "unread events are never truncated");

    // Once read, their partition can go; but not while someone holds it (a report reading
    // the log): rotation then passes at once, and producers are not held up either.
    assert_eq!(scalar_i64(&mut c, "SELECT outbox._read_log()::int8"), 11);
    let mut report = cluster.client();
    report
        .batch_execute(&format!(
            "BEGIN; SELECT count(*) FROM outbox.log_{first_part};"
        ))
        .unwrap();
    let started = std::time::Instant::now();
    assert_eq!(scalar_i64(&mut c, "SELECT outbox._rotate_log()::int8"), 0);
    c.batch_execute("SELECT outbox.enqueue('t.during', '{}')")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(log_rows(&mut c), 12);
    report.batch_execute("COMMIT").unwrap();

    assert_eq!(scalar_i64(&mut c, "SELECT outbox._rotate_log()::int8"), 1);
    assert_eq!(
        log_rows(&mut c),
        2,
        "the partition with the ten read events was truncated; the newest two stay"
    );
    // Nothing read was lost on the way: eleven deliveries, and the last event is read too.
    assert_eq!(scalar_i64(&mut c, "SELECT outbox._read_log()::int8"), 1);
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM outbox.delivery"),
        12
    );
}

#[test]
fn the_worker_rotates_the_log_while_it_delivers() {
    let cluster = Cluster::start(FAST);
    let rx = receiver();
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/hook"), "");
    c.batch_execute("SELECT outbox.enqueue('t.a', '{}') FROM generate_series(1, 20)")
        .unwrap();
    assert!(rx.wait_for(20, Duration::from_secs(20)));
    let window = scalar_i64(&mut c, "SELECT max(txid::text::int8 >> 16) FROM outbox.log");
    burn_to_window(&mut c, window + 2);
    c.batch_execute("SELECT outbox.enqueue('t.b', '{}')")
        .unwrap();
    assert!(rx.wait_for(21, Duration::from_secs(20)));
    // The worker rotates once a second: the first twenty go with their partition.
    assert!(
        wait_until(Duration::from_secs(20), || log_rows(&mut c) <= 1),
        "log still holds {} rows:\n{}",
        log_rows(&mut c),
        cluster.log()
    );
}

#[test]
fn an_event_goes_to_the_endpoints_subscribed_when_it_is_read() {
    // No worker: the log is read by hand, after the endpoints changed under the events.
    let cluster = Cluster::start(&[]);
    let mut c = cluster.client();
    let id =
        |c: &mut postgres::Client, sql: &str| -> String { c.query_one(sql, &[]).unwrap().get(0) };
    let kept = id(
        &mut c,
        "SELECT outbox.create_endpoint('https://example.com/kept')::text",
    );
    let disabled = id(
        &mut c,
        "SELECT outbox.create_endpoint('https://example.com/disabled')::text",
    );
    let deleted = id(
        &mut c,
        "SELECT outbox.create_endpoint('https://example.com/deleted')::text",
    );
    c.batch_execute(&format!(
        "SELECT outbox.enqueue('a.fanned', '{{}}', event_id => 'fanned');
         SELECT outbox.enqueue('a.direct', '{{}}', event_id => 'to-disabled', endpoint_id => '{disabled}');
         SELECT outbox.enqueue('a.direct', '{{}}', event_id => 'to-deleted', endpoint_id => '{deleted}');"
    ))
    .unwrap();
    // Committed; before they are read, one endpoint is created, one disabled, one deleted.
    let created = id(
        &mut c,
        "SELECT outbox.create_endpoint('https://example.com/created')::text",
    );
    c.batch_execute(&format!(
        "SELECT outbox.disable_endpoint('{disabled}'); SELECT outbox.delete_endpoint('{deleted}');"
    ))
    .unwrap();
    assert_eq!(
        scalar_i64(&mut c, "SELECT unread FROM outbox.log_status"),
        3
    );
    assert_eq!(scalar_i64(&mut c, "SELECT outbox._read_log()::int8"), 3);
    assert_eq!(
        scalar_i64(&mut c, "SELECT unread FROM outbox.log_status"),
        0
    );

    let mut got = common::lines(
        &mut c,
        "SELECT d.event_id || ' ' || e.url || ' ' || d.status
           FROM outbox.delivery d JOIN outbox.endpoint e ON e.id = d.endpoint_id",
    );
    got.sort();
    // The fan-out went to the endpoints enabled when it was read (the new one included,
    // the disabled and deleted ones not); the event for the disabled endpoint waits there;
    // the one for the deleted endpoint has nowhere to go.
    assert_eq!(
        got,
        [
            "fanned https://example.com/created pending",
            "fanned https://example.com/kept pending",
            "to-disabled https://example.com/disabled pending",
        ],
        "{kept} {created}"
    );
}

#[test]
fn first_attempts_leave_with_the_read_and_a_success_is_one_history_row() {
    let cluster = Cluster::start(FAST);
    let rx = receiver();
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/hook"), "");
    c.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric);
         CREATE TRIGGER orders_outbox AFTER INSERT ON orders
             FOR EACH ROW EXECUTE FUNCTION outbox.trigger('order.created');
         INSERT INTO orders SELECT g, g * 1.5 FROM generate_series(1, 150) g;",
    )
    .unwrap();
    for i in 0..50 {
        c.batch_execute(&format!(
            "SELECT outbox.enqueue('t.one', '{{}}', event_id => 'one-{i}')"
        ))
        .unwrap();
    }
    assert!(
        rx.wait_for(200, Duration::from_secs(30)),
        "{}",
        cluster.log()
    );
    assert!(wait_until(Duration::from_secs(20), || scalar_i64(
        &mut c,
        "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered' AND attempts = 1"
    ) == 200));
    // Each success is one row of outbox.history, inserted and never updated, and nothing
    // else: no delivery, attempt or event row (the 50 ids callers gave are remembered in
    // the tables of callers' ids, so that enqueueing them again does nothing). The
    // statistics the worker reports (at most a second late) count 200 inserts and no
    // update. The first 150 events came in one transaction, more than the endpoint's
    // max_in_flight (64): they went in parts, each ending where the endpoint had no room
    // left, instead of queueing the rest to be claimed.
    let history_stat = |c: &mut postgres::Client, column: &str| {
        scalar_i64(
            c,
            &format!(
                "SELECT coalesce(sum({column}), 0)::int8 FROM pg_stat_user_tables
                  WHERE relid IN ('outbox.history_0'::regclass, 'outbox.history_1'::regclass,
                                  'outbox.history_2'::regclass)"
            ),
        )
    };
    assert!(
        wait_until(Duration::from_secs(20), || history_stat(
            &mut c,
            "n_tup_ins"
        ) == 200),
        "{}",
        cluster.log()
    );
    assert_eq!(history_stat(&mut c, "n_tup_upd"), 0);
    assert_eq!(history_stat(&mut c, "n_tup_del"), 0);
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = 'outbox.delivery'::regclass"
        ),
        0
    );
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox.attempt"), 0);
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox.event"), 0);
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.event_key_0 WHERE id LIKE 'one-%'"
        ),
        50
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.attempts WHERE outcome = 'delivered' AND attempt = 1"
        ),
        200
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT coalesce(sum(deliveries), 0)::int8 FROM outbox.stats_hourly"
        ),
        200
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT sum(in_flight)::int8 FROM outbox.endpoint_state"
        ),
        0
    );
    // What the receiver saw, once each, under the ids the history keeps.
    let seen = arrivals(&rx);
    assert_eq!(seen.len(), 200);
    assert!(seen.values().all(|n| *n == 1));
    let ids: Vec<String> = c
        .query("SELECT event_id FROM outbox.deliveries", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 200);
    assert!(ids.iter().all(|id| seen.contains_key(id)));
}

#[test]
fn a_batch_read_but_never_closed_is_read_again_under_the_same_ids() {
    // No worker: two sessions play the reader, as the worker does through its SQL.
    let cluster = Cluster::start(&[]);
    let mut c = cluster.client();
    c.batch_execute(
        "SELECT outbox.create_endpoint('https://example.com/hook');
         CREATE TABLE orders (id int PRIMARY KEY);
         CREATE TRIGGER orders_outbox AFTER INSERT ON orders
             FOR EACH ROW EXECUTE FUNCTION outbox.trigger('order.created');
         INSERT INTO orders SELECT generate_series(1, 5);",
    )
    .unwrap();
    let read = |c: &mut postgres::Client| -> Vec<String> {
        c.query(
            "SELECT event_id FROM outbox._read_batch(100, 5000, 67108864) ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let mut first = cluster.client();
    first
        .batch_execute("SELECT pg_advisory_lock(outbox._log_lock(), 0)")
        .unwrap();
    let ids = read(&mut first);
    assert_eq!(ids.len(), 5);
    // While its first attempts are out, no one else reads the log.
    assert_eq!(scalar_i64(&mut c, "SELECT outbox._read_log()::int8"), 0);
    assert!(read(&mut c).is_empty());
    // The reader dies before closing: nothing of the part was recorded...
    drop(first);
    assert!(wait_until(Duration::from_secs(10), || scalar_i64(
        &mut c,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
    ) == 0));
    assert_eq!(
        scalar_i64(&mut c, "SELECT unread FROM outbox.log_status"),
        5
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM outbox.deliveries"),
        0
    );
    // ...so the next reader reads it again, and the trigger's events keep their ids.
    c.batch_execute(
        "SELECT pg_advisory_lock(outbox._log_lock(), 0);
         CREATE TEMP TABLE b AS SELECT * FROM outbox._read_batch(100, 5000, 67108864);",
    )
    .unwrap();
    let again: Vec<String> = c
        .query("SELECT event_id FROM b ORDER BY seq", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(again, ids);
    // Closing it makes every delivery as its attempt left it, and moves the cursor.
    // No outcome is left for later: no one holds the endpoint.
    let close = "SELECT count(*) FROM outbox._close_batch(
             (SELECT min(cursor_id) FROM b), (SELECT min(batch) FROM b)::pg_snapshot, 5000, 67108864,
             (SELECT array_agg(delivery_id ORDER BY seq) FROM b), (SELECT array_agg(txid ORDER BY seq) FROM b),
             (SELECT array_agg(seq ORDER BY seq) FROM b), (SELECT array_agg(endpoint_id ORDER BY seq) FROM b),
             ARRAY[1, 1, 1, 1, 1],
             ARRAY['delivered', 'retry', NULL, 'dead', 'delivered']::outbox.attempt_outcome[],
             ARRAY[200, 503, NULL, 400, 204], ARRAY[NULL, 'HTTP 503', NULL, 'HTTP 400', NULL],
             ARRAY[1.5, 2.5, NULL, 3.5, 4.5]::float8[], NULL, NULL, 'test', '1 minute')";
    assert_eq!(scalar_i64(&mut c, close), 0);
    let states: Vec<(String, i32)> = c
        .query(
            "SELECT d.status::text, d.attempts FROM b JOIN outbox.deliveries d ON d.id = b.delivery_id ORDER BY b.seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        states,
        [
            ("delivered".to_string(), 1),
            ("pending".into(), 1),
            ("in_flight".into(), 1),
            ("dead".into(), 1),
            ("delivered".into(), 1),
        ]
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM outbox.attempts"),
        4
    );
    // The two successes are rows of the history, the attempts of the others rows of their own.
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox.history"), 2);
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox.attempt"), 2);
    // The one still out counts against its endpoint from the close on; attempts of a
    // batch, out or finished, were never counted (nor were the dead reader's).
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT sum(in_flight)::int8 FROM outbox.endpoint_state"
        ),
        1
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT unread FROM outbox.log_status"),
        0
    );
    // A close of a part the cursor has moved past is refused.
    let err = c.batch_execute(close).unwrap_err();
    assert_eq!(common::sqlstate(&err), "55000", "{err}");
}

#[test]
fn closing_a_batch_never_waits_for_an_endpoint_someone_holds() {
    // No worker: one session plays it, another holds an endpoint's state row the way an
    // operator's open transaction (or another sender's ack) does.
    let cluster = Cluster::start(&[]);
    let mut c = cluster.client();
    let busy = endpoint(&mut c, "https://busy.example.com/hook", "");
    let idle = endpoint(&mut c, "https://idle.example.com/hook", "");
    c.batch_execute("SELECT outbox.enqueue('t.a', '{}', event_id => 'a')")
        .unwrap();
    c.batch_execute(
        "SELECT pg_advisory_lock(outbox._log_lock(), 0);
         CREATE TEMP TABLE b AS SELECT * FROM outbox._read_batch(100, 5000, 67108864);",
    )
    .unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM b"), 2);
    let mut holder = cluster.client();
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM outbox.endpoint_state WHERE endpoint_id = '{busy}' FOR UPDATE"
        ))
        .unwrap();
    c.batch_execute("SET lock_timeout = '2s'").unwrap();
    let deferred: Vec<String> = c
        .query(
            "SELECT d::text FROM outbox._close_batch(
                 (SELECT min(cursor_id) FROM b), (SELECT min(batch) FROM b)::pg_snapshot, 5000, 67108864,
                 (SELECT array_agg(delivery_id ORDER BY endpoint_id) FROM b),
                 (SELECT array_agg(txid ORDER BY endpoint_id) FROM b),
                 (SELECT array_agg(seq ORDER BY endpoint_id) FROM b),
                 (SELECT array_agg(endpoint_id ORDER BY endpoint_id) FROM b),
                 ARRAY[1, 1], ARRAY['delivered', 'delivered']::outbox.attempt_outcome[],
                 ARRAY[200, 200], NULL, NULL, NULL, NULL, 'test', '1 minute') AS d",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The idle endpoint's outcome is recorded; the busy one's delivery waits in flight.
    let busy_delivery = scalar_text(
        &mut c,
        &format!("SELECT delivery_id::text FROM b WHERE endpoint_id = '{busy}'"),
    );
    assert_eq!(deferred, std::slice::from_ref(&busy_delivery));
    let status = |c: &mut postgres::Client, ep: &str| {
        scalar_text(
            c,
            &format!("SELECT status::text FROM outbox.deliveries WHERE endpoint_id = '{ep}'"),
        )
    };
    assert_eq!(status(&mut c, &idle), "delivered");
    assert_eq!(status(&mut c, &busy), "in_flight");
    assert_eq!(
        scalar_i64(&mut c, "SELECT unread FROM outbox.log_status"),
        0
    );
    // Once the holder is done, the outcome is acknowledged like any claimed delivery's.
    holder.batch_execute("COMMIT").unwrap();
    let acked = scalar_i64(
        &mut c,
        &format!(
            "SELECT count(*) FROM outbox.ack_batch(ARRAY['{busy_delivery}']::uuid[], ARRAY[1],
                 ARRAY['delivered']::outbox.attempt_outcome[], ARRAY[200])"
        ),
    );
    assert_eq!(acked, 1);
    assert_eq!(status(&mut c, &busy), "delivered");
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT sum(in_flight)::int8 FROM outbox.endpoint_state"
        ),
        0
    );
}

#[test]
fn a_batch_closes_into_a_consistent_queue_after_its_endpoints_changed() {
    // No worker: one session plays it. Between the read and the close, one endpoint is
    // made ordered and another deleted.
    let cluster = Cluster::start(&[]);
    let mut c = cluster.client();
    let made_ordered = endpoint(&mut c, "https://ordered.example.com/hook", "");
    let deleted = endpoint(&mut c, "https://deleted.example.com/hook", "");
    c.batch_execute("SELECT outbox.enqueue('t.a', '{}') FROM generate_series(1, 2)")
        .unwrap();
    c.batch_execute(
        "SELECT pg_advisory_lock(outbox._log_lock(), 0);
         CREATE TEMP TABLE b AS SELECT * FROM outbox._read_batch(100, 5000, 67108864);",
    )
    .unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM b"), 4);
    c.batch_execute(&format!(
        "SELECT outbox.update_endpoint('{made_ordered}', ordered => true);
         SELECT outbox.delete_endpoint('{deleted}');"
    ))
    .unwrap();
    // Per endpoint, the first event's attempt is to be retried and the second's still out.
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox._close_batch(
                 (SELECT min(cursor_id) FROM b), (SELECT min(batch) FROM b)::pg_snapshot,
                 (SELECT min(part_events) FROM b), 67108864,
                 (SELECT array_agg(delivery_id ORDER BY endpoint_id, seq) FROM b),
                 (SELECT array_agg(txid ORDER BY endpoint_id, seq) FROM b),
                 (SELECT array_agg(seq ORDER BY endpoint_id, seq) FROM b),
                 (SELECT array_agg(endpoint_id ORDER BY endpoint_id, seq) FROM b),
                 ARRAY[1, 1, 1, 1],
                 (SELECT array_agg(CASE WHEN seq = (SELECT min(seq) FROM b) THEN 'retry' END
                                   ORDER BY endpoint_id, seq) FROM b)::outbox.attempt_outcome[],
                 NULL, NULL, NULL, NULL, NULL, 'test', '1 minute')"
        ),
        0
    );
    let rows = |c: &mut postgres::Client, ep: &str| -> Vec<(String, bool)> {
        c.query(
            &format!(
                "SELECT status::text, seq IS NOT NULL FROM outbox.delivery
                  WHERE endpoint_id = '{ep}' ORDER BY created_at, seq"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    };
    // Both unfinished deliveries of the endpoint made ordered have their place in its
    // order (the ordered claim serves only numbered ones)...
    let ordered = rows(&mut c, &made_ordered);
    assert_eq!(ordered.len(), 2);
    assert!(ordered.iter().all(|(_, numbered)| *numbered), "{ordered:?}");
    // ...and the deleted endpoint's are cancelled, as its delete cancelled its queue.
    let gone = rows(&mut c, &deleted);
    assert_eq!(
        gone,
        [
            ("cancelled".to_string(), false),
            ("cancelled".into(), false)
        ]
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT unread FROM outbox.log_status"),
        0
    );
}

#[test]
fn a_full_endpoint_holds_back_only_itself_and_no_limit_means_no_limit() {
    // No worker; endpoints without a max_in_flight of their own have no limit at all. The
    // session reads as one worker would (paced), then, in a transaction that makes
    // outbox._batches_counted() true, as one of several (counted).
    let cluster = Cluster::start(&["outbox.endpoint_max_in_flight = 0"]);
    let mut c = cluster.client();
    let full = endpoint(
        &mut c,
        "https://full.example.com/hook",
        ", max_in_flight => 2",
    );
    let open = endpoint(&mut c, "https://open.example.com/hook", "");
    // The full endpoint has its two requests out already (a slow receiver).
    c.batch_execute(&format!(
        "UPDATE outbox.endpoint_state SET in_flight = 2 WHERE endpoint_id = '{full}'"
    ))
    .unwrap();
    c.batch_execute("SELECT outbox.enqueue('t.a', '{}') FROM generate_series(1, 5)")
        .unwrap();
    let read = "SELECT pg_advisory_lock(outbox._log_lock(), 0);
                CREATE TEMP TABLE b AS SELECT * FROM outbox._read_batch(100, 5000, 67108864);";
    let count = |c: &mut postgres::Client, filter: &str| {
        scalar_i64(c, &format!("SELECT count(*) FROM b WHERE {filter}"))
    };
    c.batch_execute(&format!("BEGIN; {read}")).unwrap();
    // Paced: one part of all five events, every attempt returned, the full endpoint's with
    // its limit and count, so that the worker starts them as it gets room.
    assert_eq!(
        count(&mut c, &format!("endpoint_id = '{open}' AND cap IS NULL")),
        5
    );
    assert_eq!(
        count(
            &mut c,
            &format!("endpoint_id = '{full}' AND cap = 2 AND busy = 2")
        ),
        5
    );
    assert_eq!(count(&mut c, "part_events = 5"), 10);
    c.batch_execute("ROLLBACK").unwrap();
    // Counted: every event goes at once to the endpoint without a limit, in one part of
    // all five; the full endpoint, full from the start, ends nothing (its events are
    // queued), and nothing is paced.
    c.batch_execute(&format!(
        "BEGIN;
         CREATE OR REPLACE FUNCTION outbox._batches_counted() RETURNS boolean LANGUAGE sql RETURN true;
         {read}"
    ))
    .unwrap();
    assert_eq!(count(&mut c, &format!("endpoint_id = '{open}'")), 5);
    assert_eq!(count(&mut c, "true"), 5);
    assert_eq!(count(&mut c, "cap IS NULL AND busy IS NULL"), 5);
    assert_eq!(count(&mut c, "part_events = 5"), 5);
    c.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn a_batch_paces_its_attempts_to_an_endpoints_max_in_flight_and_queues_the_rest() {
    // One request at a time, each answered after 100 ms: within the batch's hold (250 ms)
    // at most three of the ten can go.
    let cluster = Cluster::start(FAST);
    let rx = receiver();
    rx.set_default("/one", Reply::Delay(Duration::from_millis(100), 200));
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/one"), ", max_in_flight => 1");
    c.batch_execute(
        "SELECT outbox.enqueue('t.paced', jsonb_build_object('n', g)) FROM generate_series(1, 10) g",
    )
    .unwrap();
    assert!(
        rx.wait_for(10, Duration::from_secs(30)),
        "{}",
        cluster.log()
    );
    assert!(wait_until(Duration::from_secs(20), || scalar_i64(
        &mut c,
        "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
    ) == 10));
    // Each was sent once: the attempts the batch never started were not sent before they
    // became deliveries...
    let got = rx.received_on("/one");
    let ids: std::collections::BTreeSet<&str> = got.iter().map(|r| r.webhook_id.as_str()).collect();
    assert_eq!((got.len(), ids.len()), (10, 10));
    // ...and never two at once, from the batch or claimed after it: each arrived once the
    // one before was answered.
    for w in got.windows(2) {
        let gap = w[1]
            .received_at
            .duration_since(w[0].received_at)
            .unwrap_or_default();
        assert!(
            gap >= Duration::from_millis(90),
            "two requests out at once ({gap:?} apart)"
        );
    }
    // The batch's successes are history rows; what it could not start in its hold (and the
    // one still out when it closed) are delivery rows, claimed after it.
    let history = scalar_i64(&mut c, "SELECT count(*) FROM outbox.history");
    assert!((1..=3).contains(&history), "{history} sent from the batch");
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM outbox.delivery"),
        10 - history
    );
}

#[test]
fn deliveries_in_the_history_are_seen_replayed_refused_and_purged_like_the_others() {
    let cluster = Cluster::start(FAST);
    let rx = receiver();
    let mut c = cluster.client();
    let ep = endpoint(&mut c, &rx.url("/hook"), "");
    c.batch_execute(
        "SELECT outbox.enqueue('t.h', jsonb_build_object('n', g)) FROM generate_series(1, 5) g;
         SELECT outbox.enqueue('t.h', '{\"n\": 6}', event_id => 'mine-6');",
    )
    .unwrap();
    assert!(rx.wait_for(6, Duration::from_secs(30)), "{}", cluster.log());
    assert!(wait_until(Duration::from_secs(20), || scalar_i64(
        &mut c,
        "SELECT count(*) FROM outbox.history"
    ) == 6));
    // The views show them as any delivered delivery, payload and attempt included.
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.deliveries
              WHERE status = 'delivered' AND attempts = 1 AND NOT retrying AND payload ? 'n'
                AND finished_at IS NOT NULL AND last_status_code = 200"
        ),
        6
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.attempts a JOIN outbox.history h ON h.attempt_id = a.id
              WHERE a.outcome = 'delivered' AND a.delivery_id = h.delivery_id AND a.status_code = 200"
        ),
        6
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT delivered_last_hour FROM outbox.stats()"),
        6
    );
    // Acknowledging one is refused as for any finished delivery; there is nothing to cancel
    // or retry; each says so instead of claiming it does not exist.
    let id = scalar_text(
        &mut c,
        "SELECT delivery_id::text FROM outbox.history WHERE event_id = 'mine-6'",
    );
    let err = c
        .execute(&format!("SELECT outbox.ack('{id}', 1, 'delivered')"), &[])
        .unwrap_err();
    assert_eq!(common::sqlstate(&err), "55000", "{err}");
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("it is delivered at attempt 1")),
        "{err:?}"
    );
    assert_eq!(
        scalar_i64(&mut c, &format!("SELECT outbox.cancel('{id}')")),
        0
    );
    assert_eq!(
        scalar_i64(&mut c, &format!("SELECT outbox.retry_dead('{id}')")),
        0
    );
    // A replay sends each again under its event id, as new deliveries.
    assert_eq!(
        scalar_i64(
            &mut c,
            &format!("SELECT outbox.replay('{ep}', now() - interval '1 hour')")
        ),
        6
    );
    assert!(
        rx.wait_for(12, Duration::from_secs(30)),
        "{}",
        cluster.log()
    );
    let seen = arrivals(&rx);
    assert_eq!(seen.len(), 6);
    assert!(seen.values().all(|n| *n == 2), "{seen:?}");
    assert!(wait_until(Duration::from_secs(20), || scalar_i64(
        &mut c,
        "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
    ) == 12));
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.delivery d JOIN outbox.history h ON h.delivery_id = d.replay_of"
        ),
        6
    );
    // The caller's id is still known: enqueueing it again sends nothing.
    c.batch_execute("SELECT outbox.enqueue('t.h', '{\"n\": 6}', event_id => 'mine-6')")
        .unwrap();
    // Purged, everything goes, the caller's id with it: then it is a new event.
    assert_eq!(scalar_i64(&mut c, "SELECT outbox.purge('0 seconds')"), 12);
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM outbox.deliveries"),
        0
    );
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox.event"), 0);
    assert_eq!(rx.count(), 12);
    c.batch_execute("SELECT outbox.enqueue('t.h', '{\"n\": 6}', event_id => 'mine-6')")
        .unwrap();
    assert!(
        rx.wait_for(13, Duration::from_secs(30)),
        "{}",
        cluster.log()
    );
    assert_eq!(arrivals(&rx)["mine-6"], 3);
}

#[test]
fn a_flow_of_successes_writes_its_endpoints_state_row_about_once_a_second() {
    let cluster = Cluster::start(FAST);
    let rx = receiver();
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/hook"), "");
    let updates = |c: &mut postgres::Client| {
        scalar_i64(
            c,
            "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'outbox.endpoint_state'::regclass",
        )
    };
    let batches = |c: &mut postgres::Client| {
        scalar_i64(c, "SELECT count(*) FROM outbox.log_cursor WHERE events > 0")
    };
    // Statistics settle (they are reported at most a second late).
    std::thread::sleep(Duration::from_millis(1500));
    let (updates_before, batches_before) = (updates(&mut c), batches(&mut c));
    let started = std::time::Instant::now();
    for i in 0..300 {
        c.batch_execute(&format!(
            "SELECT outbox.enqueue('t.flow', '{{\"n\": {i}}}')"
        ))
        .unwrap();
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(
        rx.wait_for(300, Duration::from_secs(30)),
        "{}",
        cluster.log()
    );
    let seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(1500));
    let (updated, closed) = (
        updates(&mut c) - updates_before,
        batches(&mut c) - batches_before,
    );
    // Each batch used to update the row twice (in-flight count up at the read, down at the
    // close): now a batch of successes leaves it alone unless its last success is a second
    // old.
    eprintln!("{updated} updates of the state row for {closed} batches in {seconds:.1} s");
    assert!(
        closed >= 20,
        "only {closed} batches: the flow was not spread out"
    );
    assert!(
        (updated as f64) <= seconds + 3.0,
        "{updated} updates of the state row for {closed} batches in {seconds:.1} s"
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT sum(in_flight)::int8 FROM outbox.endpoint_state"
        ),
        0
    );
    assert!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.endpoint_state WHERE last_success_at > now() - interval '10 seconds'"
        ) == 1
    );
}

#[test]
fn an_open_batch_counts_in_its_endpoints_state_only_when_other_workers_claim() {
    for (workers, counted) in [(1, false), (2, true)] {
        let mut settings = FAST.to_vec();
        let workers_setting = format!("outbox.workers = {workers}");
        settings.push(&workers_setting);
        let cluster = Cluster::start(&settings);
        let rx = receiver();
        let mut c = cluster.client();
        assert_eq!(
            c.query_one("SELECT outbox._batches_counted()", &[])
                .unwrap()
                .get::<_, bool>(0),
            counted,
            "outbox.workers = {workers}"
        );
        endpoint(&mut c, &rx.url("/hook"), "");
        for i in 0..100 {
            c.batch_execute(&format!(
                "SELECT outbox.enqueue('t.open', '{{\"n\": {i}}}')"
            ))
            .unwrap();
        }
        assert!(
            rx.wait_for(100, Duration::from_secs(30)),
            "{}",
            cluster.log()
        );
        // Counted at the read or not, the count comes back to what is in flight: none.
        assert!(
            wait_until(Duration::from_secs(10), || scalar_i64(
                &mut c,
                "SELECT sum(in_flight)::int8 FROM outbox.endpoint_state"
            ) == 0),
            "outbox.workers = {workers}"
        );
    }
}

/// A batch waiting for a slow receiver holds back nothing committed after it: the next
/// part is read and sent while the first is still open, and the two close in order, each
/// delivery written once. A crash with both open sends both again under the same ids.
#[test]
fn the_next_batch_goes_out_while_the_one_before_waits_for_its_answers() {
    let cluster = Cluster::start(FAST);
    let rx = receiver();
    rx.set_default("/slow", Reply::Delay(Duration::from_millis(1500), 200));
    let mut c = cluster.client();
    let slow = endpoint(&mut c, &rx.url("/slow"), "");
    let fast = endpoint(&mut c, &rx.url("/fast"), "");
    // One event for the slow receiver; once it is being answered, three for the fast one.
    // Returns how long the fast ones took from their commit.
    let round = |c: &mut postgres::Client, tag: &str| {
        c.batch_execute(&format!(
            "SELECT outbox.enqueue('t.slow{tag}', '{{}}', endpoint_id => '{slow}')"
        ))
        .unwrap();
        assert!(wait_until(Duration::from_secs(5), || rx
            .received_on("/slow")
            .len()
            == 1));
        let sent = std::time::SystemTime::now();
        c.batch_execute(&format!(
            "SELECT outbox.enqueue('t.fast{tag}', jsonb_build_object('n', g), endpoint_id => '{fast}')
               FROM generate_series(1, 3) g"
        ))
        .unwrap();
        assert!(wait_until(Duration::from_secs(5), || rx
            .received_on("/fast")
            .len()
            == 3));
        rx.received_on("/fast")[2]
            .received_at
            .duration_since(sent)
            .unwrap_or_default()
    };
    // Idle first (a claim has found nothing due). The fast events arrive at once, not after
    // the slow answer (1.5 s) nor after the first batch's hold (250 ms).
    std::thread::sleep(Duration::from_millis(500));
    let waited = round(&mut c, "");
    assert!(
        waited < Duration::from_millis(200),
        "the fast events waited {waited:?} behind the open batch"
    );
    // Both batches close in order: every delivery written once, as delivered, and the log
    // read to its end.
    assert!(
        wait_until(Duration::from_secs(10), || scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
        ) == 4),
        "{}",
        cluster.log()
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM outbox.deliveries"),
        4
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT unread FROM outbox.log_status"),
        0
    );
    assert_eq!(rx.received().len(), 4, "each sent once");

    // Again, and the worker killed while both are open: both are read and sent again after
    // the restart, under the same webhook-ids, and each delivery is still written once.
    rx.clear();
    round(&mut c, "2");
    let pid = common::worker::worker_pid(&cluster);
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    assert!(
        wait_until(Duration::from_secs(60), || {
            // The crash restarts every backend: a connection may be cut mid-query.
            postgres::Client::connect(&cluster.conninfo(), postgres::NoTls)
                .ok()
                .and_then(|mut c| {
                    c.query_one(
                        "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'",
                        &[],
                    )
                    .ok()
                })
                .is_some_and(|r| r.get::<_, i64>(0) == 8)
        }),
        "{}",
        cluster.log()
    );
    let mut c = cluster.client();
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM outbox.deliveries"),
        8
    );
    let fast_ids: std::collections::BTreeSet<String> = rx
        .received_on("/fast")
        .into_iter()
        .map(|r| r.webhook_id)
        .collect();
    assert_eq!(fast_ids.len(), 3, "sent again under the same ids");
}

#[test]
fn a_batch_answered_in_full_closes_after_the_next_one_is_read_and_sent() {
    let mut settings = FAST.to_vec();
    settings.push("log_min_messages = debug1");
    let cluster = Cluster::start(&settings);
    let rx = receiver();
    let mut c = cluster.client();
    let fast = endpoint(&mut c, &rx.url("/fast"), "");
    // A steady flow, one event per transaction about every millisecond: most batches are
    // answered in full before the worker's next cycle, which reads what committed
    // meanwhile and sends it first. (Flat out instead, the producer's commits mostly find
    // a batch still waiting for its answers, and the one after it is read beside it.)
    const N: usize = 1500;
    for i in 0..N {
        c.batch_execute(&format!(
            "SELECT outbox.enqueue('t.flow', '{{\"n\": {i}}}', endpoint_id => '{fast}')"
        ))
        .unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(rx.wait_for(N, Duration::from_secs(60)), "{}", cluster.log());
    assert!(
        wait_until(Duration::from_secs(10), || scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
        ) == N as i64),
        "{}",
        cluster.log()
    );
    assert!(
        cluster
            .log()
            .contains("of the next batch read before the last one closes"),
        "no batch was read before the one before it closed"
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM outbox.deliveries"),
        N as i64
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT unread FROM outbox.log_status"),
        0
    );
    let seen = arrivals(&rx);
    assert_eq!(seen.len(), N);
    assert!(seen.values().all(|&n| n == 1), "each sent once");

    // With an ordered endpoint subscribed as well, each batch's close queues its deliveries
    // there, which the claim sends: they arrive in order, each once, beside the flow.
    rx.clear();
    endpoint(&mut c, &rx.url("/ordered"), ", ordered => true");
    const M: usize = 300;
    for i in 0..M {
        c.batch_execute(&format!(
            "SELECT outbox.enqueue('t.both', '{{\"n\": {i}}}')"
        ))
        .unwrap();
    }
    assert!(
        rx.wait_for(2 * M, Duration::from_secs(60)),
        "{}",
        cluster.log()
    );
    let order: Vec<u64> = rx
        .received_on("/ordered")
        .into_iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["data"]["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(order, (0..M as u64).collect::<Vec<_>>());
    assert_eq!(rx.received_on("/fast").len(), M);
    let seen = arrivals(&rx);
    assert_eq!(seen.len(), M, "one id per event, both endpoints");
    assert!(seen.values().all(|&n| n == 2), "each sent once to each");
}
