//! A fake DNS server for tests, on `127.0.0.1` over UDP.
//!
//! Whatever resolves webhook host names has to be tested against names that answer, names
//! that do not exist, and names whose server never answers at all, without touching the
//! machine's real resolver. [`FakeDns`] plays all three from a fixed table, and counts the
//! queries it gets so that caching can be observed from outside:
//!
//! ```no_run
//! use outbox_receiver::FakeDns;
//! use std::net::Ipv4Addr;
//!
//! let dns = FakeDns::start(&[("hooks.test", Ipv4Addr::LOCALHOST)], &["black-hole.test"]).unwrap();
//! // Point a resolver at `dns.addr()`: `hooks.test` answers 127.0.0.1, `x.black-hole.test`
//! // never answers, anything else is NXDOMAIN.
//! assert_eq!(dns.queries("hooks.test"), 0);
//! ```

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// The TTL of every answer: long enough for a test to see a cache hit, short enough that a
/// cache holding on to it past its expiry would show within a test too.
pub const TTL: u32 = 5;

/// How often the server thread looks up from its socket to see whether it should stop.
const POLL: Duration = Duration::from_millis(50);

/// A DNS server on `127.0.0.1:PORT` (UDP) answering from a fixed table.
///
/// Answers an `A` query for a name in the table with its address, and any other query type
/// for such a name with NOERROR and no records (so `AAAA` says "no IPv6 address"). Names
/// under a black-hole suffix get no answer at all: the query is read and dropped. Every
/// other name is NXDOMAIN. Dropping it stops the server.
pub struct FakeDns {
    addr: SocketAddr,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Names compare without case and without the root's trailing dot.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

struct Table {
    answers: HashMap<String, Ipv4Addr>,
    black_holes: Vec<String>,
}

impl Table {
    fn swallows(&self, name: &str) -> bool {
        self.black_holes.iter().any(|suffix| {
            name == suffix
                || name
                    .strip_suffix(suffix.as_str())
                    .is_some_and(|head| head.ends_with('.'))
        })
    }

    /// The reply to `query`, or `None` to leave it unanswered.
    fn reply(&self, query: &Message) -> Option<Message> {
        let question = query.queries.first()?;
        let name = normalize(&question.name().to_ascii());
        if self.swallows(&name) {
            return None;
        }
        let mut reply = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
        reply.metadata = Metadata::response_from_request(&query.metadata);
        reply.metadata.authoritative = true;
        reply.metadata.recursion_available = true;
        reply.add_queries(query.queries.iter().cloned());
        match self.answers.get(&name) {
            None => reply.metadata.response_code = ResponseCode::NXDomain,
            Some(ip) if question.query_type() == RecordType::A => {
                reply.add_answer(Record::from_rdata(
                    question.name().clone(),
                    TTL,
                    RData::A(A::from(*ip)),
                ));
            }
            Some(_) => {}
        }
        Some(reply)
    }
}

impl FakeDns {
    /// Starts serving `answers` (name, IPv4 address) on a free port, never answering for
    /// any name equal to or under one of `black_holes`.
    pub fn start(answers: &[(&str, Ipv4Addr)], black_holes: &[&str]) -> io::Result<FakeDns> {
        let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        socket.set_read_timeout(Some(POLL))?;
        let addr = socket.local_addr()?;
        let table = Table {
            answers: answers
                .iter()
                .map(|(name, ip)| (normalize(name), *ip))
                .collect(),
            black_holes: black_holes.iter().map(|s| normalize(s)).collect(),
        };
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("fake-dns".into()).spawn({
            let counts = counts.clone();
            let stop = stop.clone();
            move || serve(socket, table, counts, stop)
        })?;
        Ok(FakeDns {
            addr,
            counts,
            stop,
            thread: Some(thread),
        })
    }

    /// The address to send queries to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many queries (of any type, answered or not) arrived for `name` so far.
    pub fn queries(&self, name: &str) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&normalize(name))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    socket: UdpSocket,
    table: Table,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<AtomicBool>,
) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        // An error is most often the read timeout that lets the stop flag be seen.
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        // Anything that is not a well-formed query is ignored, as a real server would.
        let Ok(query) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        if query.metadata.message_type != MessageType::Query {
            continue;
        }
        if let Some(question) = query.queries.first() {
            *counts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(normalize(&question.name().to_ascii()))
                .or_default() += 1;
        }
        if let Some(bytes) = table.reply(&query).and_then(|r| r.to_vec().ok()) {
            let _ = socket.send_to(&bytes, from);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn ask(dns: &FakeDns, name: &str, kind: RecordType) -> Option<Message> {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut query = Message::query();
        query.add_query(Query::query(Name::from_str(name).unwrap(), kind));
        socket
            .send_to(&query.to_vec().unwrap(), dns.addr())
            .unwrap();
        let mut buf = [0u8; 4096];
        let (len, _) = socket.recv_from(&mut buf).ok()?;
        let reply = Message::from_vec(&buf[..len]).unwrap();
        assert_eq!(reply.metadata.id, query.metadata.id);
        assert_eq!(reply.queries, query.queries);
        Some(reply)
    }

    #[test]
    fn answers_from_its_table_and_counts_every_query() {
        let dns = FakeDns::start(
            &[("Hooks.Test", Ipv4Addr::new(127, 0, 0, 1))],
            &["black-hole.test"],
        )
        .unwrap();

        let a = ask(&dns, "hooks.test.", RecordType::A).unwrap();
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(a.answers[0].ttl, TTL);
        assert_eq!(a.answers[0].data, RData::A(A::new(127, 0, 0, 1)));

        let aaaa = ask(&dns, "HOOKS.test.", RecordType::AAAA).unwrap();
        assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
        assert!(aaaa.answers.is_empty());

        let nx = ask(&dns, "other.test.", RecordType::A).unwrap();
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);

        assert!(ask(&dns, "x.black-hole.test.", RecordType::A).is_none());
        assert!(ask(&dns, "black-hole.test.", RecordType::A).is_none());
        // A suffix match is on whole labels.
        let near = ask(&dns, "not-black-hole.test.", RecordType::A).unwrap();
        assert_eq!(near.metadata.response_code, ResponseCode::NXDomain);

        assert_eq!(dns.queries("hooks.test"), 2);
        assert_eq!(dns.queries("x.black-hole.test."), 1);
        assert_eq!(dns.queries("nobody.test"), 0);
    }

    #[test]
    fn garbage_is_ignored_and_drop_stops_the_server() {
        let dns = FakeDns::start(&[("a.test", Ipv4Addr::LOCALHOST)], &[]).unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.send_to(b"\x01\x02garbage", dns.addr()).unwrap();
        assert!(ask(&dns, "a.test.", RecordType::A).is_some());
        drop(dns);
    }
}
