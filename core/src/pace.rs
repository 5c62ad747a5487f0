//! Pacing a batch's first attempts against their endpoints' `max_in_flight`.
//!
//! A batch of the log holds every event of its part, whatever room the endpoints had when
//! it was read. Sizing the batch by that room made a receiver that was full for a moment
//! (its requests out for a few milliseconds) take every later event as a queued delivery
//! row, claimed and updated twice: once that started, the worker's own claims kept the
//! endpoint full and the whole flow went the expensive way. Here the worker holds the
//! attempts instead and starts each when its endpoint has room; those still waiting when
//! the batch closes become deliveries claimed later, as before.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// The worker's own requests in flight, by endpoint (claimed ones and a batch's alike).
#[derive(Debug)]
pub struct InFlight<K> {
    by_request: HashMap<K, K>,
    by_endpoint: HashMap<K, usize>,
}

impl<K> Default for InFlight<K> {
    fn default() -> Self {
        InFlight {
            by_request: HashMap::new(),
            by_endpoint: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash + Copy> InFlight<K> {
    /// Request `request` to `endpoint` was handed to the sender.
    pub fn started(&mut self, request: K, endpoint: K) {
        if self.by_request.insert(request, endpoint).is_none() {
            *self.by_endpoint.entry(endpoint).or_insert(0) += 1;
        }
    }

    /// Its outcome is in (a request never started is ignored).
    pub fn finished(&mut self, request: &K) {
        if let Some(endpoint) = self.by_request.remove(request) {
            if let Some(n) = self.by_endpoint.get_mut(&endpoint) {
                *n -= 1;
                if *n == 0 {
                    self.by_endpoint.remove(&endpoint);
                }
            }
        }
    }

    /// How many of this worker's requests to `endpoint` are out.
    pub fn to(&self, endpoint: &K) -> usize {
        self.by_endpoint.get(endpoint).copied().unwrap_or(0)
    }
}

/// How many of this worker's requests an endpoint may have out at once while a batch is
/// open: its `max_in_flight` (`cap`, `None`: no limit) less the requests others have out,
/// which are its in-flight count as the read saw it (`busy`) less this worker's own then.
pub fn room(cap: Option<i32>, busy: Option<i32>, own: usize) -> Option<usize> {
    let cap = usize::try_from(cap?).unwrap_or(0);
    let busy = busy.and_then(|b| usize::try_from(b).ok()).unwrap_or(0);
    Some(cap.saturating_sub(busy.saturating_sub(own)))
}

struct Queue<T> {
    room: Option<usize>,
    waiting: VecDeque<T>,
}

/// A batch's attempts not started yet, per endpoint, in the order they were read.
pub struct Waiting<K, T> {
    endpoints: Vec<K>,
    queues: HashMap<K, Queue<T>>,
}

impl<K, T> Default for Waiting<K, T> {
    fn default() -> Self {
        Waiting {
            endpoints: Vec::new(),
            queues: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash + Copy, T> Waiting<K, T> {
    /// Queues `item` for `endpoint`, which may have `room` of this worker's requests out at
    /// once (see [`room`]; the first item of an endpoint sets it).
    pub fn add(&mut self, endpoint: K, room: Option<usize>, item: T) {
        let queue = self.queues.entry(endpoint).or_insert_with(|| {
            self.endpoints.push(endpoint);
            Queue {
                room,
                waiting: VecDeque::new(),
            }
        });
        queue.waiting.push_back(item);
    }

    /// The items that may start now: per endpoint while its requests out (`in_flight`,
    /// counting those started here) stay under its room, and `free` request slots in all.
    /// Endpoints take turns in the order they were first seen.
    pub fn ready(&mut self, in_flight: &InFlight<K>, mut free: usize) -> Vec<(K, T)> {
        let mut out = Vec::new();
        for endpoint in &self.endpoints {
            if free == 0 {
                break;
            }
            let Some(queue) = self.queues.get_mut(endpoint) else {
                continue;
            };
            let out_now = in_flight.to(endpoint);
            let allowed = queue
                .room
                .map_or(usize::MAX, |r| r.saturating_sub(out_now))
                .min(free)
                .min(queue.waiting.len());
            out.extend(queue.waiting.drain(..allowed).map(|t| (*endpoint, t)));
            free -= allowed;
        }
        self.endpoints
            .retain(|e| self.queues.get(e).is_some_and(|q| !q.waiting.is_empty()));
        self.queues.retain(|_, q| !q.waiting.is_empty());
        out
    }

    /// Takes every item still waiting (the batch closes without them).
    pub fn withdraw(&mut self) -> Vec<T> {
        self.endpoints.clear();
        self.queues
            .drain()
            .flat_map(|(_, q)| q.waiting.into_iter())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queues.values().map(|q| q.waiting.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_the_cap_less_what_others_have_out() {
        assert_eq!(room(None, Some(5), 0), None);
        assert_eq!(room(Some(4), Some(0), 0), Some(4));
        // Three out, two of them this worker's: one is someone else's.
        assert_eq!(room(Some(4), Some(3), 2), Some(3));
        // Others hold it full (or more, after the cap was lowered).
        assert_eq!(room(Some(4), Some(6), 0), Some(0));
        // This worker's outcomes recorded after the read: never more than the cap.
        assert_eq!(room(Some(4), Some(1), 3), Some(4));
        assert_eq!(room(Some(-1), None, 0), Some(0));
    }

    #[test]
    fn an_endpoint_gets_no_more_than_its_room_and_the_rest_waits_its_turn() {
        let mut flying = InFlight::default();
        let mut w = Waiting::default();
        for i in 0..5 {
            w.add(1u8, Some(2), i);
        }
        w.add(2u8, None, 10);
        w.add(2u8, None, 11);
        let first = w.ready(&flying, 100);
        assert_eq!(first, [(1, 0), (1, 1), (2, 10), (2, 11)]);
        for (e, i) in &first {
            flying.started(*i as u8 + 100, *e);
        }
        assert_eq!(w.len(), 3);
        // Nothing finished: nothing more may start.
        assert!(w.ready(&flying, 100).is_empty());
        flying.finished(&100);
        assert_eq!(w.ready(&flying, 100), [(1, 2)]);
        // Request slots bound every endpoint together.
        flying.finished(&101);
        flying.finished(&102); // unknown: ignored
        assert_eq!(w.ready(&flying, 0), []);
        assert_eq!(w.ready(&flying, 1), [(1, 3)]);
        assert_eq!(w.withdraw(), [4]);
        assert!(w.is_empty());
    }

    #[test]
    fn an_endpoint_without_room_waits_for_its_own_requests_to_end() {
        let mut flying = InFlight::default();
        flying.started(50u8, 7u8);
        flying.started(50u8, 7u8); // the same request twice counts once
        flying.started(51u8, 7u8);
        assert_eq!(flying.to(&7), 2);
        let mut w = Waiting::default();
        w.add(7u8, room(Some(2), Some(2), 2), 'a');
        assert!(w.ready(&flying, 10).is_empty());
        flying.finished(&51);
        assert_eq!(w.ready(&flying, 10), [(7, 'a')]);
        assert_eq!(flying.to(&7), 1);
    }
}
