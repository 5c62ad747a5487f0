//! Operator recipes shipped in contrib/: tenant isolation with row-level security, and the
//! postgres_exporter queries, each run against a real cluster.

mod common;

use common::{sqlstate, Cluster};

#[test]
fn row_level_security_confines_a_role_to_its_tenant() {
    let cluster = Cluster::start(&[]);
    let mut admin = cluster.client();
    admin
        .batch_execute(
            "CREATE ROLE app_tenant LOGIN;
             SELECT outbox.create_endpoint('https://acme.example.com/', tenant_id => 'acme');
             SELECT outbox.create_endpoint('https://globex.example.com/', tenant_id => 'globex');
             SELECT outbox.enqueue('a.b', '{}', tenant_id => 'acme') FROM generate_series(1, 3);
             SELECT outbox.enqueue('a.b', '{}', tenant_id => 'globex') FROM generate_series(1, 2);",
        )
        .unwrap();
    // No worker runs here: the claim below (outside a transaction block) reads the log.
    admin
        .batch_execute(
            "SELECT outbox.ack(delivery_id, attempt, 'dead', 400) FROM outbox.claim(100);",
        )
        .unwrap();
    // A delivery of each tenant in the history, as the worker writes them.
    admin
        .batch_execute(
            "INSERT INTO outbox.history (part, delivery_id, event_id, endpoint_id, tenant_id, event_type, payload, created_at)
             SELECT outbox._history_part(), gen_random_uuid(), 'h-' || e.tenant_id, e.id, e.tenant_id, 'a.b', '{}', now()
               FROM outbox.endpoint e",
        )
        .unwrap();
    admin
        .batch_execute(include_str!("../contrib/tenant_rls.sql"))
        .unwrap();

    let info = cluster
        .conninfo()
        .replace("user=postgres", "user=app_tenant");
    let mut app = postgres::Client::connect(&info, postgres::NoTls).unwrap();
    let count =
        |c: &mut postgres::Client, sql: &str| -> i64 { c.query_one(sql, &[]).unwrap().get(0) };
    assert_eq!(
        count(&mut app, "SELECT count(*) FROM outbox.delivery"),
        0,
        "no tenant set: nothing"
    );
    app.batch_execute("SET app.tenant_id = 'acme'").unwrap();
    assert_eq!(count(&mut app, "SELECT count(*) FROM outbox.delivery"), 3);
    assert_eq!(count(&mut app, "SELECT count(*) FROM outbox.event"), 3);
    assert_eq!(count(&mut app, "SELECT count(*) FROM outbox.attempt"), 3);
    assert_eq!(count(&mut app, "SELECT count(*) FROM outbox.endpoint"), 1);
    assert_eq!(count(&mut app, "SELECT count(*) FROM outbox.log"), 3);
    assert_eq!(count(&mut app, "SELECT count(*) FROM outbox.history"), 1);
    app.batch_execute("SET app.tenant_id = 'globex'").unwrap();
    assert_eq!(count(&mut app, "SELECT count(*) FROM outbox.delivery"), 2);
    assert_eq!(count(&mut app, "SELECT count(*) FROM outbox.log"), 2);
    assert_eq!(
        count(
            &mut app,
            "SELECT count(*) FROM outbox.history WHERE event_id = 'h-globex'"
        ),
        1
    );
    let err = app
        .batch_execute("SELECT secret FROM outbox.endpoint")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501");
    let err = app
        .batch_execute("UPDATE outbox.delivery SET status = 'pending'")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501");
    // Producers still append through outbox.trigger, which inserts as the writing role.
    admin
        .batch_execute(
            "CREATE ROLE app_writer LOGIN;
             SELECT outbox.grant_producer('app_writer');
             CREATE TABLE orders (id int PRIMARY KEY);
             GRANT INSERT ON orders TO app_writer;
             CREATE TRIGGER orders_outbox AFTER INSERT ON orders
                 FOR EACH ROW EXECUTE FUNCTION outbox.trigger('order');",
        )
        .unwrap();
    let mut writer = postgres::Client::connect(
        &cluster
            .conninfo()
            .replace("user=postgres", "user=app_writer"),
        postgres::NoTls,
    )
    .unwrap();
    writer
        .batch_execute("INSERT INTO orders VALUES (1)")
        .unwrap();
    assert_eq!(
        count(
            &mut admin,
            "SELECT count(*) FROM outbox.log WHERE event_type = 'order.created'"
        ),
        1
    );
    // Statistics filter by tenant too.
    let dead: i64 = admin
        .query_one(
            "SELECT dead FROM outbox.delivery_stats(tenant_id => 'acme')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(dead, 3);
}

/// What an operator's monitoring reads (tests/monitoring.rs checks the exporters' queries):
/// events not read yet count as unread, not as pending deliveries.
#[test]
fn metrics_tell_an_operator_what_is_unread_and_what_finished() {
    let cluster = Cluster::start(&[]);
    let mut admin = cluster.client();
    admin
        .batch_execute(
            "CREATE ROLE exporter LOGIN; SELECT outbox.grant_operator('exporter');
             SELECT outbox.create_endpoint('https://example.com/');
             SELECT outbox.enqueue('a.b', '{}') FROM generate_series(1, 4);",
        )
        .unwrap();
    admin
        .batch_execute(
            "SELECT outbox.ack(delivery_id, attempt, 'delivered', 200) FROM outbox.claim(3);",
        )
        .unwrap();
    admin
        .batch_execute("SELECT outbox.enqueue('a.unread', '{}')")
        .unwrap();
    let info = cluster.conninfo().replace("user=postgres", "user=exporter");
    let mut exporter = postgres::Client::connect(&info, postgres::NoTls).unwrap();
    // The event enqueued last is still unread: the claim above read only what came before.
    let unread: f64 = exporter
        .query_one(
            "SELECT value FROM outbox.metrics WHERE metric = 'outbox_log_unread'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(unread, 1.0);
    let delivered: f64 = exporter
        .query_one("SELECT value FROM outbox.metrics WHERE metric = 'outbox_finished_total' AND status = 'delivered'", &[])
        .unwrap()
        .get(0);
    assert_eq!(delivered, 3.0);
}
