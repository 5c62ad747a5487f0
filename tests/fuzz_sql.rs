//! Generated input against the SQL API through a real connection, with the worker running:
//! 10,000 calls. Every call either succeeds or fails with one of the documented SQLSTATEs;
//! no backend or worker crashes, and the queue stays consistent.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;

use common::worker::{scalar_i64, worker_pid, FAST};
use common::Cluster;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// SQLSTATEs a refusal may carry: our own, and PostgreSQL's for text it will not parse.
const ALLOWED: &[&str] = &[
    "22023", "22P02", "22004", "23502", "54000", "P0002", "55000", "2202E", // ours
    "22021", "22P05", "22007", "22008", "22015", "22003", "54001", "42804", // input parsing
];

fn texty() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z]{1,8}(\\.[a-z*]{1,8}){0,3}",
        "https?://[a-zA-Z0-9.:@\\[\\]/?#%_-]{0,40}",
        "whsec_[A-Za-z0-9+/=]{0,60}",
        "-?[0-9]{1,6} ?(ms|s|seconds|min|hours|days|x)?",
        "\\{\"[a-zA-Z:\r\n -]{0,12}\": ?(\"[ -~\r\n]{0,12}\"|[0-9]{1,3}|null)\\}",
        "\\{?\\[?[a-z0-9,\" {}]{0,20}",
    ]
}

#[derive(Debug, Clone)]
enum Call {
    CreateEndpoint {
        url: String,
        types: String,
        secret: Option<String>,
        headers: String,
        timeout: Option<String>,
    },
    Enqueue {
        event_type: String,
        payload: String,
        event_id: Option<String>,
        tenant: Option<String>,
    },
    Claim {
        batch: i32,
        lease: String,
    },
    Ack {
        attempt: i32,
        outcome: String,
        code: i32,
    },
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        (
            texty(),
            texty(),
            proptest::option::of(texty()),
            texty(),
            proptest::option::of(texty())
        )
            .prop_map(
                |(url, types, secret, headers, timeout)| Call::CreateEndpoint {
                    url,
                    types,
                    secret,
                    headers,
                    timeout
                }
            ),
        (
            texty(),
            texty(),
            proptest::option::of(texty()),
            proptest::option::of(texty())
        )
            .prop_map(|(event_type, payload, event_id, tenant)| Call::Enqueue {
                event_type,
                payload,
                event_id,
                tenant
            }),
        (any::<i32>(), texty()).prop_map(|(batch, lease)| Call::Claim { batch, lease }),
        (any::<i32>(), "(delivered|retry|dead|[a-z]{0,6})", 0i32..700).prop_map(
            |(attempt, outcome, code)| Call::Ack {
                attempt,
                outcome,
                code
            }
        ),
    ]
}

fn run(c: &mut postgres::Client, call: &Call) -> Result<(), postgres::Error> {
    match call {
        Call::CreateEndpoint { url, types, secret, headers, timeout } => c
            .execute(
                "SELECT outbox.create_endpoint($1, $2::text::text[], $3, $4::text::jsonb, $5::text::interval)",
                &[url, types, secret, headers, timeout],
            )
            .map(drop),
        Call::Enqueue { event_type, payload, event_id, tenant } => c
            .execute(
                "SELECT outbox.enqueue($1, $2::text::jsonb, event_id => $3, tenant_id => $4)",
                &[event_type, payload, event_id, tenant],
            )
            .map(drop),
        Call::Claim { batch, lease } => c
            .execute("SELECT * FROM outbox.claim($1, 'fuzz', $2::text::interval)", &[batch, lease])
            .map(drop),
        Call::Ack { attempt, outcome, code } => c
            .execute(
                "SELECT outbox.ack(d.id, $1, $2::text::outbox.attempt_outcome, $3)
                   FROM outbox.delivery d WHERE d.status = 'in_flight' LIMIT 1",
                &[attempt, outcome, code],
            )
            .map(drop),
    }
}

#[test]
fn ten_thousand_generated_calls_get_results_or_proper_refusals() {
    let cluster = Cluster::start(FAST);
    let worker = worker_pid(&cluster);
    let mut c = cluster.client();
    c.batch_execute("SELECT outbox.create_endpoint('http://127.0.0.1:9/fuzz')")
        .unwrap();
    let c = c;

    // The runner takes an `Fn`: the connection and the tally live in cells.
    let conn = RefCell::new(c);
    let tally: RefCell<BTreeMap<String, usize>> = RefCell::new(BTreeMap::new());
    let mut runner = TestRunner::new(Config {
        cases: 10_000,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&call(), |call| {
            let result = run(&mut conn.borrow_mut(), &call);
            let mut refusals = tally.borrow_mut();
            match result {
                Ok(()) => *refusals.entry("ok".into()).or_default() += 1,
                Err(e) => {
                    let code = e.code().map(|s| s.code().to_string());
                    prop_assert!(
                        code.as_deref().is_some_and(|s| ALLOWED.contains(&s)),
                        "unexpected failure {e:?} for {call:?}"
                    );
                    *refusals.entry(code.unwrap()).or_default() += 1;
                }
            }
            Ok(())
        })
        .unwrap();
    let refusals = tally.into_inner();
    let mut c = conn.into_inner();
    eprintln!("outcomes: {refusals:?}");
    assert!(
        refusals.get("ok").copied().unwrap_or(0) > 100,
        "some calls succeed: {refusals:?}"
    );

    // Nothing crashed: the same worker runs, the connection is the same, and every delivery
    // has a valid status.
    assert_eq!(worker_pid(&cluster), worker, "the worker never restarted");
    let log = cluster.log();
    assert!(
        !log.contains("terminated by signal") && !log.contains("PANIC"),
        "{log}"
    );
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox.delivery d LEFT JOIN outbox.event e ON e.id = d.event_id WHERE e.id IS NULL"), 0);
}
