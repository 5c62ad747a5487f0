// SQL behaviour of the extension, run by `cargo pgrx test` inside a real PostgreSQL with the
// extension created (included into `mod tests` in lib.rs). Each test runs in a transaction
// that is rolled back afterwards, so `now()` is fixed within a test; behaviour across time
// and connections is covered by the whole-system tests in `tests/`.

use pgrx::prelude::*;

/// Runs `sql` and returns "SQLSTATE message" if it failed, or `None` if it succeeded. The
/// statement runs in a subtransaction, so a refusal leaves nothing behind.
fn error_of(sql: &str) -> Option<String> {
    Spi::run(
        "CREATE OR REPLACE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS $$
         BEGIN EXECUTE q; RETURN NULL;
         EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ' ' || SQLERRM; END $$",
    )
    .unwrap();
    Spi::get_one_with_args::<String>("SELECT pg_temp.sqlstate_of($1)", &[sql.into()]).unwrap()
}

/// The SQLSTATE `sql` failed with, or `None` if it succeeded.
fn sqlstate_of(sql: &str) -> Option<String> {
    error_of(sql).map(|s| s.split_once(' ').map(|(code, _)| code.to_string()).unwrap_or(s))
}

fn assert_refused(sql: &str, code: &str) {
    assert_eq!(sqlstate_of(sql).as_deref(), Some(code), "expected SQLSTATE {code} from: {sql}");
}

fn count(sql: &str) -> i64 {
    Spi::get_one::<i64>(sql).unwrap().unwrap()
}

fn text(sql: &str) -> String {
    Spi::get_one::<String>(sql).unwrap().unwrap()
}

/// Fans out the events this test's transaction enqueued since the last call, as the worker
/// (or `outbox.claim`) does for every transaction once it commits: a pg_test never commits,
/// so its own events are never in a batch. Returns how many deliveries were made.
fn fan_out() -> i64 {
    count(
        "WITH mine AS (
             SELECT l FROM outbox.log l
              WHERE l.txid = pg_current_xact_id()
                AND l.seq > coalesce(nullif(current_setting('webhook_outbox_test.fanned', true), ''), '0')::bigint)
         SELECT coalesce(outbox._fan_out((SELECT array_agg(m.l ORDER BY (m.l).seq) FROM mine m)), 0)::int8
                + 0 * length(set_config('webhook_outbox_test.fanned',
                                        (SELECT coalesce(max((m.l).seq), 0)::text FROM mine m), true))",
    )
}

/// Runs an enqueue statement and fans its events out; returns how many deliveries it made.
fn enqueued(sql: &str) -> i64 {
    Spi::run(sql).unwrap();
    fan_out()
}

fn endpoint(url: &str, extra: &str) -> String {
    text(&format!("SELECT outbox.create_endpoint('{url}'{extra})::text"))
}

#[pg_test]
fn create_endpoint_generates_a_standard_secret() {
    let id = endpoint("https://example.com/hooks", "");
    let secret = text(&format!("SELECT outbox.endpoint_secret('{id}')"));
    assert!(secret.starts_with("whsec_"));
    assert!(outbox_core::signing::SigningKey::parse(&secret).is_ok());
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD.decode(&secret[6..]).unwrap();
    assert_eq!(key.len(), 32);
    let other = endpoint("https://example.com/other", "");
    assert_ne!(secret, text(&format!("SELECT outbox.endpoint_secret('{other}')")));
    // The view people read has no secret in it.
    assert_eq!(
        count("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'outbox' AND table_name = 'endpoints' AND column_name = 'secret'"),
        0
    );
    assert_eq!(text(&format!("SELECT url FROM outbox.endpoints WHERE id = '{id}'")), "https://example.com/hooks");
}

#[pg_test]
fn create_endpoint_with_a_uid_can_run_again() {
    let create = "SELECT outbox.create_endpoint('https://Example.com/hooks', event_types => '{order.*}', \
                  uid => 'orders-hook')::text";
    let id = text(create);
    // Run again (a deploy script run twice): the same endpoint, not a second one; the URL
    // compares as stored (normalised), the generated secret is not compared.
    assert_eq!(text(create), id);
    assert_eq!(count("SELECT count(*) FROM outbox.endpoints WHERE uid = 'orders-hook'"), 1);
    // Other settings under the same key are refused, with the id to update.
    assert_refused(
        "SELECT outbox.create_endpoint('https://example.com/other', event_types => '{order.*}', uid => 'orders-hook')",
        "23505",
    );
    assert_refused(
        "SELECT outbox.create_endpoint('https://example.com/hooks', event_types => '{order.*}', uid => 'orders-hook', \
                                       secret => 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')",
        "23505",
    );
    // Disabled since (by an operator or auto-disable): still the same endpoint.
    Spi::run(&format!("SELECT outbox.disable_endpoint('{id}')")).unwrap();
    assert_eq!(text(create), id);
    // The key is the tenant's own; a deleted endpoint's key is free again.
    let acme = text(
        "SELECT outbox.create_endpoint('https://example.com/hooks', event_types => '{order.*}', \
                uid => 'orders-hook', tenant_id => 'acme')::text",
    );
    assert_ne!(acme, id);
    Spi::run(&format!("SELECT outbox.delete_endpoint('{id}')")).unwrap();
    let again = text(create);
    assert_ne!(again, id);
    assert_eq!(count("SELECT count(*) FROM outbox.endpoints WHERE uid = 'orders-hook'"), 2);
    // Without a uid every call makes an endpoint; a uid must be 1 to 256 characters.
    let plain = "SELECT outbox.create_endpoint('https://example.com/plain')::text";
    assert_ne!(text(plain), text(plain));
    assert_refused("SELECT outbox.create_endpoint('https://example.com/x', uid => '')", "22023");
    assert_refused(
        "SELECT outbox.create_endpoint('https://example.com/x', uid => repeat('u', 257))",
        "22023",
    );
}

/// An endpoint made before deploy scripts used keys can be given one, and the key moved or
/// removed; a key another live endpoint of the tenant holds is refused with 23505.
#[pg_test]
fn update_endpoint_sets_moves_and_removes_a_uid() {
    let old = text("SELECT outbox.create_endpoint('https://example.com/hooks', event_types => '{order.*}')::text");
    Spi::run(&format!("SELECT outbox.update_endpoint('{old}', uid => 'orders-hook')")).unwrap();
    // The deploy script now finds it under its key instead of making a second endpoint.
    assert_eq!(
        text("SELECT outbox.create_endpoint('https://example.com/hooks', event_types => '{order.*}', uid => 'orders-hook')::text"),
        old
    );
    let other = text("SELECT outbox.create_endpoint('https://example.com/other', uid => 'other-hook')::text");
    assert_refused(&format!("SELECT outbox.update_endpoint('{other}', uid => 'orders-hook')"), "23505");
    assert_refused(&format!("SELECT outbox.update_endpoint('{other}', uid => repeat('u', 257))"), "22023");
    assert_eq!(text(&format!("SELECT uid FROM outbox.endpoints WHERE id = '{other}'")), "other-hook");
    // NULL leaves it; '' removes it, and the key is free for another endpoint.
    Spi::run(&format!("SELECT outbox.update_endpoint('{old}', description => 'kept')")).unwrap();
    assert_eq!(text(&format!("SELECT uid FROM outbox.endpoints WHERE id = '{old}'")), "orders-hook");
    Spi::run(&format!("SELECT outbox.update_endpoint('{old}', uid => '')")).unwrap();
    assert_eq!(count(&format!("SELECT count(*) FROM outbox.endpoints WHERE id = '{old}' AND uid IS NULL")), 1);
    Spi::run(&format!("SELECT outbox.update_endpoint('{other}', uid => 'orders-hook')")).unwrap();
    assert_eq!(text("SELECT id::text FROM outbox.endpoints WHERE uid = 'orders-hook'"), other);
}

#[pg_test]
fn create_endpoint_keeps_given_settings() {
    let id = endpoint(
        "https://Example.com:8443/a?b=c",
        ", event_types => '{order.*,user.created}', secret => 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', \
           headers => '{\"Authorization\": \"Bearer t\"}', timeout => '5 seconds', tenant_id => 'acme', description => 'orders'",
    );
    let row = text(&format!(
        "SELECT concat_ws('|', url, event_types::text, headers::text, timeout::text, tenant_id, description, enabled)
           FROM outbox.endpoints WHERE id = '{id}'"
    ));
    assert_eq!(
        row,
        "https://example.com:8443/a?b=c|{order.*,user.created}|{\"Authorization\": \"Bearer t\"}|00:00:05|acme|orders|t"
    );
    assert_eq!(
        text(&format!("SELECT outbox.endpoint_secret('{id}')")),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    );
    // '*' anywhere means "everything" and is stored as NULL.
    let all = endpoint("https://example.com/all", ", event_types => '{a.b,*}'");
    assert_eq!(count(&format!("SELECT count(*) FROM outbox.endpoints WHERE id = '{all}' AND event_types IS NULL")), 1);
}

#[pg_test]
fn create_endpoint_refuses_bad_input() {
    assert_refused("SELECT outbox.create_endpoint('not a url')", "22P02");
    assert_refused("SELECT outbox.create_endpoint('example.com/hook')", "22P02");
    assert_refused("SELECT outbox.create_endpoint('ftp://example.com/x')", "22023");
    assert_refused("SELECT outbox.create_endpoint('https://user:pw@example.com/x')", "22023");
    assert_refused("SELECT outbox.create_endpoint(NULL)", "23502");
    assert_refused("SELECT outbox.create_endpoint('https://e.com', secret => 'secret')", "22023");
    assert_refused("SELECT outbox.create_endpoint('https://e.com', secret => 'whsec_c2hvcnQ=')", "22023");
    assert_refused("SELECT outbox.create_endpoint('https://e.com', event_types => '{}')", "22023");
    assert_refused("SELECT outbox.create_endpoint('https://e.com', event_types => '{\"a*b\"}')", "22023");
    assert_refused("SELECT outbox.create_endpoint('https://e.com', headers => '[1]')", "22023");
    assert_refused(
        "SELECT outbox.create_endpoint('https://e.com', headers => '{\"webhook-signature\": \"x\"}')",
        "22023",
    );
    assert_refused(
        "SELECT outbox.create_endpoint('https://e.com', headers => '{\"X-A\": \"a\\r\\nB: c\"}')",
        "22023",
    );
    assert_refused("SELECT outbox.create_endpoint('https://e.com', timeout => '0')", "22023");
    assert_refused("SELECT outbox.create_endpoint('https://e.com', timeout => '1 hour')", "22023");
    assert_refused("SELECT outbox.create_endpoint('https://e.com', tenant_id => '')", "22023");
    assert_eq!(count("SELECT count(*) FROM outbox.endpoint"), 0, "refusals leave nothing behind");
    let msg = error_of("SELECT outbox.create_endpoint('ftp://example.com/x')").unwrap();
    assert!(msg.contains("http or https"), "{msg}");
}

#[pg_test]
fn endpoints_can_be_updated_disabled_enabled_and_deleted() {
    let id = endpoint("https://example.com/a", "");
    Spi::run(&format!(
        "SELECT outbox.update_endpoint('{id}', url => 'https://example.com/b', event_types => '{{x.*}}', timeout => '2s', description => 'd')"
    ))
    .unwrap();
    assert_eq!(
        text(&format!("SELECT concat_ws('|', url, event_types::text, timeout::text, description) FROM outbox.endpoints WHERE id = '{id}'")),
        "https://example.com/b|{x.*}|00:00:02|d"
    );
    Spi::run(&format!("SELECT outbox.update_endpoint('{id}', event_types => '{{*}}', timeout => '0')")).unwrap();
    assert_eq!(
        count(&format!("SELECT count(*) FROM outbox.endpoints WHERE id = '{id}' AND event_types IS NULL AND timeout IS NULL")),
        1
    );
    assert_refused(&format!("SELECT outbox.update_endpoint('{id}', url => 'gopher://x')"), "22023");

    Spi::run(&format!("SELECT outbox.disable_endpoint('{id}', 'maintenance')")).unwrap();
    assert_eq!(text(&format!("SELECT concat_ws('|', enabled, disabled_reason) FROM outbox.endpoints WHERE id = '{id}'")), "f|maintenance");
    Spi::run(&format!("SELECT outbox.enable_endpoint('{id}')")).unwrap();
    assert_eq!(text(&format!("SELECT concat_ws('|', enabled, disabled_reason) FROM outbox.endpoints WHERE id = '{id}'")), "t");

    let missing = "00000000-0000-0000-0000-000000000000";
    for f in ["enable_endpoint", "disable_endpoint", "delete_endpoint", "endpoint_secret"] {
        assert_refused(&format!("SELECT outbox.{f}('{missing}')"), "P0002");
    }
    assert_refused(&format!("SELECT outbox.update_endpoint('{missing}', url => 'https://x.com')"), "P0002");
}

#[pg_test]
fn deleting_an_endpoint_cancels_its_unfinished_deliveries() {
    let id = endpoint("https://example.com/a", "");
    let keep = endpoint("https://example.com/b", "");
    for i in 0..3 {
        Spi::run(&format!("SELECT outbox.enqueue('t.{i}', '{{}}')")).unwrap();
        fan_out();
    }
    // One is in flight at the moment of deletion; its late ack must be refused.
    let claimed = text(&format!(
        "SELECT delivery_id::text FROM outbox.claim(1, endpoint_id => '{id}')"
    ));
    assert_eq!(count(&format!("SELECT outbox.delete_endpoint('{id}')")), 3);
    assert_eq!(count(&format!("SELECT count(*) FROM outbox.delivery WHERE endpoint_id = '{id}' AND status = 'cancelled'")), 3);
    assert_eq!(count(&format!("SELECT count(*) FROM outbox.delivery WHERE endpoint_id = '{keep}' AND status = 'pending'")), 3);
    assert_refused(&format!("SELECT outbox.ack('{claimed}', 1, 'delivered')"), "55000");
    assert_eq!(count(&format!("SELECT count(*) FROM outbox.endpoints WHERE id = '{id}'")), 0);
    assert_refused(&format!("SELECT outbox.enqueue('t', '{{}}', endpoint_id => '{id}')"), "P0002");
    // History still resolves to the endpoint's URL.
    assert_eq!(count(&format!("SELECT count(*) FROM outbox.deliveries WHERE endpoint_id = '{id}' AND endpoint_url = 'https://example.com/a'")), 3);
}

#[pg_test]
fn enqueue_fans_out_to_matching_enabled_endpoints() {
    let all = endpoint("https://example.com/all", "");
    let orders = endpoint("https://example.com/orders", ", event_types => '{order.*}'");
    let users = endpoint("https://example.com/users", ", event_types => '{user.created}'");
    let off = endpoint("https://example.com/off", ", enabled => false");
    let tenant = endpoint("https://example.com/acme", ", tenant_id => 'acme'");

    let n = enqueued("SELECT outbox.enqueue('order.created', '{\"id\": 1}')");
    assert_eq!(n, 2);
    let got = text("SELECT string_agg(endpoint_id::text, ',' ORDER BY endpoint_id) FROM outbox.delivery");
    let mut want = [all.clone(), orders.clone()];
    want.sort();
    assert_eq!(got, want.join(","));

    assert_eq!(enqueued("SELECT outbox.enqueue('user.created', '{}')"), 2);
    assert_eq!(enqueued("SELECT outbox.enqueue('user.deleted', '{}')"), 1);
    assert_eq!(enqueued("SELECT outbox.enqueue('orders', '{}')"), 1, "'order.*' needs the dot");
    assert_eq!(enqueued("SELECT outbox.enqueue('order.created', '{}', tenant_id => 'acme')"), 1);
    assert_eq!(count(&format!("SELECT count(*) FROM outbox.delivery WHERE endpoint_id = '{tenant}' AND tenant_id = 'acme'")), 1);
    assert_eq!(count(&format!("SELECT count(*) FROM outbox.delivery WHERE endpoint_id IN ('{users}', '{off}') AND event_id IS NULL")), 0);
    assert_eq!(count(&format!("SELECT count(*) FROM outbox.delivery WHERE endpoint_id = '{off}'")), 0);

    // Naming an endpoint bypasses its filter and its enabled flag.
    assert_eq!(enqueued(&format!("SELECT outbox.enqueue('x.y', '{{}}', endpoint_id => '{off}')")), 1);
    // Nobody subscribed: nothing stored.
    let events = count("SELECT count(*) FROM outbox.event");
    assert_eq!(enqueued("SELECT outbox.enqueue('nobody', '{}', tenant_id => 'other')"), 0);
    assert_eq!(count("SELECT count(*) FROM outbox.event"), events);

    // The event is stored once however many endpoints receive it.
    assert_eq!(count("SELECT count(*) FROM outbox.event WHERE event_type = 'user.created'"), 1);
    assert!(text("SELECT min(id) FROM outbox.event").starts_with("msg_"));
}

#[pg_test]
fn enqueue_with_an_event_id_is_idempotent() {
    endpoint("https://example.com/a", "");
    endpoint("https://example.com/b", "");
    let first = text("SELECT outbox.enqueue('a.b', '{\"v\": 1}', event_id => 'order-42')");
    let again = text("SELECT outbox.enqueue('a.b', '{\"v\": 1}', event_id => 'order-42')");
    assert_eq!((first.as_str(), again.as_str()), ("order-42", "order-42"));
    assert_eq!(count("SELECT count(*) FROM outbox.log"), 1, "the second enqueue appends nothing");
    assert_eq!(fan_out(), 2);
    assert_eq!(count("SELECT count(*) FROM outbox.delivery"), 2);
    // Fanning the same events out again makes nothing twice (outbox.delivery's unique key).
    assert_eq!(count("SELECT outbox._fan_out(array_agg(l))::int8 FROM outbox.log l"), 0);
    // Another event under a known id is refused, never mixed up with the first.
    assert_refused("SELECT outbox.enqueue('a.b', '{\"v\": 2}', event_id => 'order-42')", "23505");
    assert_refused("SELECT outbox.enqueue('a.c', '{\"v\": 1}', event_id => 'order-42')", "23505");
    assert_eq!(text("SELECT payload::text FROM outbox.event WHERE id = 'order-42'"), "{\"v\": 1}");
    // The event went to the endpoints subscribed when it was read; enqueueing it again once
    // a new endpoint joined sends nothing more (replay is the way to send it again).
    endpoint("https://example.com/c", "");
    assert_eq!(enqueued("SELECT outbox.enqueue('a.b', '{\"v\": 1}', event_id => 'order-42')"), 0);
    assert_eq!(count("SELECT count(*) FROM outbox.delivery"), 2);
}

#[pg_test]
fn callers_ids_are_remembered_for_a_turn_of_their_tables_then_forgotten() {
    let logged = || count("SELECT count(*) FROM outbox.log");
    let rotate = |age: &str| {
        Spi::get_one::<bool>(&format!("SELECT outbox._rotate_event_keys('{age}')")).unwrap().unwrap()
    };
    let age_turn = || Spi::run("UPDATE outbox.event_key_rotation SET since = now() - interval '2 hours'").unwrap();
    text("SELECT outbox.enqueue('a.b', '{\"v\": 0}', event_id => 'k0')");
    text("SELECT outbox.enqueue('a.b', '{\"v\": 1}', event_id => 'k1')");
    assert_eq!(count("SELECT count(*) FROM outbox.event_key_0 WHERE id = 'k1' AND tenant_key = ''"), 1);
    // A turn lasts the age given (retention): not over yet.
    assert!(!rotate("1 hour"));
    age_turn();
    assert!(rotate("1 hour"));
    assert_eq!(count("SELECT current::int8 FROM outbox.event_key_rotation"), 1);
    // Known still, from the table whose turn is over: nothing appended (and remembered in
    // this turn's table from now on), a twin refused.
    let before = logged();
    text("SELECT outbox.enqueue('a.b', '{\"v\": 1}', event_id => 'k1')");
    assert_eq!(logged(), before);
    assert_refused("SELECT outbox.enqueue('a.b', '{\"v\": 2}', event_id => 'k1')", "23505");
    text("SELECT outbox.enqueue('a.b', '{\"v\": 1}', event_id => 'k2')");
    assert_eq!(count("SELECT count(*) FROM outbox.event_key_1 WHERE id = 'k2'"), 1);
    // The next turn empties the table that held k0 and k1: k0 may name a new event now;
    // k1, enqueued again in the turn before, and k2 are still known.
    age_turn();
    assert!(rotate("1 hour"));
    assert_eq!(count("SELECT count(*) FROM outbox.event_key_0"), 0);
    assert_eq!(
        count("SELECT generation FROM outbox.event_key_rotation"),
        count("SELECT last_value FROM outbox.event_key_generation")
    );
    let before = logged();
    text("SELECT outbox.enqueue('a.b', '{\"v\": 3}', event_id => 'k0')");
    text("SELECT outbox.enqueue('a.b', '{\"v\": 1}', event_id => 'k1')");
    text("SELECT outbox.enqueue('a.b', '{\"v\": 1}', event_id => 'k2')");
    assert_eq!(logged(), before + 1);
    assert_refused("SELECT outbox.enqueue('a.b', '{\"v\": 3}', event_id => 'k1')", "23505");
    // The same JSON value written otherwise is the same payload; ids are per tenant.
    text("SELECT outbox.enqueue('a.b', '{ \"v\" :1 }', event_id => 'k2')");
    assert_eq!(logged(), before + 1);
    text("SELECT outbox.enqueue('a.b', '{\"v\": 9}', event_id => 'k2', tenant_id => 't')");
    assert_eq!(logged(), before + 2);
    // The payload is compared as UTF-8 whatever the client's encoding, so a producer on
    // another encoding enqueueing the same event is not refused (nor fails on a character
    // its encoding lacks).
    text("SELECT outbox.enqueue('a.b', '{\"name\": \"José €\"}', event_id => 'k-enc')");
    Spi::run("SET LOCAL client_encoding = 'LATIN1'").unwrap();
    let before = logged();
    text("SELECT outbox.enqueue('a.b', '{\"name\": \"José €\"}', event_id => 'k-enc')");
    assert_eq!(logged(), before);
    Spi::run("SET LOCAL client_encoding = 'UTF8'").unwrap();
    // A sequence found ahead of the turn's number (crash recovery logs it some values in
    // advance; a rotation may roll back after advancing it) is caught up with by the next
    // call, due or not.
    Spi::run("SELECT setval('outbox.event_key_generation', (SELECT last_value + 32 FROM outbox.event_key_generation))").unwrap();
    assert!(!rotate("1 hour"));
    assert_eq!(
        count("SELECT generation FROM outbox.event_key_rotation"),
        count("SELECT last_value FROM outbox.event_key_generation")
    );
    // outbox.purge forgets ids by age, without a turn (the worker gives those).
    age_turn();
    Spi::run("UPDATE outbox.event_key_0 SET created_at = now() - interval '2 hours'").unwrap();
    Spi::run("UPDATE outbox.event_key_1 SET created_at = now() - interval '2 hours' WHERE id <> 'k2'").unwrap();
    Spi::run("SELECT outbox.purge('1 hour')").unwrap();
    assert_eq!(count("SELECT current::int8 FROM outbox.event_key_rotation"), 0);
    assert_eq!(
        text("SELECT string_agg(id || '/' || tenant_key, ',') FROM outbox.event_key_1"),
        "k2/"
    );
    assert_eq!(count("SELECT count(*) FROM outbox.event_key_0"), 0);
}

#[pg_test]
fn enqueue_refuses_bad_input() {
    endpoint("https://example.com/a", "");
    assert_refused("SELECT outbox.enqueue('', '{}')", "22023");
    assert_refused("SELECT outbox.enqueue(NULL, '{}')", "22004");
    assert_refused("SELECT outbox.enqueue(E'a\\nb', '{}')", "22023");
    assert_refused(&format!("SELECT outbox.enqueue('{}', '{{}}')", "x".repeat(256)), "22023");
    assert_refused("SELECT outbox.enqueue('a', NULL)", "22004");
    assert_refused("SELECT outbox.enqueue('a', '{}', event_id => 'has.dot')", "22023");
    assert_refused("SELECT outbox.enqueue('a', '{}', event_id => '')", "22023");
    assert_refused("SELECT outbox.enqueue('a', '{}', tenant_id => E'\\t')", "22023");
    assert_refused("SELECT outbox.enqueue('a', '{not json')", "22P02");
    assert_refused(
        "SELECT outbox.enqueue('a', '{}', endpoint_id => '00000000-0000-0000-0000-000000000000')",
        "P0002",
    );
    Spi::run("SET LOCAL outbox.max_payload_size = 100").unwrap();
    assert_refused(&format!("SELECT outbox.enqueue('a', '\"{}\"')", "x".repeat(200)), "54000");
    let msg = error_of(&format!("SELECT outbox.enqueue('a', '\"{}\"')", "x".repeat(200))).unwrap();
    assert!(msg.contains("outbox.max_payload_size"), "{msg}");
    assert_eq!(enqueued("SELECT outbox.enqueue('a', '\"small\"')"), 1);
    assert_eq!(count("SELECT count(*) FROM outbox.event"), 1, "refusals leave nothing behind");
}

#[pg_test]
fn the_trigger_enqueues_row_changes() {
    endpoint("https://example.com/a", ", event_types => '{order.*}'");
    Spi::run(
        "CREATE TABLE public.orders (id int PRIMARY KEY, total numeric, shop text);
         CREATE TRIGGER orders_outbox AFTER INSERT OR UPDATE OR DELETE ON public.orders
             FOR EACH ROW EXECUTE FUNCTION outbox.trigger('order');
         INSERT INTO public.orders VALUES (1, 9.5, 'acme');
         UPDATE public.orders SET total = 10 WHERE id = 1;
         DELETE FROM public.orders WHERE id = 1;",
    )
    .unwrap();
    // The trigger appended to the log only; the events exist once they are read.
    assert_eq!(count("SELECT count(*) FROM outbox.log WHERE event_type LIKE 'order.%'"), 3);
    assert_eq!(count("SELECT count(*) FROM outbox.event"), 0);
    fan_out();
    assert_eq!(
        text("SELECT string_agg(event_type, ',' ORDER BY created_at, event_type) FROM outbox.event"),
        "order.created,order.deleted,order.updated"
    );
    assert_eq!(
        text("SELECT payload::text FROM outbox.event WHERE event_type = 'order.updated'"),
        r#"{"op": "UPDATE", "table": "orders", "record": {"id": 1, "shop": "acme", "total": 10}, "schema": "public", "old_record": {"id": 1, "shop": "acme", "total": 9.5}}"#
    );
    assert_eq!(
        text("SELECT payload->'record'->>'total' FROM outbox.event WHERE event_type = 'order.deleted'"),
        "10"
    );

    // A second argument names the tenant column.
    let acme = endpoint("https://example.com/acme", ", tenant_id => 'acme'");
    Spi::run(
        "CREATE TABLE public.invoices (id int, shop text);
         CREATE TRIGGER invoices_outbox AFTER INSERT ON public.invoices
             FOR EACH ROW EXECUTE FUNCTION outbox.trigger('invoice', 'shop');
         INSERT INTO public.invoices VALUES (1, 'acme'), (2, 'other');",
    )
    .unwrap();
    fan_out();
    assert_eq!(count(&format!("SELECT count(*) FROM outbox.delivery WHERE endpoint_id = '{acme}'")), 1);

    Spi::run(
        "CREATE TABLE public.bad (id int);
         CREATE TRIGGER bad_outbox BEFORE INSERT ON public.bad FOR EACH ROW EXECUTE FUNCTION outbox.trigger('bad');",
    )
    .unwrap();
    assert_refused("INSERT INTO public.bad VALUES (1)", "22023");
    Spi::run(
        "CREATE TABLE public.bad2 (id int);
         CREATE TRIGGER bad2_outbox AFTER INSERT ON public.bad2 FOR EACH ROW EXECUTE FUNCTION outbox.trigger('bad2', 'nope');",
    )
    .unwrap();
    assert_refused("INSERT INTO public.bad2 VALUES (1)", "42703");
}

#[pg_test]
fn claim_hands_out_due_deliveries_with_what_a_sender_needs() {
    let a = endpoint("https://example.com/a", ", headers => '{\"X-Env\": \"test\"}', timeout => '3s'");
    let b = endpoint("https://example.com/b", "");
    let off = endpoint("https://example.com/off", "");
    Spi::run(&format!("SELECT outbox.disable_endpoint('{off}')")).unwrap();
    Spi::run(&format!("SELECT outbox.enqueue('x', '1', endpoint_id => '{off}')")).unwrap();
    fan_out();
    Spi::run("SELECT outbox.enqueue('order.created', '{\"id\": 7}', event_id => 'evt_1')").unwrap();
    fan_out();
    Spi::run("SELECT outbox.enqueue('later', '{}', deliver_at => now() + interval '1 hour')").unwrap();
    fan_out();

    let rows = text(&format!(
        "SELECT string_agg(concat_ws('|', event_id, attempt, url, headers::text, timeout::text, event_type), ';' ORDER BY url)
           FROM outbox.claim(10, 'w1', '30 seconds', endpoint_id => '{a}')"
    ));
    assert_eq!(rows, "evt_1|1|https://example.com/a|{\"X-Env\": \"test\"}|00:00:03|order.created");

    let body = text(&format!("SELECT body FROM outbox.claim(10, 'w2') WHERE endpoint_id = '{b}'"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["type"], "order.created");
    assert_eq!(v["data"]["id"], 7);
    let ts = v["timestamp"].as_str().unwrap();
    assert!(ts.ends_with('Z') && ts.contains('T'), "{ts}");
    assert!(body.starts_with("{\"type\""), "{body}");

    // Everything due is taken; the future one and the disabled endpoint's stay pending.
    assert_eq!(count("SELECT count(*) FROM outbox.claim(10)"), 0);
    assert_eq!(count("SELECT count(*) FROM outbox.delivery WHERE status = 'in_flight'"), 2);
    assert_eq!(
        text("SELECT string_agg(DISTINCT lease_owner, ',' ORDER BY lease_owner) FROM outbox.delivery"),
        "w1,w2"
    );
    assert_eq!(count("SELECT count(*) FROM outbox.deliveries WHERE status = 'in_flight' AND lease_expires_at > now()"), 2);
    // The claim returns the secret so the sender can sign.
    Spi::run(&format!("SELECT outbox.enable_endpoint('{off}')")).unwrap();
    let secret = text(&format!("SELECT secret FROM outbox.claim(10) WHERE endpoint_id = '{off}'"));
    assert_eq!(secret, text(&format!("SELECT outbox.endpoint_secret('{off}')")));
}

#[pg_test]
fn claim_can_be_scoped_to_a_tenant() {
    endpoint("https://example.com/a", ", tenant_id => 'acme'");
    endpoint("https://example.com/b", ", tenant_id => 'globex'");
    Spi::run("SELECT outbox.enqueue('x', '{}', tenant_id => 'acme'), outbox.enqueue('x', '{}', tenant_id => 'globex')").unwrap();
    fan_out();
    assert_eq!(text("SELECT string_agg(tenant_id, ',') FROM outbox.claim(10, tenant_id => 'globex')"), "globex");
    assert_eq!(text("SELECT string_agg(tenant_id, ',') FROM outbox.claim(10)"), "acme");
}

#[pg_test]
fn claim_refuses_bad_arguments() {
    assert_refused("SELECT * FROM outbox.claim(0)", "22023");
    assert_refused("SELECT * FROM outbox.claim(10001)", "22023");
    assert_refused("SELECT * FROM outbox.claim(NULL)", "22023");
    assert_refused("SELECT * FROM outbox.claim(10, 'w', '0 seconds')", "22023");
    assert_refused("SELECT * FROM outbox.claim(10, 'w', '-5 seconds')", "22023");
    assert_refused("SELECT * FROM outbox.claim(10, 'w', '2 days')", "22023");
}

fn claim_one() -> (String, i32) {
    let id = text("SELECT delivery_id::text FROM outbox.claim(1, 'test')");
    let attempt = Spi::get_one::<i32>(&format!("SELECT attempts FROM outbox.delivery WHERE id = '{id}'"))
        .unwrap()
        .unwrap();
    (id, attempt)
}

#[pg_test]
fn ack_records_outcomes_and_enforces_the_lease() {
    endpoint("https://example.com/a", "");
    Spi::run("SELECT outbox.enqueue('x', '{}')").unwrap();
    fan_out();
    let (id, attempt) = claim_one();
    assert_eq!(attempt, 1);
    assert_refused(&format!("SELECT outbox.ack('{id}', 2, 'delivered')"), "55000");
    assert_eq!(
        text(&format!("SELECT outbox.ack('{id}', 1, 'delivered', 200, NULL, 12.5, response_body => 'ok', worker => 'w')::text")),
        "delivered"
    );
    // Acknowledging twice is refused and changes nothing.
    assert_refused(&format!("SELECT outbox.ack('{id}', 1, 'dead')"), "55000");
    assert_eq!(
        text(&format!("SELECT concat_ws('|', status, attempts, last_status_code, finished_at IS NOT NULL) FROM outbox.deliveries WHERE id = '{id}'")),
        "delivered|1|200|t"
    );
    assert_eq!(
        text(&format!("SELECT concat_ws('|', attempt, outcome, status_code, duration_ms, response_body, worker) FROM outbox.attempts WHERE delivery_id = '{id}'")),
        "1|delivered|200|12.5|ok|w"
    );
    assert_refused("SELECT outbox.ack('00000000-0000-0000-0000-000000000000', 1, 'delivered')", "P0002");
    assert_refused(&format!("SELECT outbox.ack('{id}', 1, 'maybe')"), "22P02");
    assert_refused(&format!("SELECT outbox.ack('{id}', NULL, 'delivered')"), "22004");
}

#[pg_test]
fn ack_retry_follows_the_given_time_or_the_schedule() {
    endpoint("https://example.com/a", "");
    Spi::run("SET LOCAL outbox.retry_schedule = '10s, 1m'").unwrap();
    Spi::run("SELECT outbox.enqueue('x', '{}')").unwrap();
    fan_out();

    let (id, a1) = claim_one();
    Spi::run(&format!("SELECT outbox.ack('{id}', {a1}, 'retry', 503, 'HTTP 503', retry_at => now() - interval '1 second')")).unwrap();
    assert_eq!(
        text(&format!("SELECT concat_ws('|', status, retrying, last_status_code, last_error) FROM outbox.deliveries WHERE id = '{id}'")),
        "pending|t|503|HTTP 503"
    );

    let (id2, a2) = claim_one();
    assert_eq!((id2.as_str(), a2), (id.as_str(), 2));
    Spi::run(&format!("SELECT outbox.ack('{id}', 2, 'retry', NULL, 'connection refused')")).unwrap();
    // Second failure: the schedule's second delay (1 minute) +/- 20 % jitter.
    assert_eq!(
        count(&format!("SELECT count(*) FROM outbox.delivery WHERE id = '{id}' AND due_at BETWEEN now() + interval '48 seconds' AND now() + interval '72 seconds'")),
        1
    );
    // Third failure: schedule exhausted, so the retry becomes dead.
    Spi::run(&format!("UPDATE outbox.delivery SET due_at = now() WHERE id = '{id}'")).unwrap();
    let (_, a3) = claim_one();
    assert_eq!(text(&format!("SELECT outbox.ack('{id}', {a3}, 'retry', 500, 'HTTP 500')::text")), "dead");
    assert_eq!(
        text(&format!("SELECT concat_ws('|', attempts, last_error) FROM outbox.dead_letters WHERE id = '{id}'")),
        "3|HTTP 500: retry schedule exhausted"
    );
    assert_eq!(
        text(&format!("SELECT string_agg(outcome::text, ',' ORDER BY attempt) FROM outbox.attempts WHERE delivery_id = '{id}'")),
        "retry,retry,dead"
    );
}

#[pg_test]
fn ack_batch_records_many_and_skips_stale_ones() {
    endpoint("https://example.com/a", "");
    Spi::run("SELECT outbox.enqueue('x', '{}') FROM generate_series(1, 5)").unwrap();
    fan_out();
    Spi::run("CREATE TEMP TABLE c AS SELECT * FROM outbox.claim(5, 'w')").unwrap();
    let accepted = count(
        "SELECT count(*) FROM outbox.ack_batch(
             (SELECT array_agg(delivery_id ORDER BY delivery_id) FROM c),
             (SELECT array_agg(CASE WHEN n = 1 THEN 9 ELSE attempt END ORDER BY delivery_id)
                FROM (SELECT *, row_number() OVER (ORDER BY delivery_id) n FROM c) s),
             (SELECT array_agg(CASE WHEN n % 2 = 0 THEN 'dead' ELSE 'delivered' END::outbox.attempt_outcome ORDER BY delivery_id)
                FROM (SELECT *, row_number() OVER (ORDER BY delivery_id) n FROM c) s),
             status_codes => (SELECT array_agg(200 ORDER BY delivery_id) FROM c))",
    );
    assert_eq!(accepted, 4, "the ack with the wrong attempt number is skipped");
    assert_eq!(count("SELECT count(*) FROM outbox.delivery WHERE status = 'in_flight'"), 1);
    assert_eq!(count("SELECT count(*) FROM outbox.delivery WHERE status = 'dead'"), 2);
    assert_eq!(count("SELECT count(*) FROM outbox.attempt"), 4);
    assert_refused(
        "SELECT outbox.ack_batch(ARRAY[gen_random_uuid()], ARRAY[1, 2], ARRAY['delivered']::outbox.attempt_outcome[])",
        "2202E",
    );
}

#[pg_test]
fn stats_report_queue_health() {
    endpoint("https://example.com/a", "");
    Spi::run("SELECT outbox.enqueue('x', '{}') FROM generate_series(1, 6)").unwrap();
    fan_out();
    Spi::run("SELECT outbox.enqueue('later', '{}', deliver_at => now() + interval '1 day')").unwrap();
    fan_out();
    Spi::run("CREATE TEMP TABLE c AS SELECT * FROM outbox.claim(4, 'w')").unwrap();
    let ids: Vec<String> = (1..=4)
        .map(|n| text(&format!("SELECT delivery_id::text FROM c ORDER BY delivery_id OFFSET {} LIMIT 1", n - 1)))
        .collect();
    Spi::run(&format!("SELECT outbox.ack('{}', 1, 'delivered')", ids[0])).unwrap();
    Spi::run(&format!("SELECT outbox.ack('{}', 1, 'delivered')", ids[1])).unwrap();
    Spi::run(&format!("SELECT outbox.ack('{}', 1, 'dead', 400)", ids[2])).unwrap();
    let row = text(
        "SELECT concat_ws('|', pending, due, in_flight, retrying, dead, delivered_last_hour, dead_last_hour,
                          failed_attempts_last_hour, round(success_rate_last_hour::numeric, 3), oldest_pending_age IS NOT NULL, delivered_last_minute)
           FROM outbox.stats()",
    );
    assert_eq!(row, "3|2|1|0|1|2|1|1|0.667|t|2");
}

#[pg_test]
fn sign_matches_the_standard_webhooks_vector() {
    assert_eq!(
        text(r#"SELECT outbox.sign('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', 'msg_p5jXN8AQM9LWM0D4loKWxJek', 1614265330, '{"test": 2432232314}')"#),
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    );
    assert_refused("SELECT outbox.sign('nope', 'm', 1, 'b')", "22023");
}

#[pg_test]
fn retry_delay_follows_the_guc() {
    Spi::run("SET LOCAL outbox.retry_schedule = '10s, 2m'").unwrap();
    assert_eq!(count("SELECT count(*) FROM generate_series(1, 50) WHERE outbox.retry_delay(1) BETWEEN '8s' AND '12s'"), 50);
    assert_eq!(count("SELECT count(*) FROM generate_series(1, 50) WHERE outbox.retry_delay(2) BETWEEN '96s' AND '144s'"), 50);
    assert!(
        count("SELECT count(DISTINCT outbox.retry_delay(1)) FROM generate_series(1, 50)") > 1,
        "jittered"
    );
    assert_eq!(count("SELECT count(*) FROM (SELECT outbox.retry_delay(3) d) s WHERE d IS NULL"), 1);
    assert_eq!(count("SELECT count(*) FROM (SELECT outbox.retry_delay(0) d) s WHERE d IS NULL"), 1);
}

#[pg_test]
fn hostile_text_and_json_are_refused_cleanly() {
    endpoint("https://example.com/a", "");
    // PostgreSQL itself refuses NUL bytes and invalid UTF-8 before any function sees them.
    assert_refused("SELECT outbox.enqueue(E'a\\x00b', '{}')", "22021");
    assert_refused("SELECT outbox.enqueue(convert_from('\\xff'::bytea, 'UTF8'), '{}')", "22021");
    assert_refused("SELECT outbox.enqueue('a', '{\"k\": \"\\u0000\"}')", "22P05");
    // Nesting deep enough to exhaust the parser's stack is an error, not a crash.
    assert_refused(
        "SELECT outbox.enqueue('a', (repeat('[', 100000) || repeat(']', 100000))::jsonb)",
        "54001",
    );
    // Header injection, overrides and credentials in URLs.
    assert_refused(
        "SELECT outbox.create_endpoint('https://e.com', headers => '{\"X-A\": \"v\\nX-Injected: 1\"}')",
        "22023",
    );
    assert_refused(
        "SELECT outbox.create_endpoint('https://e.com', headers => '{\"Transfer-Encoding\": \"chunked\"}')",
        "22023",
    );
    assert_refused(
        "SELECT outbox.create_endpoint('https://e.com', headers => '{\"X:A\": \"v\"}')",
        "22023",
    );
    assert_refused("SELECT outbox.create_endpoint('https://user@e.com/')", "22023");
    assert_refused("SELECT outbox.create_endpoint(E'https://e.com/\\r\\nHost: evil')", "22P02");
    // Sizes and intervals out of range.
    assert_refused("SELECT * FROM outbox.claim(2147483647)", "22023");
    assert_refused("SELECT * FROM outbox.claim(10, 'w', '-1 day')", "22023");
    assert_refused("SELECT outbox.create_endpoint('https://e.com', timeout => '-5 seconds')", "22023");
    assert_eq!(count("SELECT count(*) FROM outbox.event"), 0, "nothing left behind");
    assert_eq!(count("SELECT count(*) FROM outbox.endpoint"), 1);
}

/// Claims everything due and acknowledges it with `outcome` (and `code`).
fn ack_all(outcome: &str, code: i32) {
    Spi::run(&format!(
        "SELECT outbox.ack(delivery_id, attempt, '{outcome}', {code}) FROM outbox.claim(1000, 'test')"
    ))
    .unwrap();
}

#[pg_test]
fn delivery_stats_come_from_the_hourly_rollup() {
    let a = endpoint("https://example.com/a", "");
    let b = endpoint("https://example.com/b", ", event_types => '{order.*}'");
    Spi::run("SELECT outbox.enqueue('order.created', '{}') FROM generate_series(1, 4)").unwrap();
    fan_out();
    Spi::run("SELECT outbox.enqueue('user.created', '{}', tenant_id => NULL) FROM generate_series(1, 2)").unwrap();
    fan_out();
    // Make the deliveries look 2 s old so latencies land in a known bucket (1000-2500 ms).
    Spi::run("UPDATE outbox.delivery SET created_at = now() - interval '2 seconds'").unwrap();
    // Endpoint b: all dead; endpoint a: all delivered.
    Spi::run(&format!(
        "SELECT outbox.ack(delivery_id, attempt, 'dead', 400) FROM outbox.claim(1000, 'test', endpoint_id => '{b}')"
    ))
    .unwrap();
    ack_all("delivered", 200);

    let overall = text(
        "SELECT concat_ws('|', total, delivered, dead, round(success_rate::numeric, 3), avg_attempts,
                          p50_ms BETWEEN 1000 AND 2500, p99_ms BETWEEN 1000 AND 2500)
           FROM outbox.delivery_stats('1 hour')",
    );
    assert_eq!(overall, "10|6|4|0.600|1|t|t");
    assert_eq!(
        text(&format!("SELECT concat_ws('|', total, delivered, dead) FROM outbox.delivery_stats('24 hours', endpoint_id => '{b}')")),
        "4|0|4"
    );
    assert_eq!(
        text("SELECT concat_ws('|', total, delivered) FROM outbox.delivery_stats(event_type => 'user.created')"),
        "2|2"
    );
    assert_eq!(
        text("SELECT string_agg(concat(event_type, ':', total), ',' ORDER BY event_type) FROM outbox.event_type_stats('7 days')"),
        "order.created:8,user.created:2"
    );
    assert_eq!(
        text(&format!("SELECT string_agg(concat(url, ':', total, ':', dead), ',' ORDER BY url) FROM outbox.endpoint_stats() WHERE endpoint_id IN ('{a}', '{b}')")),
        "https://example.com/a:6:0,https://example.com/b:4:4"
    );
    // An empty window has no percentiles and no rate.
    assert_eq!(
        text("SELECT concat_ws('|', total, success_rate IS NULL, p50_ms IS NULL) FROM outbox.delivery_stats(tenant_id => 'nobody')"),
        "0|t|t"
    );
}

#[pg_test]
fn percentiles_interpolate_within_buckets() {
    // 100 latencies in bucket 6 (500-1000 ms): p50 is halfway through it.
    assert_eq!(
        Spi::get_one::<f64>("SELECT outbox._percentile(ARRAY[6]::smallint[], ARRAY[100]::bigint[], 0.5)")
            .unwrap()
            .unwrap(),
        750.0
    );
    // 90 fast (bucket 0: 0-10 ms) and 10 slow (bucket 7: 1000-2500 ms).
    let p = |q: f64| {
        Spi::get_one::<f64>(&format!(
            "SELECT outbox._percentile(ARRAY[0, 7]::smallint[], ARRAY[90, 10]::bigint[], {q})"
        ))
        .unwrap()
        .unwrap()
    };
    assert!(p(0.5) < 10.0);
    assert!((1000.0..=2500.0).contains(&p(0.95)), "{}", p(0.95));
}

#[pg_test]
fn endpoint_health_tracks_streaks_and_backlog() {
    let a = endpoint("https://example.com/a", "");
    Spi::run("SELECT outbox.enqueue('x', '{}') FROM generate_series(1, 3)").unwrap();
    fan_out();
    Spi::run("SELECT outbox.ack(delivery_id, attempt, 'retry', 503, 'HTTP 503', retry_at => now() + interval '1 hour') FROM outbox.claim(2, 'test')").unwrap();
    assert_eq!(
        text(&format!("SELECT concat_ws('|', pending, in_flight, retrying, consecutive_failures, last_error, last_success_at IS NULL) FROM outbox.endpoint_health WHERE endpoint_id = '{a}'")),
        "3|0|2|2|HTTP 503|t"
    );
    ack_all("delivered", 200);
    assert_eq!(
        text(&format!("SELECT concat_ws('|', pending, consecutive_failures, last_success_at IS NOT NULL) FROM outbox.endpoint_health WHERE endpoint_id = '{a}'")),
        "2|0|t"
    );
    assert_eq!(count("SELECT count(*) FROM outbox.recent_failures WHERE status_code = 503"), 2);
}

#[pg_test]
fn dead_letters_can_be_retried_in_one_call() {
    let a = endpoint("https://example.com/a", "");
    let b = endpoint("https://example.com/b", "");
    Spi::run("SELECT outbox.enqueue('x', '{}') FROM generate_series(1, 3)").unwrap();
    fan_out();
    ack_all("dead", 400);
    assert_eq!(count("SELECT count(*) FROM outbox.dead_letters"), 6);
    let one = text(&format!("SELECT id::text FROM outbox.dead_letters WHERE endpoint_id = '{a}' LIMIT 1"));
    assert_eq!(count(&format!("SELECT outbox.retry_dead('{one}')")), 1);
    assert_eq!(count(&format!("SELECT outbox.retry_dead(endpoint_id => '{b}')")), 3);
    assert_eq!(count("SELECT outbox.retry_dead(since => now() - interval '1 hour')"), 2);
    // The attempt number (the fencing token) goes on; the schedule starts again from it.
    assert_eq!(count("SELECT count(*) FROM outbox.delivery WHERE status = 'pending' AND attempts = 1 AND retry_base = 1"), 6);
    assert_eq!(
        text(&format!("SELECT string_agg(outcome::text, ',' ORDER BY id) FROM outbox.attempts WHERE delivery_id = '{one}'")),
        "dead,requeued"
    );
    // Requeued deliveries start a fresh schedule and can be delivered.
    ack_all("delivered", 200);
    assert_eq!(count("SELECT count(*) FROM outbox.delivery WHERE status = 'delivered'"), 6);
    assert_refused("SELECT outbox.retry_dead()", "22023");
    assert_refused("SELECT outbox.retry_dead('00000000-0000-0000-0000-000000000000')", "P0002");
}

#[pg_test]
fn delivered_events_can_be_replayed_with_the_same_event_id() {
    let a = endpoint("https://example.com/a", "");
    Spi::run("SELECT outbox.enqueue('x', '{}', event_id => 'evt-' || g) FROM generate_series(1, 3) g").unwrap();
    fan_out();
    ack_all("delivered", 200);
    assert_eq!(count(&format!("SELECT outbox.replay('{a}', now() - interval '1 hour')")), 3);
    // A replay still pending is not replayed again.
    assert_eq!(count(&format!("SELECT outbox.replay('{a}', now() - interval '1 hour')")), 0);
    assert_eq!(
        text("SELECT string_agg(DISTINCT event_id, ',') FROM outbox.claim(10, 'test')"),
        "evt-1,evt-2,evt-3"
    );
    assert_eq!(count("SELECT count(*) FROM outbox.attempt WHERE outcome = 'replayed'"), 3);
    // Enqueueing the same event id again sends nothing, neither the original nor a replay.
    assert_eq!(enqueued("SELECT outbox.enqueue('x', '{}', event_id => 'evt-1')"), 0);
    assert_eq!(count("SELECT count(*) FROM outbox.delivery"), 6);
    assert_refused("SELECT outbox.replay('00000000-0000-0000-0000-000000000000', now())", "P0002");
    assert_refused(&format!("SELECT outbox.replay('{a}', NULL)"), "22004");
}

#[pg_test]
fn pending_deliveries_can_be_cancelled() {
    let a = endpoint("https://example.com/a", "");
    Spi::run("SELECT outbox.enqueue('x', '{}') FROM generate_series(1, 3)").unwrap();
    fan_out();
    let (held, attempt) = claim_one();
    assert_eq!(count(&format!("SELECT outbox.cancel('{held}')")), 1);
    assert_refused(&format!("SELECT outbox.ack('{held}', {attempt}, 'delivered')"), "55000");
    assert_eq!(count(&format!("SELECT outbox.cancel(endpoint_id => '{a}')")), 2);
    assert_eq!(count("SELECT count(*) FROM outbox.attempt WHERE outcome = 'cancelled'"), 3);
    assert_eq!(count(&format!("SELECT outbox.cancel('{held}')")), 0, "already finished");
    assert_refused("SELECT outbox.cancel()", "22023");
}

#[pg_test]
fn purge_removes_old_finished_rows_only() {
    endpoint("https://example.com/a", "");
    Spi::run("SELECT outbox.enqueue('x', '{}') FROM generate_series(1, 4)").unwrap();
    fan_out();
    Spi::run("SELECT outbox.ack(delivery_id, attempt, 'delivered', 200) FROM outbox.claim(2, 'test')").unwrap();
    Spi::run("SELECT outbox.ack(delivery_id, attempt, 'dead', 400) FROM outbox.claim(1, 'test')").unwrap();
    Spi::run("UPDATE outbox.delivery SET finished_at = now() - interval '10 days' WHERE finished_at IS NOT NULL").unwrap();
    // Delivered older than 7 days go; the dead one is kept for 30.
    assert_eq!(count("SELECT outbox.purge('7 days', '30 days')"), 2);
    assert_eq!(count("SELECT count(*) FROM outbox.delivery"), 2);
    assert_eq!(count("SELECT count(*) FROM outbox.attempt"), 1);
    assert_eq!(count("SELECT count(*) FROM outbox.event"), 2, "events without deliveries go too");
    assert_eq!(count("SELECT outbox.purge('1 day')"), 1);
    assert_eq!(count("SELECT count(*) FROM outbox.delivery WHERE status = 'pending'"), 1, "unfinished ones stay");
    assert_eq!(count("SELECT total FROM outbox.delivery_stats('1 hour')"), 3, "statistics outlive retention");
    assert_refused("SELECT outbox.purge('-1 day')", "22023");
}

#[pg_test]
fn metrics_are_one_row_per_series() {
    let a = endpoint("https://example.com/a", "");
    Spi::run("SELECT outbox.enqueue('x', '{}') FROM generate_series(1, 3)").unwrap();
    fan_out();
    Spi::run("SELECT outbox.ack(delivery_id, attempt, 'delivered', 200) FROM outbox.claim(1, 'test')").unwrap();
    let m = |sql: &str| Spi::get_one::<f64>(sql).unwrap().unwrap_or(-1.0);
    assert_eq!(m("SELECT value FROM outbox.metrics WHERE metric = 'outbox_deliveries' AND status = 'pending'"), 2.0);
    assert_eq!(
        m(&format!("SELECT value FROM outbox.metrics WHERE metric = 'outbox_finished_total' AND status = 'delivered' AND endpoint_id = '{a}'")),
        1.0
    );
    assert_eq!(m(&format!("SELECT value FROM outbox.metrics WHERE metric = 'outbox_endpoint_enabled' AND endpoint_id = '{a}'")), 1.0);
    assert!(m("SELECT value FROM outbox.metrics WHERE metric = 'outbox_oldest_pending_seconds'") >= 0.0);
}

/// The overdue gauge counts only due work that could go out: not retries waiting for their
/// turn nor scheduled deliveries, and not endpoints held by being disabled or by an open
/// circuit, which have gauges of their own.
#[pg_test]
fn the_overdue_gauge_counts_only_due_deliveries_that_could_go_out() {
    let a = endpoint("https://example.com/a", "");
    let overdue = || {
        Spi::get_one::<f64>("SELECT value FROM outbox.metrics WHERE metric = 'outbox_oldest_due_seconds'")
            .unwrap()
            .unwrap()
    };
    Spi::run("SELECT outbox.enqueue('x', '{}')").unwrap();
    fan_out();
    Spi::run("UPDATE outbox.delivery SET due_at = now() + interval '1 hour', created_at = now() - interval '2 hours'").unwrap();
    assert_eq!(overdue(), 0.0, "a retry waiting for its turn is not overdue");
    assert!(
        Spi::get_one::<f64>("SELECT value FROM outbox.metrics WHERE metric = 'outbox_oldest_pending_seconds'")
            .unwrap()
            .unwrap()
            >= 7200.0,
        "though it is the oldest pending"
    );
    Spi::run("UPDATE outbox.delivery SET due_at = now() - interval '10 minutes'").unwrap();
    assert!((overdue() - 600.0).abs() < 5.0, "{}", overdue());
    Spi::run(&format!("UPDATE outbox.endpoint_state SET circuit = 'open' WHERE endpoint_id = '{a}'")).unwrap();
    assert_eq!(overdue(), 0.0, "an open circuit holds it: OutboxCircuitOpen says so");
    Spi::run(&format!("UPDATE outbox.endpoint_state SET circuit = 'closed' WHERE endpoint_id = '{a}'")).unwrap();
    Spi::run(&format!("SELECT outbox.disable_endpoint('{a}')")).unwrap();
    assert_eq!(overdue(), 0.0, "a disabled endpoint's deliveries wait on purpose");
}

/// Prometheus reads any decrease of a counter as a reset, so the totals must survive the
/// rollup's retention, and the histogram must be cumulative with +Inf equal to _count.
#[pg_test]
fn counters_never_go_down_when_retention_removes_rollup_hours() {
    let a = endpoint("https://example.com/a", "");
    Spi::run(&format!(
        "INSERT INTO outbox.stats_hourly (hour, endpoint_id, event_type, outcome, latency_bucket, deliveries, attempts, latency_ms_sum)
         VALUES (date_trunc('hour', now()) - interval '100 days', '{a}', 'x', 'delivered', 0, 5, 6, 20),
                (date_trunc('hour', now()) - interval '100 days', '{a}', 'x', 'dead', 16, 1, 8, 9e7),
                (date_trunc('hour', now()), '{a}', 'x', 'delivered', 0, 2, 2, 8),
                (date_trunc('hour', now()), '{a}', 'x', 'delivered', 3, 3, 4, 210)"
    ))
    .unwrap();
    let series = || {
        Spi::get_one::<String>(&format!(
            "SELECT string_agg(concat_ws(':', metric, status, le, value), ' ' ORDER BY metric, status, value, le)
               FROM outbox.metrics WHERE endpoint_id = '{a}' AND metric NOT LIKE 'outbox_endpoint%'"
        ))
        .unwrap()
        .unwrap()
    };
    let before = series();
    let m = |sql: &str| Spi::get_one::<f64>(&format!("{sql} AND endpoint_id = '{a}'")).unwrap().unwrap_or(-1.0);
    let finished = "SELECT value FROM outbox.metrics WHERE metric = 'outbox_finished_total'";
    assert_eq!(m(&format!("{finished} AND status = 'delivered'")), 10.0);
    assert_eq!(m(&format!("{finished} AND status = 'dead'")), 1.0);
    assert_eq!(m("SELECT value FROM outbox.metrics WHERE metric = 'outbox_attempts_total'"), 20.0);
    let bucket = "SELECT value FROM outbox.metrics WHERE metric = 'outbox_delivery_latency_seconds_bucket'";
    assert_eq!(m(&format!("{bucket} AND le = '0.01'")), 7.0, "bucket 0: below 10 ms");
    assert_eq!(m(&format!("{bucket} AND le = '0.05'")), 7.0, "bucket 3 starts at 50 ms");
    assert_eq!(m(&format!("{bucket} AND le = '0.1'")), 10.0);
    assert_eq!(m(&format!("{bucket} AND le = '+Inf'")), 10.0);
    assert_eq!(m("SELECT value FROM outbox.metrics WHERE metric = 'outbox_delivery_latency_seconds_count'"), 10.0);
    assert_eq!(m("SELECT value FROM outbox.metrics WHERE metric = 'outbox_delivery_latency_seconds_sum'"), 0.238);
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM (SELECT value < lag(value) OVER (ORDER BY le::double precision) AS down
               FROM outbox.metrics WHERE metric = 'outbox_delivery_latency_seconds_bucket' AND endpoint_id = '{a}') x
              WHERE down"
        )),
        0,
        "buckets are cumulative"
    );
    Spi::run("SELECT outbox.purge('7 days')").unwrap();
    assert_eq!(count("SELECT count(*) FROM outbox.stats_hourly WHERE hour < now() - interval '90 days'"), 0);
    assert_eq!(series(), before, "retention moved the old hours without changing a total");
    // New outcomes add to the retired sums, never replace them.
    Spi::run(&format!(
        "INSERT INTO outbox.stats_hourly (hour, endpoint_id, event_type, outcome, latency_bucket, deliveries, attempts, latency_ms_sum)
         VALUES (date_trunc('hour', now()) - interval '95 days', '{a}', 'y', 'delivered', 0, 1, 1, 1)"
    ))
    .unwrap();
    Spi::run("SELECT outbox.purge('7 days')").unwrap();
    assert_eq!(m(&format!("{finished} AND status = 'delivered'")), 11.0);
    // No worker runs in this test cluster (nothing preloaded): the gauge says so.
    assert_eq!(
        Spi::get_one::<f64>("SELECT value FROM outbox.metrics WHERE metric = 'outbox_worker_up'").unwrap(),
        Some(0.0)
    );
}

#[pg_test]
fn retention_cancels_work_left_for_deleted_endpoints() {
    let a = endpoint("https://example.com/a", "");
    Spi::run(&format!("SELECT outbox.delete_endpoint('{a}')")).unwrap();
    // What a fan-out enqueue racing the delete could leave behind.
    Spi::run(&format!(
        "INSERT INTO outbox.event (id, event_type, payload) VALUES ('late', 'x', '{{}}');
         INSERT INTO outbox.delivery (event_id, endpoint_id) VALUES ('late', '{a}');"
    ))
    .unwrap();
    assert_eq!(count("SELECT outbox.purge('7 days')"), 0);
    assert_eq!(
        text("SELECT concat_ws('|', status, last_error) FROM outbox.delivery WHERE event_id = 'late'"),
        "cancelled|cancelled: endpoint deleted"
    );
}

#[pg_test]
fn delivery_limits_are_validated() {
    assert_refused("SELECT outbox.create_endpoint('https://example.com/a', rate_limit => 0)", "22023");
    assert_refused("SELECT outbox.create_endpoint('https://example.com/a', max_in_flight => 10001)", "22023");
    let id = endpoint("https://example.com/a", ", rate_limit => 5, max_in_flight => 2");
    assert_refused(&format!("SELECT outbox.update_endpoint('{id}', rate_limit => -1)"), "22023");
    Spi::run(&format!("SELECT outbox.update_endpoint('{id}', rate_limit => 0, max_in_flight => 0)")).unwrap();
    assert_eq!(
        count(&format!("SELECT count(*) FROM outbox.endpoints WHERE id = '{id}' AND rate_limit IS NULL AND max_in_flight IS NULL")),
        1
    );
}

#[pg_test]
fn claim_takes_only_what_each_endpoint_allows() {
    let limited = endpoint("https://example.com/limited", ", max_in_flight => 2");
    let paced = endpoint("https://example.com/paced", ", rate_limit => 1");
    let free = endpoint("https://example.com/free", "");
    Spi::run("SELECT outbox.enqueue('a.b', jsonb_build_object('n', g)) FROM generate_series(1, 10) g").unwrap();
    fan_out();
    let per_endpoint = |id: &str| count(&format!("SELECT count(*) FROM outbox.delivery WHERE endpoint_id = '{id}' AND status = 'in_flight'"));
    assert_eq!(count("SELECT count(*) FROM outbox.claim(100)"), 2 + 1 + 10);
    assert_eq!((per_endpoint(&limited), per_endpoint(&paced), per_endpoint(&free)), (2, 1, 10));
    // Nothing more until a slot frees up or a token comes (now() is fixed in this test).
    assert_eq!(count("SELECT count(*) FROM outbox.claim(100)"), 0);
    Spi::run(&format!(
        "SELECT outbox.ack(id, attempts, 'delivered', 200) FROM outbox.delivery WHERE endpoint_id = '{limited}' AND status = 'in_flight'"
    ))
    .unwrap();
    assert_eq!(count("SELECT count(*) FROM outbox.claim(100)"), 2);
    // The worker is told when the next token comes, not "now".
    assert!(Spi::get_one::<f64>("SELECT outbox._next_due()").unwrap().unwrap() > 0.0);
}

#[pg_test]
fn making_an_endpoint_ordered_numbers_its_queue_oldest_first() {
    let id = endpoint("https://example.com/erp", "");
    Spi::run("SELECT outbox.enqueue('a.b', jsonb_build_object('n', g)) FROM generate_series(1, 5) g").unwrap();
    fan_out();
    Spi::run(&format!("SELECT outbox.update_endpoint('{id}', ordered => true)")).unwrap();
    assert_eq!(count("SELECT count(*) FROM outbox.delivery WHERE seq IS NULL"), 0);
    Spi::run("SELECT outbox.enqueue('a.b', jsonb_build_object('n', 6))").unwrap();
    fan_out();
    // One at a time: the head, and nothing behind it while it is in flight.
    assert_eq!(count("SELECT count(*) FROM outbox.claim(100)"), 1);
    assert_eq!(count("SELECT count(*) FROM outbox.claim(100)"), 0);
    // A retrying head holds the rest back.
    Spi::run("SELECT outbox.ack(id, attempts, 'retry', 503, retry_at => now() + interval '1 hour') FROM outbox.delivery WHERE status = 'in_flight'").unwrap();
    assert_eq!(count("SELECT count(*) FROM outbox.claim(100)"), 0);
    // When it dies, the next one goes.
    Spi::run("UPDATE outbox.delivery SET due_at = now() WHERE attempts = 1").unwrap();
    Spi::run("SELECT outbox.ack(delivery_id, attempt, 'dead', 400) FROM outbox.claim(100)").unwrap();
    assert_eq!(count("SELECT count(*) FROM outbox.delivery WHERE status = 'dead'"), 1);
    let next = Spi::get_one::<pgrx::JsonB>("SELECT ev.payload FROM outbox.claim(100) c JOIN outbox.event ev ON ev.id = c.event_id")
        .unwrap()
        .unwrap();
    assert_eq!(next.0["n"], 2);
}

#[pg_test]
fn everything_users_see_is_described_in_the_catalog() {
    // `\d+` and `\df+` explain every table, view, column and API function (the `_`
    // internals excepted): each missing description is listed.
    let missing = text(
        "SELECT coalesce(string_agg(x, ', ' ORDER BY x), '') FROM (
             SELECT c.relname::text AS x FROM pg_class c
              WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind IN ('r', 'p', 'v')
                AND NOT c.relispartition AND c.relname !~ '^_' AND obj_description(c.oid, 'pg_class') IS NULL
             UNION ALL
             SELECT c.relname || '.' || a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
              WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind IN ('r', 'p', 'v')
                AND NOT c.relispartition AND c.relname !~ '^_' AND a.attnum > 0 AND NOT a.attisdropped
                AND col_description(c.oid, a.attnum) IS NULL
             UNION ALL
             SELECT p.oid::regprocedure::text FROM pg_proc p
              WHERE p.pronamespace = 'outbox'::regnamespace AND p.proname !~ '^_'
                AND obj_description(p.oid, 'pg_proc') IS NULL) m",
    );
    assert_eq!(missing, "", "without a description");
}
