//! The crash matrix: while producers keep committing (and rolling back) enqueues, the worker
//! is killed, the server stops abruptly or restarts, the receiver goes away and comes back,
//! and the extension is dropped. Afterwards: every committed event arrived, none from a
//! rolled-back transaction, duplicates only for requests in flight at a crash, and nothing
//! is left in flight.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use common::worker::{endpoint, scalar_i64, wait_until, worker_pid, FAST, SECRET};
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
    /// `count` producers whose event ids start with `tag`.
    fn start(cluster: &Cluster, count: usize, tag: &str) -> Producers {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..count)
            .map(|p| {
                let (info, stop) = (cluster.conninfo(), stop.clone());
                let tag = format!("{tag}{p}");
                std::thread::spawn(move || produce(&info, &tag, &stop))
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

fn produce(info: &str, producer: &str, stop: &AtomicBool) -> Produced {
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
        let ids: Vec<String> = (0..5).map(|k| format!("{producer}-{n}-{k}")).collect();
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

/// Every request the receiver (and a successor on the same port) got, by webhook-id and
/// arrival time, recorded as it arrives.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<Vec<(String, SystemTime)>>>);

impl Arrivals {
    fn attach(&self, rx: &Receiver) {
        let all = self.0.clone();
        rx.on_request(move |r| {
            all.lock()
                .unwrap()
                .push((r.webhook_id.clone(), r.received_at))
        });
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn entries(&self) -> Vec<(String, SystemTime)> {
        self.0.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.count() >= n)
    }
}

/// A request sent just before a crash may be recorded by the receiver a moment after it.
/// Crashes are at least `CRASH_GAP` apart, so that this is never mistaken for the next
/// crash's.
const CRASH_SLACK: Duration = Duration::from_millis(200);
const CRASH_GAP: Duration = Duration::from_secs(1);
/// How long a delivery may stay in flight after its lease ran out before the worker must
/// have put it back (it wakes for expired leases; the poll interval is 200 ms).
const LEASE_SLACK: &str = "5 seconds";

fn kill_worker(cluster: &Cluster) -> i32 {
    let pid = worker_pid(cluster);
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    pid
}

/// Waits (reconnecting through restarts) until every event was read and nothing is pending
/// or in flight; meanwhile
/// no delivery may stay in flight long after its lease expired.
fn settle(cluster: &Cluster, timeout: Duration) {
    let mut stuck: Vec<String> = Vec::new();
    let settled = wait_until(timeout, || {
        let Ok(mut c) = postgres::Client::connect(&cluster.conninfo(), postgres::NoTls) else {
            return false;
        };
        let Ok(rows) = c.query(
            &format!(
                "SELECT id::text, attempts, lease_owner, (now() - due_at)::text, status::text
                   FROM outbox.delivery
                  WHERE status IN ('pending', 'in_flight')
                  ORDER BY status = 'in_flight' AND due_at < now() - interval '{LEASE_SLACK}' DESC
                  LIMIT 5"
            ),
            &[],
        ) else {
            return false;
        };
        // The first rows are the stuck ones, if any.
        let lease_expired_long_ago = c
            .query_one(
                &format!(
                    "SELECT count(*) FROM outbox.delivery
                      WHERE status = 'in_flight' AND due_at < now() - interval '{LEASE_SLACK}'"
                ),
                &[],
            )
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0);
        if lease_expired_long_ago > 0 && stuck.is_empty() {
            stuck = rows
                .iter()
                .map(|r| {
                    format!(
                        "{} attempt {} held by {:?}, lease expired {} ago",
                        r.get::<_, String>(0),
                        r.get::<_, i32>(1),
                        r.get::<_, Option<String>>(2),
                        r.get::<_, String>(3)
                    )
                })
                .collect();
        }
        // Events not read from the log yet (those of a batch whose first attempts are
        // out included) have no delivery row.
        let unread = c
            .query_one("SELECT unread FROM outbox.log_status", &[])
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(1);
        rows.is_empty() && unread == 0
    });
    assert!(
        settled,
        "deliveries left pending or in flight:\n{}",
        cluster.log()
    );
    assert!(
        stuck.is_empty(),
        "deliveries stayed in flight over {LEASE_SLACK} past their lease: {stuck:?}"
    );
}

/// The guarantees, checked after a run with a crash at each of `crashes`, each of which may
/// cause at most `per_crash` requests to be sent again.
fn check(
    cluster: &Cluster,
    arrivals: &Arrivals,
    produced: &Produced,
    crashes: &[SystemTime],
    per_crash: usize,
) {
    settle(cluster, Duration::from_secs(120));
    let received = arrivals.entries();
    let mut first: HashMap<&str, SystemTime> = HashMap::new();
    let mut times: HashMap<&str, usize> = HashMap::new();
    for (id, at) in &received {
        first.entry(id).or_insert(*at);
        *times.entry(id).or_default() += 1;
    }
    let distinct: HashSet<String> = times.keys().map(|id| id.to_string()).collect();
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
        duplicates <= crashes.len() * per_crash,
        "{duplicates} duplicates for {} crashes of at most {per_crash} requests in flight",
        crashes.len()
    );
    // A request is sent again only when its sender went away before recording it: the first
    // copy arrived before a crash, and the sender alive then had at most `per_crash` of them.
    let mut per_window = vec![Vec::new(); crashes.len()];
    for (id, n) in times.iter().filter(|(_, n)| **n > 1) {
        let at = first[id];
        match crashes.iter().position(|crash| at <= *crash + CRASH_SLACK) {
            Some(i) => per_window[i].push(*id),
            None => panic!("{id} arrived {n} times, the first time after the last crash"),
        }
    }
    for (i, ids) in per_window.iter().enumerate() {
        assert!(
            ids.len() <= per_crash,
            "crash {}: {} events sent again, at most {per_crash} were in flight: {ids:?}\n{}",
            i + 1,
            ids.len(),
            explain(cluster, &received, crashes, &ids[..ids.len().min(5)])
        );
    }
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

/// For a failure message: when each of `ids` arrived (relative to the first crash) and what
/// the history says about its delivery.
fn explain(
    cluster: &Cluster,
    received: &[(String, SystemTime)],
    crashes: &[SystemTime],
    ids: &[&str],
) -> String {
    let origin = crashes.first().copied().unwrap_or(SystemTime::UNIX_EPOCH);
    let rel = |t: SystemTime| match t.duration_since(origin) {
        Ok(d) => format!("+{:.3}s", d.as_secs_f64()),
        Err(e) => format!("-{:.3}s", e.duration().as_secs_f64()),
    };
    let mut out = format!(
        "crashes at {:?}\n",
        crashes.iter().map(|c| rel(*c)).collect::<Vec<_>>()
    );
    let mut c = cluster.client();
    for id in ids {
        let arrived: Vec<String> = received
            .iter()
            .filter(|(r, _)| r == id)
            .map(|(_, at)| rel(*at))
            .collect();
        let history: Vec<String> = c
            .query(
                "SELECT concat_ws(' ', a.attempt, a.outcome, a.worker, a.created_at, a.error)
                   FROM outbox.attempts a JOIN outbox.deliveries d ON d.id = a.delivery_id
                  WHERE d.event_id = $1 ORDER BY a.id",
                &[id],
            )
            .map(|rows| rows.into_iter().map(|r| r.get(0)).collect())
            .unwrap_or_default();
        out.push_str(&format!("{id}: arrived {arrived:?}; history {history:?}\n"));
    }
    out
}

fn setup(extra: &[&'static str]) -> (Cluster, Receiver, Arrivals) {
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
    let arrivals = Arrivals::default();
    arrivals.attach(&rx);
    let mut c = cluster.client();
    endpoint(&mut c, &rx.url("/c"), "");
    (cluster, rx, arrivals)
}

#[test]
fn the_worker_killed_three_times_mid_batch_loses_nothing() {
    let (cluster, _rx, arrivals) = setup(&[]);
    let producers = Producers::start(&cluster, 3, "k");
    let mut crashes = Vec::new();
    for round in 1..=3 {
        // Mid-batch: the worker (the first or a restarted one) is busy sending.
        let seen = arrivals.count();
        assert!(
            arrivals.wait_for(seen + 30, Duration::from_secs(30)),
            "round {round}"
        );
        if let Some(last) = crashes.last() {
            let since = SystemTime::now().duration_since(*last).unwrap_or_default();
            std::thread::sleep(CRASH_GAP.saturating_sub(since));
        }
        crashes.push(SystemTime::now());
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
    check(&cluster, &arrivals, &produced, &crashes, IN_FLIGHT);
}

#[test]
fn an_immediate_stop_mid_flight_then_a_start_loses_nothing() {
    let (mut cluster, _rx, arrivals) = setup(&[]);
    let producers = Producers::start(&cluster, 2, "i");
    assert!(arrivals.wait_for(50, Duration::from_secs(30)));
    // No shutdown checkpoint, no goodbye from the worker: crash recovery on the next start.
    let crash = SystemTime::now();
    cluster.stop("immediate");
    std::thread::sleep(Duration::from_millis(500));
    cluster.pg_ctl_start();
    let seen = arrivals.count();
    assert!(arrivals.wait_for(seen + 100, Duration::from_secs(60)));
    let produced = producers.finish();
    check(&cluster, &arrivals, &produced, &[crash], IN_FLIGHT);
}

#[test]
fn a_fast_restart_mid_flight_loses_nothing_and_sends_nothing_twice() {
    let (mut cluster, _rx, arrivals) = setup(&[]);
    let producers = Producers::start(&cluster, 2, "f");
    assert!(arrivals.wait_for(50, Duration::from_secs(30)));
    let restart = SystemTime::now();
    cluster.restart("fast");
    let seen = arrivals.count();
    assert!(arrivals.wait_for(seen + 100, Duration::from_secs(60)));
    let produced = producers.finish();
    // A fast stop lets requests in flight finish (they take 50 ms here) and records them
    // before the worker exits: nothing is sent twice.
    check(&cluster, &arrivals, &produced, &[restart], 0);
}

#[test]
fn a_receiver_that_goes_away_and_comes_back_gets_everything() {
    // Retries long enough to outlast the outage, and a breaker that probes again soon.
    let (cluster, rx, arrivals) = setup(&[
        "outbox.retry_schedule = '300ms, 1s, 2s, 3s, 5s, 8s'",
        "outbox.circuit_cooldown = '1s'",
    ]);
    let port = rx.port();
    let producers = Producers::start(&cluster, 2, "r");
    assert!(arrivals.wait_for(50, Duration::from_secs(30)));
    // The receiver process dies: requests in flight are cut, new ones are refused.
    let gone = SystemTime::now();
    drop(rx);
    std::thread::sleep(Duration::from_secs(2));
    let rx = Receiver::start_on(port).unwrap();
    rx.set_secret(Some(SECRET.into()));
    rx.set_default("/c", Reply::Delay(Duration::from_millis(50), 200));
    arrivals.attach(&rx);
    let seen = arrivals.count();
    assert!(arrivals.wait_for(seen + 30, Duration::from_secs(30)));
    let produced = producers.finish();
    // Requests cut by the outage are sent again (at most those in flight then); retries and
    // the breaker carry the rest over it, so none goes dead.
    check(&cluster, &arrivals, &produced, &[gone], IN_FLIGHT);
    assert!(
        rx.received().iter().all(|r| r.verified == Some(true)),
        "the new receiver verified every signature"
    );
}

/// The worker's own lines in the server log (started, stopping, cycle errors, exits).
fn worker_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("webhook_outbox worker"))
        .map(str::to_string)
        .collect()
}

#[test]
fn dropping_the_extension_while_busy_is_clean() {
    // The worker's messages are at LOG level: show them, to count them.
    let (cluster, rx, arrivals) = setup(&["log_min_messages = log"]);
    rx.set_default("/c", Reply::Delay(Duration::from_millis(300), 200));
    let producers = Producers::start(&cluster, 2, "d");
    assert!(arrivals.wait_for(30, Duration::from_secs(30)));
    let pid = worker_pid(&cluster);
    let log_before = cluster.log().len();
    assert!(
        !worker_lines(&cluster.log()).is_empty(),
        "the worker's LOG lines are shown (it says when it starts)"
    );

    // DROP EXTENSION succeeds while producers commit and the worker has requests in flight:
    // it waits at most for their short transactions, and the queue goes with the extension.
    let mut c = cluster.client();
    let started = Instant::now();
    c.batch_execute("DROP EXTENSION webhook_outbox").unwrap();
    let dropped = SystemTime::now();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "DROP EXTENSION waited {:?}",
        started.elapsed()
    );
    // Producers now fail (outbox.enqueue is gone); what they enqueued went with the queue.
    let before = producers.finish();
    assert!(before.committed.len() > 10);
    std::thread::sleep(Duration::from_secs(3));
    // Nothing new is sent: only requests already on their way (sent at once, answered
    // after 300 ms) arrive after the DROP, and none a second later.
    let after_drop: Vec<SystemTime> = arrivals
        .entries()
        .into_iter()
        .map(|(_, at)| at)
        .filter(|at| *at > dropped)
        .collect();
    assert!(
        after_drop.len() <= IN_FLIGHT,
        "{} requests arrived after the DROP",
        after_drop.len()
    );
    assert!(
        after_drop
            .iter()
            .all(|at| *at <= dropped + Duration::from_secs(1)),
        "the worker sent something new after the DROP"
    );
    // The worker stays, idle: neither crashed nor restarted, and it does not fill the log
    // (at most a line or two about the missing extension).
    assert_eq!(
        worker_pid(&cluster),
        pid,
        "the worker neither crashed nor restarted"
    );
    let since_drop = worker_lines(&cluster.log()[log_before..]);
    eprintln!("the worker's log after the DROP: {since_drop:#?}");
    assert!(
        since_drop.len() <= 3,
        "the worker logged {} lines after the DROP:\n{}",
        since_drop.len(),
        since_drop.join("\n")
    );

    // Created again, it delivers again (the same worker picks it up), with producers
    // committing and rolling back as before.
    arrivals.clear();
    c.batch_execute("CREATE EXTENSION webhook_outbox").unwrap();
    rx.set_default("/c", Reply::Delay(Duration::from_millis(50), 200));
    endpoint(&mut c, &rx.url("/c"), "");
    let producers = Producers::start(&cluster, 2, "a");
    assert!(
        arrivals.wait_for(150, Duration::from_secs(30)),
        "{}",
        cluster.log()
    );
    let produced = producers.finish();
    check(&cluster, &arrivals, &produced, &[], 0);
    assert_eq!(worker_pid(&cluster), pid);
    let log = cluster.log();
    assert!(
        !log.contains("PANIC") && !log.contains("terminated by signal"),
        "{log}"
    );
}
