//! The README's quickstart, as a reader would paste it: every SQL block of that section, in
//! order, against a fresh cluster, with the bundled receiver standing in for the Python one
//! (same secret, same checks). If the README changes, this runs the new text.

mod common;

use std::time::Duration;

use common::worker::{wait_settled, FAST};
use common::Cluster;
use outbox_receiver::Receiver;

/// The port the quickstart's receiver listens on.
const QUICKSTART_PORT: &str = "8099";

/// The ```sql blocks between the quickstart's heading and the next section.
fn quickstart_sql() -> Vec<String> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("## Quickstart")
        .expect("the README has a quickstart");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    section
        .split("```sql\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap().to_string())
        .collect()
}

/// One statement at a time (ALTER SYSTEM refuses a multi-statement string), comments off.
fn statements(block: &str) -> Vec<String> {
    let text: String = block
        .lines()
        .map(|l| l.split(" --").next().unwrap().trim_end())
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_readme_quickstart_delivers_what_it_says() {
    let cluster = Cluster::start_empty(FAST);
    let rx = Receiver::start().unwrap();
    let port = rx.port().to_string();
    let mut c = cluster.client();
    let blocks = quickstart_sql();
    assert!(blocks.len() >= 4, "{blocks:?}");
    for (i, block) in blocks.iter().enumerate() {
        for sql in statements(&block.replace(QUICKSTART_PORT, &port)) {
            let rows = c
                .simple_query(&sql)
                .unwrap_or_else(|e| panic!("quickstart block {i}: {sql}: {e}"));
            // The endpoint's secret, once read, is the receiver's.
            if sql.contains("outbox.endpoint_secret") {
                let secret = rows
                    .iter()
                    .find_map(|m| match m {
                        postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                        _ => None,
                    })
                    .expect("the quickstart reads the secret");
                rx.set_secret(Some(secret));
            }
        }
        // The settings it reloads take effect before the next block.
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(rx.wait_for(2, Duration::from_secs(15)), "{}", cluster.log());
    assert!(wait_settled(&cluster, Duration::from_secs(10)));
    let got = rx.received();
    assert_eq!(
        got.len(),
        2,
        "one event per committed change, none for the WHEN-false row"
    );
    assert!(got.iter().all(|r| r.verified == Some(true)));
    let mut types: Vec<String> = got
        .iter()
        .map(|r| r.json().unwrap()["type"].as_str().unwrap().to_string())
        .collect();
    types.sort();
    assert_eq!(types, ["order.created", "order.repriced"]);
}
