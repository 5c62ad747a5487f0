//! Settings as a DBA meets them: the `outbox.` prefix belongs to the extension, so a
//! misspelled setting is an error rather than a value silently ignored.

mod common;

use common::worker::FAST;
use common::{sqlstate, Cluster};

#[test]
fn a_misspelled_outbox_setting_is_an_error() {
    let cluster = Cluster::start(FAST);
    let mut c = cluster.client();
    // invalid_name for a session, undefined_object for postgresql.auto.conf.
    for (sql, code) in [
        ("SET outbox.retry_schedul = '1s'", "42602"),
        ("ALTER SYSTEM SET outbox.circuit_treshold = 3", "42704"),
    ] {
        let e = c.batch_execute(sql).expect_err(sql);
        assert_eq!(sqlstate(&e), code, "{sql}: {e}");
        let message = e.as_db_error().unwrap().message().to_string();
        assert!(message.contains("outbox."), "{message}");
    }
    // The real names work as before.
    for sql in [
        "SET outbox.retry_schedule = '1s, 2s'",
        "ALTER SYSTEM SET outbox.circuit_threshold = 3",
        "ALTER SYSTEM RESET outbox.circuit_threshold",
    ] {
        c.batch_execute(sql).unwrap();
    }
}

#[test]
fn a_setting_that_does_not_parse_is_refused_when_set_with_the_reason() {
    let cluster = Cluster::start(FAST);
    let mut c = cluster.client();
    for (sql, reason) in [
        ("SET outbox.retry_schedule = '5s, 2 fortnights'", "unit"),
        (
            "ALTER SYSTEM SET outbox.allowed_targets = '10.0.0.0/99'",
            "10.0.0.0/99",
        ),
        (
            "ALTER SYSTEM SET outbox.dns_servers = 'dns.example.com'",
            "dns.example.com",
        ),
        (
            "ALTER SYSTEM SET outbox.database = 'app, billing, app'",
            "listed twice",
        ),
    ] {
        let e = c.batch_execute(sql).expect_err(sql);
        assert_eq!(sqlstate(&e), "22023", "{sql}: {e}");
        let db = e.as_db_error().unwrap();
        let detail = db.detail().unwrap_or("");
        assert!(
            db.message().contains("outbox.") && !detail.is_empty() && detail.contains(reason),
            "{sql}: {} / {detail}",
            db.message()
        );
    }
    // Valid values pass, and what is in effect is unchanged by the refusals.
    for sql in [
        "SET outbox.retry_schedule = '1s, 1m'",
        "ALTER SYSTEM SET outbox.allowed_targets = '10.0.0.0/8, hooks.internal'",
        "ALTER SYSTEM SET outbox.dns_servers = '127.0.0.1:5353'",
        "ALTER SYSTEM RESET ALL",
    ] {
        c.batch_execute(sql).unwrap();
    }
    assert_eq!(
        c.query_one("SHOW outbox.retry_schedule", &[])
            .unwrap()
            .get::<_, String>(0),
        "1s, 1m"
    );
}
