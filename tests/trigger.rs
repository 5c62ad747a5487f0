//! Triggers as people attach them: columns that must never leave the database, the payload
//! shape Supabase Database Webhooks users know, and a view that shows which tables carry
//! an outbox trigger and how.

mod common;

use std::time::Duration;

use common::worker::{endpoint, wait_settled, FAST};
use common::{lines, sqlstate, Cluster};
use outbox_receiver::Receiver;

#[test]
fn excluded_columns_never_leave_and_the_supabase_shape_is_sent() {
    let cluster = Cluster::start(FAST);
    let rx = Receiver::start().unwrap();
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/users"), ", event_types => '{user.*}'");
    endpoint(
        &mut c,
        &rx.url("/shop"),
        ", event_types => '{order.*}', tenant_id => 'acme'",
    );
    c.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, email text, password_hash text, api_token text);
         CREATE TRIGGER users_outbox AFTER INSERT OR UPDATE OR DELETE ON users FOR EACH ROW
             EXECUTE FUNCTION outbox.trigger('user', 'exclude=password_hash, api_token', 'shape=supabase');
         CREATE TABLE orders (id int PRIMARY KEY, shop text, total numeric);
         CREATE TRIGGER orders_outbox AFTER INSERT ON orders FOR EACH ROW
             WHEN (NEW.total > 0)
             EXECUTE FUNCTION outbox.trigger('order', 'tenant=shop');
         INSERT INTO users VALUES (1, 'a@example.com', 'argon2-s3cret', 'tok-s3cret');
         UPDATE users SET email = 'b@example.com' WHERE id = 1;
         DELETE FROM users WHERE id = 1;
         INSERT INTO orders VALUES (1, 'acme', 10), (2, 'acme', 0);",
    )
    .unwrap();
    assert!(rx.wait_for(4, Duration::from_secs(15)), "{}", cluster.log());
    assert!(wait_settled(&cluster, Duration::from_secs(10)));

    let users = rx.received_on("/users");
    assert_eq!(users.len(), 3);
    for r in &users {
        assert!(!r.body_text().contains("s3cret"), "{}", r.body_text());
    }
    let data: Vec<serde_json::Value> = users
        .iter()
        .map(|r| r.json().unwrap()["data"].clone())
        .collect();
    let by_type = |t: &str| data.iter().find(|d| d["type"] == t).unwrap().clone();
    let insert = by_type("INSERT");
    assert_eq!(insert["table"], "users");
    assert_eq!(insert["schema"], "public");
    assert_eq!(insert["record"]["email"], "a@example.com");
    assert!(insert["old_record"].is_null());
    let update = by_type("UPDATE");
    assert_eq!(update["record"]["email"], "b@example.com");
    assert_eq!(update["old_record"]["email"], "a@example.com");
    let delete = by_type("DELETE");
    assert!(delete["record"].is_null());
    assert_eq!(delete["old_record"]["id"], 1);
    assert!(delete["old_record"].get("password_hash").is_none());

    // The WHEN condition kept the zero-total order out; the tenant came from its column.
    let shop = rx.received_on("/shop");
    assert_eq!(shop.len(), 1);
    assert_eq!(shop[0].json().unwrap()["data"]["record"]["id"], 1);

    // Arguments that could leak or mislead are refused.
    c.batch_execute(
        "CREATE TABLE typo (id int, secret text);
         CREATE TRIGGER typo_outbox AFTER INSERT ON typo FOR EACH ROW
             EXECUTE FUNCTION outbox.trigger('typo', 'exclude=secrte');
         CREATE TABLE odd (id int);
         CREATE TRIGGER odd_outbox AFTER INSERT ON odd FOR EACH ROW
             EXECUTE FUNCTION outbox.trigger('odd', 'shape=soap');",
    )
    .unwrap();
    for (sql, code) in [
        ("INSERT INTO typo VALUES (1, 'x')", "42703"),
        ("INSERT INTO odd VALUES (1)", "22023"),
    ] {
        let e = c.batch_execute(sql).expect_err(sql);
        assert_eq!(sqlstate(&e), code, "{sql}: {e}");
    }

    // The view lists every outbox trigger with what it does.
    let listed = lines(
        &mut c,
        "SELECT concat_ws(' | ', table_name, trigger_name, enabled, events, event_prefix, arguments)
           FROM outbox.triggers ORDER BY table_name::text",
    );
    assert_eq!(
        listed,
        [
            "odd | odd_outbox | t | {INSERT} | odd | {shape=soap}",
            "orders | orders_outbox | t | {INSERT} | order | {tenant=shop}",
            "typo | typo_outbox | t | {INSERT} | typo | {exclude=secrte}",
            "users | users_outbox | t | {INSERT,UPDATE,DELETE} | user | {\"exclude=password_hash, api_token\",shape=supabase}",
        ]
    );
    assert!(lines(
        &mut c,
        "SELECT definition FROM outbox.triggers WHERE trigger_name = 'orders_outbox'"
    )[0]
    .contains("WHEN ((new.total > (0)::numeric))"));
}
