//! The three jobs (producer, operator, admin) against a real cluster: each can do its work
//! and nothing else; no one but the owner and admins can read a secret; nothing is PUBLIC.

mod common;

use common::worker::read_log;
use common::{sqlstate, Cluster};

/// Runs `sql` and returns its SQLSTATE, or "ok".
fn attempt(c: &mut postgres::Client, sql: &str) -> String {
    match c.batch_execute(sql) {
        Ok(()) => "ok".into(),
        Err(e) => sqlstate(&e),
    }
}

fn setup() -> (Cluster, String) {
    let cluster = Cluster::start(&[]);
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE ROLE app_producer LOGIN; CREATE ROLE app_operator LOGIN;
         CREATE ROLE app_admin LOGIN; CREATE ROLE nobody LOGIN;
         SELECT outbox.grant_producer('app_producer'), outbox.grant_operator('app_operator'),
                outbox.grant_admin('app_admin');
         CREATE TABLE public.orders (id int PRIMARY KEY, total numeric);
         GRANT INSERT ON public.orders TO app_producer;
         CREATE TRIGGER orders_outbox AFTER INSERT ON public.orders
             FOR EACH ROW EXECUTE FUNCTION outbox.trigger('order');",
    )
    .unwrap();
    let ep: String = c
        .query_one(
            "SELECT outbox.create_endpoint('https://example.com/hook')::text",
            &[],
        )
        .unwrap()
        .get(0);
    (cluster, ep)
}

/// What every non-admin job must be refused.
fn assert_no_secrets_or_tables(c: &mut postgres::Client, ep: &str) {
    for sql in [
        format!("SELECT outbox.endpoint_secret('{ep}')"),
        "SELECT secret FROM outbox.endpoint".to_string(),
        "SELECT * FROM outbox.delivery".to_string(),
        "SELECT secret FROM outbox.claim(10)".to_string(),
        "SELECT outbox.create_endpoint('https://evil.example.com/')".to_string(),
        "CREATE TRIGGER t BEFORE UPDATE ON outbox.delivery FOR EACH ROW EXECUTE FUNCTION outbox.trigger()".to_string(),
        "UPDATE outbox.endpoint SET url = 'https://evil.example.com/'".to_string(),
    ] {
        assert_eq!(attempt(c, &sql), "42501", "must be refused: {sql}");
    }
}

#[test]
fn a_producer_can_enqueue_and_nothing_else() {
    let (cluster, ep) = setup();
    let mut p = cluster.client_as("app_producer");
    assert_eq!(attempt(&mut p, "SELECT outbox.enqueue('a.b', '{}')"), "ok");
    assert_eq!(
        attempt(&mut p, "INSERT INTO public.orders VALUES (1, 9.5)"),
        "ok",
        "through the trigger"
    );
    assert_no_secrets_or_tables(&mut p, &ep);
    // The log takes an event's own columns from a producer (what outbox.trigger inserts
    // as the writing user), never the transaction stamp, an id or a target, and is not
    // readable.
    assert_eq!(
        attempt(
            &mut p,
            "INSERT INTO outbox.log (event_type, payload) VALUES ('a.b', '{}')"
        ),
        "ok"
    );
    for sql in [
        "INSERT INTO outbox.log (txid, event_type, payload) VALUES ('1', 'a.b', '{}')",
        "INSERT INTO outbox.log (id, event_type, payload) VALUES ('forged', 'a.b', '{}')",
        &format!("INSERT INTO outbox.log (endpoint_id, event_type, payload) VALUES ('{ep}', 'a.b', '{{}}')"),
        "SELECT * FROM outbox.log",
        "DELETE FROM outbox.log",
        "SELECT outbox._read_log()",
    ] {
        assert_eq!(attempt(&mut p, sql), "42501", "must be refused: {sql}");
    }
    // Its check applies enqueue's rules to what a producer inserts by hand.
    assert_eq!(
        attempt(
            &mut p,
            "INSERT INTO outbox.log (event_type, payload) VALUES ('a*', '{}')"
        ),
        "22023"
    );
    assert_eq!(attempt(&mut p, "SELECT * FROM outbox.deliveries"), "42501");
    assert_eq!(attempt(&mut p, "SELECT * FROM outbox.stats()"), "42501");
    assert_eq!(
        attempt(&mut p, &format!("SELECT outbox.disable_endpoint('{ep}')")),
        "42501"
    );
    let mut admin = cluster.client();
    read_log(&mut admin);
    let n: i64 = admin
        .query_one("SELECT count(*) FROM outbox.delivery", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
}

#[test]
fn an_operator_can_watch_and_steer_but_not_read_secrets() {
    let (cluster, ep) = setup();
    let mut admin = cluster.client();
    admin
        .batch_execute("SELECT outbox.enqueue('a.b', '{}')")
        .unwrap();
    let mut o = cluster.client_as("app_operator");
    for sql in [
        "SELECT * FROM outbox.deliveries",
        "SELECT * FROM outbox.attempts",
        "SELECT * FROM outbox.dead_letters",
        "SELECT * FROM outbox.endpoints",
        "SELECT * FROM outbox.stats()",
        "SELECT * FROM outbox.delivery_stats('1 day')",
        "SELECT * FROM outbox.endpoint_stats()",
        "SELECT * FROM outbox.event_type_stats()",
        "SELECT * FROM outbox.endpoint_health",
        "SELECT * FROM outbox.recent_failures",
        "SELECT * FROM outbox.metrics",
        "SELECT outbox.retry_dead(since => '-infinity')",
    ] {
        assert_eq!(attempt(&mut o, sql), "ok", "{sql}");
    }
    assert_eq!(
        attempt(
            &mut o,
            &format!("SELECT outbox.replay('{ep}', now() - interval '1 hour')")
        ),
        "ok"
    );
    assert_eq!(
        attempt(
            &mut o,
            &format!("SELECT outbox.cancel(endpoint_id => '{ep}')")
        ),
        "ok"
    );
    assert_eq!(
        attempt(&mut o, "SELECT outbox.purge('1 day')"),
        "42501",
        "purging is for admins"
    );
    assert_eq!(
        attempt(
            &mut o,
            &format!("SELECT outbox.disable_endpoint('{ep}', 'maintenance')")
        ),
        "ok"
    );
    assert_eq!(
        attempt(&mut o, &format!("SELECT outbox.enable_endpoint('{ep}')")),
        "ok"
    );
    let cols: Vec<String> = o
        .query("SELECT * FROM outbox.endpoints LIMIT 1", &[])
        .unwrap()[0]
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    assert!(!cols.iter().any(|c| c.contains("secret")), "{cols:?}");
    assert_no_secrets_or_tables(&mut o, &ep);
    assert_eq!(
        attempt(&mut o, "SELECT outbox.enqueue('a.b', '{}')"),
        "42501"
    );
}

#[test]
fn an_admin_manages_endpoints_and_secrets() {
    let (cluster, ep) = setup();
    let mut a = cluster.client_as("app_admin");
    let secret: String = a
        .query_one(
            &format!("SELECT outbox.endpoint_secret('{ep}')") as &str,
            &[],
        )
        .unwrap()
        .get(0);
    assert!(secret.starts_with("whsec_"));
    assert_eq!(
        attempt(
            &mut a,
            "SELECT outbox.create_endpoint('https://example.com/2')"
        ),
        "ok"
    );
    assert_eq!(attempt(&mut a, "SELECT outbox.enqueue('a.b', '{}')"), "ok");
    assert_eq!(
        attempt(&mut a, "SELECT * FROM outbox.claim(10, 'admin')"),
        "ok"
    );
    assert_eq!(
        attempt(&mut a, &format!("SELECT outbox.delete_endpoint('{ep}')")),
        "ok"
    );
}

#[test]
fn nothing_is_granted_to_public() {
    let (cluster, ep) = setup();
    let mut n = cluster.client_as("nobody");
    assert_no_secrets_or_tables(&mut n, &ep);
    for sql in [
        "SELECT outbox.enqueue('a.b', '{}')",
        "SELECT * FROM outbox.deliveries",
        "SELECT * FROM outbox.stats()",
        "SELECT outbox.generate_secret()",
    ] {
        assert_eq!(attempt(&mut n, sql), "42501", "{sql}");
    }
    let mut admin = cluster.client();
    let public_grants: i64 = admin
        .query_one(
            "SELECT count(*) FROM (
                 SELECT p.oid FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                  WHERE p.pronamespace = 'outbox'::regnamespace AND a.grantee = 0
                 UNION ALL
                 SELECT c.oid FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
                  WHERE c.relnamespace = 'outbox'::regnamespace AND a.grantee = 0
             ) s",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        public_grants, 0,
        "no function, table or view of the extension is granted to PUBLIC"
    );
}

#[test]
fn the_worker_can_run_as_a_dedicated_unprivileged_role() {
    let cluster = Cluster::start(common::worker::FAST);
    let rx = outbox_receiver::Receiver::start().unwrap();
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE ROLE outbox_worker LOGIN; SELECT outbox.grant_worker('outbox_worker');",
    )
    .unwrap();
    c.batch_execute("ALTER SYSTEM SET outbox.worker_role = 'outbox_worker'")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    assert!(
        common::worker::wait_until(std::time::Duration::from_secs(20), || {
            c.query(
            "SELECT 1 FROM pg_stat_activity WHERE backend_type = 'webhook_outbox worker' AND usename = 'outbox_worker'",
            &[],
        )
        .map(|r| !r.is_empty())
        .unwrap_or(false)
        }),
        "the worker did not reconnect as outbox_worker:\n{}",
        cluster.log()
    );
    common::worker::endpoint(&mut c, &rx.url("/w"), "");
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    assert!(
        rx.wait_for(1, std::time::Duration::from_secs(10)),
        "{}",
        cluster.log()
    );
    assert!(common::worker::wait_settled(
        &cluster,
        std::time::Duration::from_secs(10)
    ));
    // It holds no privilege on any table of the extension.
    let tables: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'outbox'::regnamespace AND relkind = 'r'
                AND has_table_privilege('outbox_worker', oid, 'SELECT,INSERT,UPDATE,DELETE')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);
}
