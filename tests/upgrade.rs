//! Upgrading from earlier releases: install 0.1.0 (or 0.2.0), queue work in every state, run
//! ALTER EXTENSION ... UPDATE, and check that nothing queued was lost, the new functions
//! work, and the upgraded schema is exactly what a fresh install creates.

mod common;

use common::Cluster;

/// Everything about the extension's objects that a user could notice, one line each.
const SCHEMA: &str = "
    SELECT 'fn ' || p.oid::regprocedure::text || ' ' || pg_get_function_result(p.oid) || ' '
           || p.prosecdef || ' ' || coalesce(array_to_string(p.proconfig, ','), '') || ' '
           || md5(pg_get_functiondef(p.oid)) || ' ' || coalesce(p.proacl::text, 'default')
      FROM pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace
    UNION ALL
    SELECT 'col ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
           || ' ' || a.attnotnull || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
      FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE c.relnamespace = 'outbox'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT 'idx ' || indexdef FROM pg_indexes WHERE schemaname = 'outbox'
    UNION ALL
    SELECT 'view ' || viewname || ' ' || md5(definition) FROM pg_views WHERE schemaname = 'outbox'
    UNION ALL
    SELECT 'enum ' || t.typname || ' ' || string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
      FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
     WHERE t.typnamespace = 'outbox'::regnamespace GROUP BY t.typname
    UNION ALL
    SELECT 'comment ' || coalesce(c.relname || '.' || d.objsubid, p.oid::regprocedure::text) || ' '
           || md5(d.description)
      FROM pg_description d
      LEFT JOIN pg_class c ON d.classoid = 'pg_class'::regclass AND c.oid = d.objoid
      LEFT JOIN pg_proc p ON d.classoid = 'pg_proc'::regclass AND p.oid = d.objoid
     WHERE coalesce(c.relnamespace, p.pronamespace) = 'outbox'::regnamespace
    UNION ALL
    SELECT 'acl ' || c.relname || ' ' || coalesce(c.relacl::text, 'default')
      FROM pg_class c WHERE c.relnamespace = 'outbox'::regnamespace
    ORDER BY 1";

fn schema(c: &mut postgres::Client) -> Vec<String> {
    common::lines(c, SCHEMA)
}

/// A cluster with the extension at `version`, `setup` run (roles, grants), and one
/// endpoint, whose id is returned.
fn install(version: &str, setup: &str) -> (Cluster, postgres::Client, String) {
    let cluster = Cluster::start_empty(&[]);
    let mut c = cluster.client();
    c.batch_execute(&format!(
        "CREATE EXTENSION webhook_outbox VERSION '{version}'; {setup}"
    ))
    .unwrap();
    let ep: String = c
        .query_one(
            "SELECT outbox.create_endpoint('https://example.com/hook')::text",
            &[],
        )
        .unwrap()
        .get(0);
    (cluster, c, ep)
}

/// Each delivery as one line of the given columns, in id order.
fn deliveries(c: &mut postgres::Client, columns: &str) -> Vec<String> {
    common::lines(
        c,
        &format!("SELECT concat_ws('|', {columns}) FROM outbox.delivery ORDER BY id"),
    )
}

#[test]
fn upgrading_from_0_1_0_keeps_the_queue_and_matches_a_fresh_install() {
    let (cluster, mut c, ep) = install(
        "0.1.0",
        "CREATE ROLE oncall LOGIN; SELECT outbox.grant_operator('oncall');",
    );
    c.batch_execute(
        "SELECT outbox.enqueue('order.created', jsonb_build_object('n', g), event_id => 'evt-' || g)
           FROM generate_series(1, 10) g;
         SELECT outbox.ack(delivery_id, attempt, 'delivered', 200) FROM outbox.claim(3, 'old');
         SELECT outbox.ack(delivery_id, attempt, 'dead', 400) FROM outbox.claim(2, 'old');",
    )
    .unwrap();
    let held = c
        .query_one(
            "SELECT delivery_id::text, attempt FROM outbox.claim(1, 'old')",
            &[],
        )
        .unwrap();
    let (held_id, held_attempt): (String, i32) = (held.get(0), held.get(1));
    let before = deliveries(&mut c, "id, status, attempts");

    c.batch_execute("ALTER EXTENSION webhook_outbox UPDATE")
        .unwrap();
    let version: String = c
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'webhook_outbox'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(version, env!("CARGO_PKG_VERSION"));

    // Nothing queued was lost or changed.
    let after = deliveries(&mut c, "id, status, attempts");
    assert_eq!(before, after);
    // The lease taken before the upgrade is still honoured, and the rest can be claimed.
    c.batch_execute(&format!(
        "SELECT outbox.ack('{held_id}', {held_attempt}, 'delivered', 200)"
    ))
    .unwrap();
    let rest = c.query("SELECT outbox.ack(delivery_id, attempt, 'delivered', 200) FROM outbox.claim(100, 'new')", &[]).unwrap();
    assert_eq!(rest.len(), 4);
    // Idempotency still holds across the upgrade.
    let again = c
        .query(
            "SELECT * FROM outbox.enqueue('order.created', jsonb_build_object('n', 1), event_id => 'evt-1')",
            &[],
        )
        .unwrap();
    assert_eq!(again.len(), 1);
    // The new functions work.
    let replayed: i64 = c
        .query_one(
            &format!("SELECT outbox.replay('{ep}', now() - interval '1 hour')") as &str,
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(replayed, 8);
    let retried: i64 = c
        .query_one(
            &format!("SELECT outbox.retry_dead(endpoint_id => '{ep}')") as &str,
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(retried, 2);
    let total: i64 = c
        .query_one("SELECT total FROM outbox.delivery_stats()", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        total, 5,
        "deliveries finished after the upgrade are counted"
    );

    // A role granted a 0.1.0 function keeps it through the upgrade.
    let mut oncall = cluster.client_as("oncall");
    let per_minute: i64 = oncall
        .query_one("SELECT delivered_last_minute FROM outbox.stats()", &[])
        .unwrap()
        .get(0);
    assert_eq!(per_minute, 8);

    // The upgraded schema is what a fresh install creates (after the same grant).
    c.batch_execute("CREATE DATABASE fresh").unwrap();
    let mut fresh = cluster.client_to("fresh");
    fresh
        .batch_execute("CREATE EXTENSION webhook_outbox; SELECT outbox.grant_operator('oncall');")
        .unwrap();
    // grant_operator in 0.2.0 grants more than in 0.1.0; grant it on the upgraded side too.
    c.batch_execute("SELECT outbox.grant_operator('oncall')")
        .unwrap();
    assert_same_schema(&mut c, &mut fresh);
}

fn assert_same_schema(upgraded: &mut postgres::Client, fresh: &mut postgres::Client) {
    let (upgraded, installed) = (schema(upgraded), schema(fresh));
    let only_upgraded: Vec<&String> = upgraded.iter().filter(|l| !installed.contains(l)).collect();
    let only_fresh: Vec<&String> = installed.iter().filter(|l| !upgraded.contains(l)).collect();
    assert!(
        only_upgraded.is_empty() && only_fresh.is_empty(),
        "schemas differ:\nonly after upgrade: {only_upgraded:#?}\nonly in a fresh install: {only_fresh:#?}"
    );
}

#[test]
fn upgrading_from_0_2_0_gives_every_endpoint_a_circuit_and_keeps_grants() {
    let (cluster, mut c, ep) = install(
        "0.2.0",
        "CREATE ROLE platform LOGIN; SELECT outbox.grant_admin('platform');",
    );
    // Work in every state, and a failure streak in progress.
    c.batch_execute(
        "SELECT outbox.enqueue('order.created', jsonb_build_object('n', g)) FROM generate_series(1, 10) g;
         SELECT outbox.ack(delivery_id, attempt, 'delivered', 200) FROM outbox.claim(2, 'old');
         SELECT outbox.ack(delivery_id, attempt, 'retry', 503, retry_at => now() - interval '1 second')
           FROM outbox.claim(3, 'old');
         SELECT count(*) FROM outbox.claim(1, 'old');",
    )
    .unwrap();
    let before = deliveries(&mut c, "id, status, attempts, due_at");

    c.batch_execute("ALTER EXTENSION webhook_outbox UPDATE")
        .unwrap();

    let after = deliveries(&mut c, "id, status, attempts, due_at");
    assert_eq!(before, after, "queued work is untouched");
    let state = c
        .query_one(
            &format!(
                "SELECT circuit::text, consecutive_failures, failing_since IS NOT NULL
                   FROM outbox.endpoint_state WHERE endpoint_id = '{ep}'"
            ),
            &[],
        )
        .unwrap();
    assert_eq!(state.get::<_, String>(0), "closed");
    assert_eq!(state.get::<_, i32>(1), 3);
    assert!(
        state.get::<_, bool>(2),
        "a failing endpoint counts as failing"
    );
    // The new claim takes everything due: the 3 retries and the 4 never tried (2 were
    // delivered, 1 is held by its lease).
    let claimed = c
        .query("SELECT * FROM outbox.claim(100, 'new')", &[])
        .unwrap();
    assert_eq!(claimed.len(), 7);

    // The admin granted before the upgrade can use the new arguments.
    let mut admin = cluster.client_as("platform");
    admin
        .batch_execute(
            "SELECT outbox.create_endpoint('https://example.com/ordered', ordered => true, rate_limit => 10);
             SELECT outbox.update_endpoint(id, max_in_flight => 4) FROM outbox.endpoints;",
        )
        .unwrap();

    c.batch_execute("CREATE DATABASE fresh").unwrap();
    let mut fresh = cluster.client_to("fresh");
    fresh
        .batch_execute("CREATE EXTENSION webhook_outbox; SELECT outbox.grant_admin('platform');")
        .unwrap();
    assert_same_schema(&mut c, &mut fresh);
}

#[test]
fn a_new_worker_delivers_with_the_old_sql_until_the_update() {
    let cluster = Cluster::start_empty(common::worker::FAST);
    let rx = outbox_receiver::Receiver::start().unwrap();
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION webhook_outbox VERSION '0.1.0'")
        .unwrap();
    common::worker::endpoint(&mut c, &rx.url("/old"), "");
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    assert!(
        rx.wait_for(1, std::time::Duration::from_secs(15)),
        "{}",
        cluster.log()
    );
    assert!(common::worker::wait_settled(
        &cluster,
        std::time::Duration::from_secs(10)
    ));
    assert!(
        cluster
            .log()
            .contains("run ALTER EXTENSION webhook_outbox UPDATE"),
        "{}",
        cluster.log()
    );
    c.batch_execute("ALTER EXTENSION webhook_outbox UPDATE")
        .unwrap();
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    assert!(
        rx.wait_for(2, std::time::Duration::from_secs(15)),
        "{}",
        cluster.log()
    );
}

#[test]
fn upgrading_from_0_3_0_keeps_a_queue_in_every_state() {
    let (cluster, mut c, ep) = install(
        "0.3.0",
        "CREATE ROLE sender LOGIN; SELECT outbox.grant_worker('sender');
         CREATE ROLE oncall LOGIN; SELECT outbox.grant_operator('oncall');",
    );
    let ordered: String = c
        .query_one(
            "SELECT outbox.create_endpoint('https://example.com/ordered', ordered => true, tenant_id => 'acme')::text",
            &[],
        )
        .unwrap()
        .get(0);
    // Pending, delivered, dead, retrying, in flight; an ordered endpoint whose head is in
    // flight with two behind it; the same caller id enqueued by two tenants (0.3.0 mixed
    // them up); and a due time of 'infinity' (0.3.0 accepted it).
    c.batch_execute(&format!(
        "SELECT outbox.enqueue('order.created', jsonb_build_object('n', g), event_id => 'evt-' || g) FROM generate_series(1, 10) g;
         SELECT outbox.ack(delivery_id, attempt, 'delivered', 200) FROM outbox.claim(2, 'old', endpoint_id => '{ep}');
         SELECT outbox.ack(delivery_id, attempt, 'dead', 400) FROM outbox.claim(2, 'old', endpoint_id => '{ep}');
         SELECT outbox.ack(delivery_id, attempt, 'retry', 503, retry_at => now() - interval '1 second')
           FROM outbox.claim(2, 'old', endpoint_id => '{ep}');
         SELECT outbox.enqueue('order.created', jsonb_build_object('n', g), tenant_id => 'acme') FROM generate_series(1, 3) g;
         SELECT count(*) FROM outbox.claim(1, 'old', endpoint_id => '{ordered}');
         SELECT outbox.enqueue('order.created', '{{\"tenant\": \"acme\"}}', event_id => 'shared-id', tenant_id => 'acme');
         SELECT outbox.enqueue('order.created', '{{\"tenant\": \"none\"}}', event_id => 'shared-id');
         SELECT outbox.enqueue('later', '{{}}', event_id => 'never', deliver_at => 'infinity');"
    ))
    .unwrap();
    let held = c
        .query_one(
            &format!("SELECT delivery_id::text, attempt FROM outbox.claim(1, 'old', endpoint_id => '{ep}')"),
            &[],
        )
        .unwrap();
    let (held_id, held_attempt): (String, i32) = (held.get(0), held.get(1));
    let before = deliveries(
        &mut c,
        "id, event_id, endpoint_id, status, attempts, CASE WHEN isfinite(due_at) THEN due_at END, seq",
    );

    c.batch_execute("ALTER EXTENSION webhook_outbox UPDATE")
        .unwrap();

    let after = deliveries(
        &mut c,
        "id, event_id, endpoint_id, status, attempts, CASE WHEN isfinite(due_at) THEN due_at END, seq",
    );
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        if b.contains("|never|") {
            // The infinite due time became an ordinary one.
            assert!(a.split('|').nth(5).is_some_and(|d| !d.is_empty()), "{a}");
        } else {
            assert_eq!(b, a, "queued work is untouched");
        }
    }
    // Each tenant's delivery of 'shared-id' now has an event of its own tenant.
    assert_eq!(
        c.query_one(
            "SELECT count(DISTINCT (d.tenant_id, ev.tenant_id)) FROM outbox.delivery d
               JOIN outbox.event ev ON ev.id = d.event_id AND ev.tenant_key = d.tenant_key
              WHERE d.event_id = 'shared-id'",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0),
        2
    );
    // The lease taken before the upgrade is honoured; the rest of the queue can be taken,
    // the ordered endpoint's head (still in flight) holding back what is behind it.
    c.batch_execute(&format!(
        "SELECT outbox.ack('{held_id}', {held_attempt}, 'delivered', 200)"
    ))
    .unwrap();
    let taken: Vec<String> = c
        .query(
            "SELECT endpoint_id::text FROM outbox.claim(100, 'new')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        taken.iter().filter(|e| **e == ep).count(),
        // Of the ten: 2 retrying and 3 never tried (2 delivered, 2 dead, 1 held); and the
        // untenanted 'shared-id'. Not 'never', now due a year ahead.
        6,
        "{taken:?}"
    );
    assert!(!taken.contains(&ordered), "{taken:?}");
    // A role granted the worker's functions before can run the new ones.
    let mut sender = cluster.client_as("sender");
    sender
        .batch_execute(
            "SELECT outbox._requeue_orphaned(); SELECT outbox._lock_for_ack('{}'::uuid[]);",
        )
        .unwrap();

    c.batch_execute("CREATE DATABASE fresh").unwrap();
    let mut fresh = cluster.client_to("fresh");
    fresh
        .batch_execute(
            "CREATE EXTENSION webhook_outbox;
             SELECT outbox.grant_worker('sender'); SELECT outbox.grant_operator('oncall');",
        )
        .unwrap();
    assert_same_schema(&mut c, &mut fresh);
}

#[test]
fn upgrading_from_0_3_1_keeps_a_queue_in_every_state_and_adds_the_log() {
    let (cluster, mut c, ep) = install(
        "0.3.1",
        "CREATE ROLE app LOGIN; SELECT outbox.grant_producer('app');
         CREATE ROLE sender LOGIN; SELECT outbox.grant_worker('sender');
         CREATE ROLE oncall LOGIN; SELECT outbox.grant_operator('oncall');
         CREATE TABLE public.orders (id int, total numeric);
         GRANT INSERT ON public.orders TO app;
         CREATE TRIGGER orders_outbox AFTER INSERT ON public.orders
             FOR EACH ROW EXECUTE FUNCTION outbox.trigger('order');",
    );
    let ordered: String = c
        .query_one(
            "SELECT outbox.create_endpoint('https://example.com/ordered', ordered => true)::text",
            &[],
        )
        .unwrap()
        .get(0);
    // Delivered, dead, retrying, in flight, pending; an ordered endpoint's head in flight
    // with two behind it; one due tomorrow.
    c.batch_execute(&format!(
        "SELECT outbox.enqueue('order.created', jsonb_build_object('n', g), event_id => 'evt-' || g, endpoint_id => '{ep}')
           FROM generate_series(1, 8) g;
         SELECT outbox.ack(delivery_id, attempt, 'delivered', 200) FROM outbox.claim(2, 'old', endpoint_id => '{ep}');
         SELECT outbox.ack(delivery_id, attempt, 'dead', 400) FROM outbox.claim(2, 'old', endpoint_id => '{ep}');
         SELECT outbox.ack(delivery_id, attempt, 'retry', 503, retry_at => now() - interval '1 second')
           FROM outbox.claim(2, 'old', endpoint_id => '{ep}');
         SELECT outbox.enqueue('order.created', jsonb_build_object('n', g), endpoint_id => '{ordered}') FROM generate_series(1, 3) g;
         SELECT count(*) FROM outbox.claim(1, 'old', endpoint_id => '{ordered}');
         SELECT outbox.enqueue('later', '{{}}', event_id => 'later', endpoint_id => '{ep}', deliver_at => now() + interval '1 day');"
    ))
    .unwrap();
    let held = c
        .query_one(
            &format!("SELECT delivery_id::text, attempt FROM outbox.claim(1, 'old', endpoint_id => '{ep}')"),
            &[],
        )
        .unwrap();
    let (held_id, held_attempt): (String, i32) = (held.get(0), held.get(1));
    let columns = "id, event_id, endpoint_id, status, attempts, due_at, seq";
    let before = deliveries(&mut c, columns);

    c.batch_execute("ALTER EXTENSION webhook_outbox UPDATE")
        .unwrap();
    assert_eq!(
        deliveries(&mut c, columns),
        before,
        "queued work is untouched"
    );

    // The lease taken before the upgrade is honoured; what is due can be taken (2 retrying,
    // 1 never tried), the ordered endpoint's head still holding back the two behind it.
    c.batch_execute(&format!(
        "SELECT outbox.ack('{held_id}', {held_attempt}, 'delivered', 200)"
    ))
    .unwrap();
    let taken: Vec<String> = c
        .query(
            "SELECT endpoint_id::text FROM outbox.claim(100, 'new')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(taken.iter().filter(|e| **e == ep).count(), 3, "{taken:?}");
    assert!(!taken.contains(&ordered), "{taken:?}");

    // Ids callers gave before the upgrade are still known: enqueueing one again appends
    // nothing, and the same id with another payload is refused.
    let logged = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM outbox.log", &[])
            .unwrap()
            .get(0)
    };
    let before_log = logged(&mut c);
    c.batch_execute(&format!(
        "SELECT outbox.enqueue('order.created', jsonb_build_object('n', 2), event_id => 'evt-2', endpoint_id => '{ep}')"
    ))
    .unwrap();
    assert_eq!(logged(&mut c), before_log, "a known id appended again");
    let refused = c
        .batch_execute(&format!(
            "SELECT outbox.enqueue('order.created', jsonb_build_object('n', 99), event_id => 'evt-2', endpoint_id => '{ep}')"
        ))
        .unwrap_err();
    assert_eq!(
        refused.code().map(|c| c.code().to_string()).as_deref(),
        Some("23505"),
        "{refused}"
    );

    // A producer granted before the upgrade writes through the trigger into the log, and
    // the next claim reads it.
    let mut app = cluster.client_as("app");
    app.batch_execute("INSERT INTO public.orders VALUES (1, 9.5)")
        .unwrap();
    let new: Vec<String> = c
        .query(
            &format!("SELECT event_type FROM outbox.claim(10, 'new', endpoint_id => '{ep}')"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(new, ["order.created"]);
    let mut sender = cluster.client_as("sender");
    sender
        .batch_execute("SELECT outbox._rotate_log(); SELECT outbox._read_log();")
        .unwrap();

    c.batch_execute("CREATE DATABASE fresh").unwrap();
    let mut fresh = cluster.client_to("fresh");
    fresh
        .batch_execute(
            "CREATE EXTENSION webhook_outbox;
             SELECT outbox.grant_producer('app'); SELECT outbox.grant_worker('sender');
             SELECT outbox.grant_operator('oncall');",
        )
        .unwrap();
    assert_same_schema(&mut c, &mut fresh);
}
