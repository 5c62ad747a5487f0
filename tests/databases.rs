//! Several databases in one cluster: `outbox.database` lists them, the launcher keeps a
//! worker connected to each, a reload adds and removes databases without a restart, and a
//! listed database that does not exist (yet) holds back none of the others.

mod common;

use std::time::Duration;

use common::worker::{endpoint, scalar_i64, wait_until, FAST};
use common::Cluster;
use outbox_receiver::Receiver;

/// Worker processes connected to `database`.
fn workers_in(c: &mut postgres::Client, database: &str) -> i64 {
    scalar_i64(
        c,
        &format!(
            "SELECT count(*) FROM pg_stat_activity
              WHERE backend_type = 'webhook_outbox worker' AND datname = '{database}'"
        ),
    )
}

fn reload(c: &mut postgres::Client, databases: &str) {
    c.batch_execute(&format!("ALTER SYSTEM SET outbox.database = '{databases}'"))
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
}

/// Enqueues one event of `event_type` in `c`'s database and waits until `rx` has it.
fn delivered(c: &mut postgres::Client, rx: &Receiver, event_type: &str) -> bool {
    c.batch_execute(&format!("SELECT outbox.enqueue('{event_type}', '{{}}')"))
        .unwrap();
    wait_until(Duration::from_secs(20), || {
        rx.received().iter().any(|r| {
            r.json()
                .is_some_and(|j| j["type"].as_str() == Some(event_type))
        })
    })
}

#[test]
fn every_listed_database_is_served_by_its_own_workers_and_a_reload_changes_the_list() {
    // "missing" is listed before it exists: its worker cannot connect, and must hold back
    // no one else.
    let settings: Vec<&str> = FAST
        .iter()
        .copied()
        .chain([
            "outbox.database = 'postgres, missing'",
            "outbox.workers = 2",
        ])
        .collect();
    let cluster = Cluster::start(&settings);
    let rx = Receiver::start().unwrap();
    let mut main = cluster.client();
    for db in ["billing", "reports"] {
        main.batch_execute(&format!("CREATE DATABASE {db}"))
            .unwrap();
    }
    endpoint(&mut main, &rx.url("/main"), "");
    for db in ["billing", "reports"] {
        let mut c = cluster.client_to(db);
        c.batch_execute("CREATE EXTENSION webhook_outbox").unwrap();
        endpoint(&mut c, &rx.url(&format!("/{db}")), "");
    }
    assert!(wait_until(Duration::from_secs(20), || workers_in(
        &mut main, "postgres"
    ) == 2));
    assert!(delivered(&mut main, &rx, "main.first"), "{}", cluster.log());
    assert!(
        cluster
            .log()
            .contains("database \"missing\" does not exist"),
        "the missing database's worker tried and said why"
    );

    // A database not listed is not served: its events wait in its log, and its gauge says
    // no worker is there.
    let mut billing = cluster.client_to("billing");
    billing
        .batch_execute("SELECT outbox.enqueue('billing.early', '{}')")
        .unwrap();
    assert_eq!(
        scalar_i64(
            &mut billing,
            "SELECT value::bigint FROM outbox.metrics WHERE metric = 'outbox_worker_up'"
        ),
        0
    );

    // Listing it (no restart) starts its workers, which deliver what waited and what comes.
    reload(&mut main, "postgres, billing, reports");
    assert!(
        wait_until(Duration::from_secs(30), || workers_in(&mut main, "billing")
            == 2
            && workers_in(&mut main, "reports") == 2),
        "{}",
        cluster.log()
    );
    assert!(wait_until(Duration::from_secs(20), || rx
        .received_on("/billing")
        .len()
        == 1));
    assert!(delivered(&mut billing, &rx, "billing.later"));
    let mut reports = cluster.client_to("reports");
    assert!(delivered(&mut reports, &rx, "reports.first"));
    assert!(delivered(&mut main, &rx, "main.second"));
    assert_eq!(
        scalar_i64(
            &mut billing,
            "SELECT value::bigint FROM outbox.metrics WHERE metric = 'outbox_worker_processes'"
        ),
        2
    );
    // Each database's deliveries went to its own endpoint, once.
    assert_eq!(rx.received_on("/main").len(), 2);
    assert_eq!(rx.received_on("/billing").len(), 2);
    assert_eq!(rx.received_on("/reports").len(), 1);
    assert_eq!(
        scalar_i64(
            &mut main,
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'delivered'"
        ),
        2
    );

    // Unlisting a database stops its workers; the others deliver on.
    reload(&mut main, "postgres, billing");
    assert!(wait_until(Duration::from_secs(30), || workers_in(
        &mut main, "reports"
    ) == 0));
    reports
        .batch_execute("SELECT outbox.enqueue('reports.unserved', '{}')")
        .unwrap();
    assert!(delivered(&mut billing, &rx, "billing.last"));
    assert_eq!(workers_in(&mut main, "billing"), 2);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        rx.received_on("/reports").len(),
        1,
        "nothing is sent from an unlisted database"
    );

    // A worker that is stopped by hand comes back (the launcher starts it again).
    let pid = scalar_i64(
        &mut main,
        "SELECT min(pid)::bigint FROM pg_stat_activity WHERE backend_type = 'webhook_outbox worker' AND datname = 'billing'",
    );
    main.batch_execute(&format!("SELECT pg_terminate_backend({pid})"))
        .unwrap();
    assert!(wait_until(Duration::from_secs(20), || {
        workers_in(&mut main, "billing") == 2
            && scalar_i64(
                &mut main,
                &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
            ) == 0
    }));
    assert!(delivered(&mut billing, &rx, "billing.after_restart"));
}
