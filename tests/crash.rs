//! The crash matrix: while producers keep committing (and rolling back) enqueues, the worker
//! is killed, the server stops abruptly or restarts, the receiver goes away and comes back,
//! and the extension is dropped. Afterwards: every committed event arrived, none from a
//! rolled-back transaction, duplicates only for requests in flight at a crash, and nothing
//! is left in flight.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::worker::{
    endpoint, scalar_i64, wait_settled_through_restarts, wait_until, worker_pid, FAST, SECRET,
};
use common::Cluster;
use outbox_receiver::{Receiver, Reply};

/// Requests the worker may have in flight (outbox.max_in_flight in these tests): the most
/// that one crash may cause to be sent twice.
const IN_FLIGHT: usize = 20;

/// What the producers did: events whose transaction committed, events whose transaction
/// rolled back, and events whose COMMIT was cut off by a crash (either outcome is right).
#[derive(Default)]
struct Produced {
    committed: HashSet<String>,
    rolled_back: HashSet<String>,
    unknown: HashSet<String>,
}

/// Producers enqueueing in small transactions until stopped; one in four rolls back.
/// Connections broken by a crash are opened again.
struct Producers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Produced>>,
}

impl Producers {
    fn start(cluster: &Cluster, count: usize) -> Producers {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..count)
            .map(|p| {
                let (info, stop) = (cluster.conninfo(), stop.clone());
                std::thread::spawn(move || produce(&info, p, &stop))
            })
            .collect();
        Producers { stop, threads }
    }

    fn finish(self) -> Produced {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Produced::default();
        for t in self.threads {
            let p = t.join().unwrap();
            all.committed.extend(p.committed);
            all.rolled_back.extend(p.rolled_back);
            all.unknown.extend(p.unknown);
        }
        all
    }
}

fn produce(info: &str, producer: usize, stop: &AtomicBool) -> Produced {
    let mut done = Produced::default();
    let mut client: Option<postgres::Client> = None;
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let c = match client.as_mut() {
            Some(c) => c,
            None => match postgres::Client::connect(info, postgres::NoTls) {
                Ok(c) => client.insert(c),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        n += 1;
        let ids: Vec<String> = (0..5).map(|k| format!("p{producer}-{n}-{k}")).collect();
        let rollback = n % 4 == 0;
        let result = (|| -> Result<(), postgres::Error> {
            let mut tx = c.transaction()?;
            for id in &ids {
                tx.execute(
                    "SELECT outbox.enqueue('crash.test', jsonb_build_object('id', $1::text), event_id => $1)",
                    &[id],
                )?;
            }
            if rollback {
                tx.rollback()
            } else {
                tx.commit()
            }
        })();
        match result {
            Ok(()) if rollback => done.rolled_back.extend(ids),
            Ok(()) => done.committed.extend(ids),
            // Failed before COMMIT was sent: rolled back. A failed COMMIT itself: unknown.
            // (The two are not told apart here; treating both as unknown is the safe side.)
            Err(_) => {
                done.unknown.extend(ids);
                client = None;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    done
}

fn kill_worker(cluster: &Cluster) -> i32 {
    let pid = worker_pid(cluster);
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    pid
}

/// The guarantees, checked after a run with `crashes` crashes.
fn check(cluster: &Cluster, rx: &Receiver, produced: &Produced, crashes: usize) {
    assert!(
        wait_settled_through_restarts(cluster, Duration::from_secs(120)),
        "deliveries left pending or in flight:\n{}",
        cluster.log()
    );
    let received: Vec<String> = rx.received().into_iter().map(|r| r.webhook_id).collect();
    let distinct: HashSet<String> = received.iter().cloned().collect();
    let lost: Vec<&String> = produced.committed.difference(&distinct).collect();
    assert!(lost.is_empty(), "committed but never delivered: {lost:?}");
    let ghosts: Vec<&String> = produced.rolled_back.intersection(&distinct).collect();
    assert!(ghosts.is_empty(), "rolled back but delivered: {ghosts:?}");
    let strangers: Vec<&String> = distinct
        .iter()
        .filter(|id| !produced.committed.contains(*id) && !produced.unknown.contains(*id))
        .collect();
    assert!(
        strangers.is_empty(),
        "delivered but never committed: {strangers:?}"
    );
    let duplicates = received.len() - distinct.len();
    assert!(
        duplicates <= crashes * IN_FLIGHT,
        "{duplicates} duplicates for {crashes} crashes of at most {IN_FLIGHT} requests in flight"
    );
    assert!(
        produced.committed.len() > 100,
        "the producers barely ran: {}",
        produced.committed.len()
    );
    // Every attempt was recorded or its lease ran out; nothing is dead (the receiver
    // always answered 200 once reachable).
    let mut c = cluster.client();
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.delivery WHERE status <> 'delivered'"
        ),
        0
    );
    eprintln!(
        "{} committed, {} rolled back, {} unknown, {} requests, {duplicates} duplicates",
        produced.committed.len(),
        produced.rolled_back.len(),
        produced.unknown.len(),
        received.len()
    );
}

fn setup(extra: &[&'static str]) -> (Cluster, Receiver) {
    let settings: Vec<&str> = FAST
        .iter()
        .copied()
        .chain(["outbox.max_in_flight = 20"])
        .chain(extra.iter().copied())
        .collect();
    let cluster = Cluster::start(&settings);
    let rx = Receiver::start().unwrap();
    rx.set_secret(Some(SECRET.into()));
    rx.set_default("/c", Reply::Delay(Duration::from_millis(50), 200));
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/c"), "");
    (cluster, rx)
}

#[test]
fn the_worker_killed_three_times_mid_batch_loses_nothing() {
    let (cluster, rx) = setup(&[]);
    let producers = Producers::start(&cluster, 3);
    for round in 1..=3 {
        let seen = rx.count();
        assert!(
            rx.wait_for(seen + 30, Duration::from_secs(30)),
            "round {round}"
        );
        let killed = kill_worker(&cluster);
        // The postmaster restarts every backend after a crash; wait for a new worker.
        assert!(wait_until(Duration::from_secs(60), || {
            postgres::Client::connect(&cluster.conninfo(), postgres::NoTls)
                .ok()
                .and_then(|mut c| {
                    c.query_one(
                        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'webhook_outbox worker'",
                        &[],
                    )
                    .ok()
                })
                .map(|r| r.get::<_, i32>(0) != killed)
                .unwrap_or(false)
        }));
    }
    std::thread::sleep(Duration::from_secs(1));
    let produced = producers.finish();
    check(&cluster, &rx, &produced, 3);
}

#[test]
fn an_immediate_stop_mid_flight_then_a_start_loses_nothing() {
    let (mut cluster, rx) = setup(&[]);
    let producers = Producers::start(&cluster, 2);
    assert!(rx.wait_for(50, Duration::from_secs(30)));
    // No shutdown checkpoint, no goodbye from the worker: crash recovery on the next start.
    cluster.stop("immediate");
    std::thread::sleep(Duration::from_millis(500));
    cluster.pg_ctl_start();
    let seen = rx.count();
    assert!(rx.wait_for(seen + 30, Duration::from_secs(60)));
    let produced = producers.finish();
    check(&cluster, &rx, &produced, 1);
}

#[test]
fn a_fast_restart_mid_flight_loses_nothing() {
    let (mut cluster, rx) = setup(&[]);
    let producers = Producers::start(&cluster, 2);
    assert!(rx.wait_for(50, Duration::from_secs(30)));
    cluster.restart("fast");
    let seen = rx.count();
    assert!(rx.wait_for(seen + 30, Duration::from_secs(60)));
    let produced = producers.finish();
    check(&cluster, &rx, &produced, 1);
}

#[test]
fn a_receiver_that_goes_away_and_comes_back_gets_everything() {
    // Retries long enough to outlast the outage, and a breaker that probes again soon.
    let (cluster, rx) = setup(&[
        "outbox.retry_schedule = '300ms, 1s, 2s, 3s, 5s, 8s'",
        "outbox.circuit_cooldown = '1s'",
    ]);
    let port = rx.port();
    // Every request either receiver ever saw, recorded as it arrives.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = |rx: &Receiver| {
        let seen = seen.clone();
        rx.on_request(move |r| seen.lock().unwrap().push(r.webhook_id.clone()));
    };
    record(&rx);
    let producers = Producers::start(&cluster, 2);
    assert!(rx.wait_for(50, Duration::from_secs(30)));
    // The receiver process dies: requests in flight are cut, new ones are refused.
    drop(rx);
    std::thread::sleep(Duration::from_secs(2));
    let rx = Receiver::start_on(port).unwrap();
    record(&rx);
    rx.set_default("/c", Reply::Delay(Duration::from_millis(50), 200));
    std::thread::sleep(Duration::from_secs(2));
    let produced = producers.finish();
    assert!(
        wait_settled_through_restarts(&cluster, Duration::from_secs(120)),
        "{}",
        cluster.log()
    );
    let received = seen.lock().unwrap().clone();
    let distinct: HashSet<&String> = received.iter().collect();
    let lost: Vec<&String> = produced
        .committed
        .iter()
        .filter(|id| !distinct.contains(id))
        .collect();
    assert!(lost.is_empty(), "committed but never delivered: {lost:?}");
    assert!(produced.rolled_back.iter().all(|id| !distinct.contains(id)));
    let mut c = cluster.client();
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM outbox.delivery WHERE status <> 'delivered'"
        ),
        0,
        "nothing went dead during the outage"
    );
}

#[test]
fn dropping_the_extension_while_busy_is_clean() {
    let (cluster, rx) = setup(&[]);
    rx.set_default("/c", Reply::Delay(Duration::from_millis(300), 200));
    let mut c = cluster.client();
    c.batch_execute(
        "SELECT outbox.enqueue('busy.test', jsonb_build_object('n', g)) FROM generate_series(1, 500) g",
    )
    .unwrap();
    assert!(rx.wait_for(10, Duration::from_secs(30)));
    let pid = worker_pid(&cluster);
    // DROP waits at most for the worker's current short transaction; the queue goes with
    // the extension, and the worker carries on without it.
    let started = Instant::now();
    c.batch_execute("DROP EXTENSION webhook_outbox").unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    let after_drop = rx.count();
    std::thread::sleep(Duration::from_secs(2));
    // At most the requests already in flight finish arriving; nothing new is sent.
    assert!(rx.count() <= after_drop + IN_FLIGHT);
    assert_eq!(
        worker_pid(&cluster),
        pid,
        "the worker neither crashed nor restarted"
    );
    // Created again, it delivers again (the same worker picks it up).
    rx.clear();
    c.batch_execute("CREATE EXTENSION webhook_outbox").unwrap();
    endpoint(&mut c, &rx.url("/c"), "");
    c.batch_execute("SELECT outbox.enqueue('busy.again', '{}', event_id => 'again-1')")
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || rx
            .received()
            .iter()
            .any(|r| r.webhook_id == "again-1")),
        "{}",
        cluster.log()
    );
    assert_eq!(worker_pid(&cluster), pid);
    let log = cluster.log();
    assert!(
        !log.contains("PANIC") && !log.contains("terminated by signal"),
        "{log}"
    );
}
