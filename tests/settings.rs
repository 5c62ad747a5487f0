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
