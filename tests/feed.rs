//! LISTEN / NOTIFY: the live feed of delivery status changes (global, per endpoint, per
//! tenant) and operator events, as a listening client sees them with the worker running.

mod common;

use std::time::Duration;

use common::worker::{
    collect_notifications as collect, endpoint, scalar_text, wait_read, wait_settled, FAST,
};
use common::Cluster;
use outbox_receiver::{Receiver, Reply};

fn statuses(got: &[(String, serde_json::Value)], channel: &str, id: &str) -> Vec<String> {
    got.iter()
        .filter(|(ch, v)| ch == channel && v["id"] == id)
        .map(|(_, v)| v["status"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn listeners_follow_deliveries_and_operators_hear_about_trouble() {
    let settings: Vec<&str> = FAST
        .iter()
        .copied()
        .chain(["outbox.live_feed = on"])
        .collect();
    let cluster = Cluster::start(&settings);
    let rx = Receiver::start().unwrap();
    rx.script("/flaky", vec![Reply::Status(500)]);
    rx.set_default("/reject", Reply::Status(400));
    rx.set_default("/gone", Reply::Status(410));
    let mut c = cluster.client();
    let flaky = endpoint(&mut c, &rx.url("/flaky"), ", tenant_id => 'acme'");
    let reject = endpoint(&mut c, &rx.url("/reject"), ", tenant_id => 'acme'");
    let gone = endpoint(&mut c, &rx.url("/gone"), ", tenant_id => 'acme'");
    let ops = endpoint(&mut c, &rx.url("/ops"), "");
    c.batch_execute(&format!(
        "ALTER SYSTEM SET outbox.operator_endpoint = '{ops}'"
    ))
    .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let mut listener = cluster.client();
    listener
        .batch_execute(&format!(
            "LISTEN outbox_feed; LISTEN outbox_operator; LISTEN \"outbox_feed_{reject}\"; LISTEN outbox_feed_tenant_acme"
        ))
        .unwrap();
    c.batch_execute("SELECT outbox.enqueue('order.created', '{}', tenant_id => 'acme')")
        .unwrap();
    wait_read(&mut c);
    let id_of = |c: &mut postgres::Client, ep: &str| {
        scalar_text(c, &format!("SELECT id::text FROM outbox.delivery WHERE endpoint_id = '{ep}' AND replay_of IS NULL LIMIT 1"))
    };
    let (flaky_id, reject_id, gone_id) = (
        id_of(&mut c, &flaky),
        id_of(&mut c, &reject),
        id_of(&mut c, &gone),
    );
    let got = collect(&mut listener, Duration::from_secs(15), |got| {
        statuses(got, "outbox_feed", &flaky_id).contains(&"delivered".to_string())
            && got.iter().filter(|(ch, _)| ch == "outbox_operator").count() >= 3
    });

    assert_eq!(
        statuses(&got, "outbox_feed", &flaky_id),
        ["queued", "retrying", "delivered"]
    );
    assert_eq!(
        statuses(&got, "outbox_feed", &reject_id),
        ["queued", "dead"]
    );
    assert_eq!(statuses(&got, "outbox_feed", &gone_id), ["queued", "dead"]);
    // The endpoint's own channel carries only its deliveries; the tenant's carries all three.
    let reject_channel = format!("outbox_feed_{reject}");
    assert!(got
        .iter()
        .filter(|(ch, _)| *ch == reject_channel)
        .all(|(_, v)| v["endpoint_id"] == reject.as_str()));
    assert_eq!(
        statuses(&got, &reject_channel, &reject_id),
        ["queued", "dead"]
    );
    assert_eq!(
        statuses(&got, "outbox_feed_tenant_acme", &flaky_id),
        ["queued", "retrying", "delivered"]
    );
    let feed = got.iter().find(|(ch, _)| ch == "outbox_feed").unwrap();
    // Anyone who can connect may LISTEN: ids and the status only.
    let mut keys: Vec<&String> = feed.1.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["attempt", "endpoint_id", "id", "status"]);
    assert!(
        !feed.1.to_string().contains("whsec_"),
        "no secret in the feed"
    );

    // Operator events: two deaths and one endpoint disabled by 410 Gone.
    let ops_events: Vec<&serde_json::Value> = got
        .iter()
        .filter(|(ch, _)| ch == "outbox_operator")
        .map(|(_, v)| v)
        .collect();
    let kinds: Vec<&str> = ops_events
        .iter()
        .map(|v| v["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "outbox.delivery.dead")
            .count(),
        2,
        "{kinds:?}"
    );
    assert!(kinds.contains(&"outbox.endpoint.disabled"), "{kinds:?}");
    let dead = ops_events
        .iter()
        .find(|v| v["delivery_id"] == reject_id.as_str())
        .unwrap();
    assert_eq!(dead["endpoint_id"], reject.as_str());
    assert!(
        dead.get("status_code").is_none() && dead.get("error").is_none(),
        "{dead}"
    );

    // The operator endpoint receives them as webhooks too.
    assert!(wait_settled(&cluster, Duration::from_secs(10)));
    let delivered: Vec<String> = rx
        .received_on("/ops")
        .iter()
        .map(|r| r.json().unwrap()["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        delivered
            .iter()
            .filter(|t| *t == "outbox.delivery.dead")
            .count(),
        2,
        "{delivered:?}"
    );
    assert!(
        delivered.contains(&"outbox.endpoint.disabled".to_string()),
        "{delivered:?}"
    );
    // ... with the details, which only the operator endpoint (chosen by an administrator)
    // gets.
    let details = rx
        .received_on("/ops")
        .iter()
        .map(|r| r.json().unwrap()["data"].clone())
        .find(|d| d["delivery_id"] == reject_id.as_str())
        .unwrap();
    assert_eq!(details["status_code"], 400);

    // Switched off, the feed is silent; operator events are not.
    c.batch_execute("ALTER SYSTEM SET outbox.live_feed = off")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    c.batch_execute(&format!(
        "SELECT outbox.enqueue('order.created', '{{}}', endpoint_id => '{reject}', tenant_id => 'acme')"
    ))
    .unwrap();
    let got = collect(&mut listener, Duration::from_secs(10), |got| {
        got.iter().any(|(ch, _)| ch == "outbox_operator")
    });
    assert!(
        got.iter().all(|(ch, _)| !ch.starts_with("outbox_feed")),
        "{got:?}"
    );
    assert!(got.iter().any(|(ch, _)| ch == "outbox_operator"));
}
