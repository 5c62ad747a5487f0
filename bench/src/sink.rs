//! The in-process receiver, reduced to what the scenarios measure.
//!
//! The bundled [`Receiver`] keeps every request by default; over hundreds of thousands of
//! deliveries that costs memory and time in the very process being measured, so it is told
//! to keep nothing and this sink records only a count, the first and last arrival (in all
//! and per path, so that endpoints on distinct paths can be told apart), and, for the
//! latency scenario, the arrival time per `webhook-id`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use outbox_receiver::Receiver;

#[derive(Default)]
struct Tally {
    all: Arrivals,
    /// `webhook-id` → arrival, only while `by_id` is on.
    by_id: Option<HashMap<String, SystemTime>>,
    /// Request path → arrivals there.
    by_path: HashMap<String, Arrivals>,
}

/// A receiver on 127.0.0.1 answering 200 to everything, with its tally.
pub struct Sink {
    receiver: Receiver,
    tally: Arc<Mutex<Tally>>,
}

/// Arrivals so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Arrivals {
    pub count: u64,
    pub first: Option<SystemTime>,
    pub last: Option<SystemTime>,
    /// The longest time between two consecutive arrivals: a stall that a rate over the whole
    /// run would average away.
    pub longest_gap: Duration,
}

impl Arrivals {
    fn record(&mut self, at: SystemTime) {
        self.count += 1;
        self.first.get_or_insert(at);
        if let Some(gap) = self.last.and_then(|last| at.duration_since(last).ok()) {
            self.longest_gap = self.longest_gap.max(gap);
        }
        // Concurrent requests may be stamped slightly out of order.
        self.last = self.last.max(Some(at));
    }
}

impl Sink {
    pub fn start() -> std::io::Result<Sink> {
        let receiver = Receiver::start()?;
        receiver.keep_received(false);
        let tally = Arc::new(Mutex::new(Tally::default()));
        let shared = tally.clone();
        receiver.on_request(move |r| {
            let mut t = shared.lock().unwrap_or_else(|e| e.into_inner());
            t.all.record(r.received_at);
            if let Some(by_id) = t.by_id.as_mut() {
                by_id.insert(r.webhook_id.clone(), r.received_at);
            }
            t.by_path
                .entry(r.path.clone())
                .or_default()
                .record(r.received_at);
        });
        Ok(Sink { receiver, tally })
    }

    fn tally(&self) -> MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The URL endpoints should point at.
    pub fn url(&self) -> String {
        self.receiver.url("/bench")
    }

    /// The URL of `path`, where every request is answered with `reply` (counted like all).
    pub fn url_answering(&self, path: &str, reply: outbox_receiver::Reply) -> String {
        self.receiver.set_default(path, reply);
        self.receiver.url(path)
    }

    /// Forgets everything recorded; `by_id` turns per-id arrival times on or off.
    pub fn reset(&self, by_id: bool) {
        *self.tally() = Tally {
            by_id: by_id.then(HashMap::new),
            ..Tally::default()
        };
    }

    pub fn arrivals(&self) -> Arrivals {
        self.tally().all
    }

    /// Arrivals at `path` (as in [`Sink::url_answering`]) since the last reset.
    pub fn arrivals_at(&self, path: &str) -> Arrivals {
        self.tally().by_path.get(path).copied().unwrap_or_default()
    }

    /// When the delivery with this `webhook-id` arrived (needs `reset(true)` first).
    pub fn arrival_of(&self, webhook_id: &str) -> Option<SystemTime> {
        self.tally().by_id.as_ref()?.get(webhook_id).copied()
    }

    /// Waits until `n` requests have arrived. Gives up when none arrives for `stall`, so a
    /// slow run is waited for as long as it progresses but a stuck one does not hang.
    pub fn wait_for(&self, n: u64, stall: Duration) -> Result<Arrivals, String> {
        self.wait_until(n, stall, || self.arrivals())
    }

    /// [`Sink::wait_for`] counting only the requests at `paths`, whatever arrives elsewhere;
    /// returns the arrivals at those paths taken together.
    pub fn wait_for_paths(
        &self,
        paths: &[String],
        n: u64,
        stall: Duration,
    ) -> Result<Arrivals, String> {
        self.wait_until(n, stall, || {
            let t = self.tally();
            let at: Vec<&Arrivals> = paths.iter().filter_map(|p| t.by_path.get(p)).collect();
            Arrivals {
                count: at.iter().map(|a| a.count).sum(),
                first: at.iter().filter_map(|a| a.first).min(),
                last: at.iter().filter_map(|a| a.last).max(),
                longest_gap: at.iter().map(|a| a.longest_gap).max().unwrap_or_default(),
            }
        })
    }

    /// Polls `arrivals` until its count reaches `n`, or gives up after `stall` without any.
    fn wait_until(
        &self,
        n: u64,
        stall: Duration,
        arrivals: impl Fn() -> Arrivals,
    ) -> Result<Arrivals, String> {
        let mut seen = 0;
        let mut progress = Instant::now();
        loop {
            let now = arrivals();
            if now.count >= n {
                return Ok(now);
            }
            if now.count != seen {
                seen = now.count;
                progress = Instant::now();
            } else if progress.elapsed() > stall {
                return Err(format!(
                    "only {seen} of {n} deliveries arrived, none in the last {stall:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
