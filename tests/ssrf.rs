//! The SSRF guard with the real worker: loopback is refused unless allowed, by literal
//! address when an endpoint is saved and by resolved address when the worker sends. Only
//! loopback addresses are ever contacted here.

mod common;

use std::time::Duration;

use common::worker::{endpoint, scalar_text, wait_settled, FAST};
use common::{sqlstate, Cluster};
use outbox_receiver::Receiver;

fn message(e: &postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default()
}

#[test]
fn loopback_is_refused_unless_allowed() {
    let mut settings = FAST.to_vec();
    settings.push("outbox.allowed_targets = ''");
    let cluster = Cluster::start(&settings);
    let rx = Receiver::start().unwrap();
    let mut c = cluster.client();

    // A literal loopback address is refused when the endpoint is saved.
    let err = c
        .batch_execute(&format!(
            "SELECT outbox.create_endpoint('{}')",
            rx.url("/x")
        ))
        .unwrap_err();
    assert_eq!(sqlstate(&err), "22023");
    assert!(message(&err).contains("SSRF guard"), "{err:?}");
    let err = c
        .batch_execute("SELECT outbox.create_endpoint('http://169.254.169.254/latest/meta-data')")
        .unwrap_err();
    assert!(message(&err).contains("link-local"), "{err:?}");

    // A name that resolves to loopback is accepted when saved but refused when sent: the
    // delivery is dead at once, with the reason, and nothing reaches the receiver.
    let by_name = format!("http://localhost:{}/x", rx.port());
    let ep = endpoint(&mut c, &by_name, "");
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    assert!(
        wait_settled(&cluster, Duration::from_secs(10)),
        "{}",
        cluster.log()
    );
    let row = scalar_text(
        &mut c,
        &format!("SELECT concat_ws('|', status, attempts, last_error) FROM outbox.deliveries WHERE endpoint_id = '{ep}'"),
    );
    assert!(
        row.starts_with("dead|1|refused by the SSRF guard: localhost -> "),
        "{row}"
    );
    assert!(row.contains("loopback"), "{row}");
    assert_eq!(rx.count(), 0);

    // Listed by name: delivered.
    c.batch_execute("ALTER SYSTEM SET outbox.allowed_targets = 'localhost'")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(700));
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    assert!(rx.wait_for(1, Duration::from_secs(10)), "{}", cluster.log());
    assert!(wait_settled(&cluster, Duration::from_secs(10)));
    assert_eq!(
        scalar_text(&mut c, &format!("SELECT string_agg(status::text, ',' ORDER BY created_at) FROM outbox.deliveries WHERE endpoint_id = '{ep}'")),
        "dead,delivered"
    );
}
