//! HTTPS to a receiver with a self-signed certificate: refused (and retried) while only the
//! system's roots are trusted, delivered once outbox.ca_file names its certificate.

mod common;

use std::time::Duration;

use common::worker::{endpoint, scalar_text, wait_settled, wait_until};
use common::Cluster;
use outbox_receiver::Receiver;

#[test]
fn a_private_ca_is_trusted_only_when_configured() {
    let cluster = Cluster::start(&[
        "shared_preload_libraries = 'webhook_outbox'",
        "outbox.retry_schedule = '1s, 2s, 3s, 5s, 5s'",
        "outbox.poll_interval = '200ms'",
    ]);
    let issued =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_pem = issued.cert.pem();
    let rx = Receiver::start_tls(&cert_pem, &issued.key_pair.serialize_pem()).unwrap();
    let ca_file = cluster.dir.join("receiver-ca.pem");
    std::fs::write(&ca_file, &cert_pem).unwrap();

    let mut c = cluster.client();
    let ep = endpoint(&mut c, &rx.url("/secure"), "");
    c.batch_execute("SELECT outbox.enqueue('x.y', '{}')")
        .unwrap();
    let first_error = |c: &mut postgres::Client| {
        c.query_opt(
            &format!("SELECT error FROM outbox.attempts WHERE endpoint_id = '{ep}' AND attempt = 1")
                as &str,
            &[],
        )
        .unwrap()
        .map(|r| r.get::<_, String>(0))
    };
    assert!(
        wait_until(Duration::from_secs(10), || first_error(&mut c).is_some()),
        "{}",
        cluster.log()
    );
    let error = first_error(&mut c).unwrap();
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    assert_eq!(rx.count(), 0);

    c.batch_execute(&format!(
        "ALTER SYSTEM SET outbox.ca_file = '{}'",
        ca_file.display()
    ))
    .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    assert!(rx.wait_for(1, Duration::from_secs(20)), "{}", cluster.log());
    assert!(wait_settled(&cluster, Duration::from_secs(10)));
    assert_eq!(
        scalar_text(&mut c, &format!("SELECT concat_ws('|', status, last_status_code) FROM outbox.deliveries WHERE endpoint_id = '{ep}'")),
        "delivered|200"
    );
}
