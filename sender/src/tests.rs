//! The sender against the bundled receiver on 127.0.0.1: real HTTP, no PostgreSQL.

use super::*;
use outbox_core::ssrf::AllowList;
use outbox_receiver::{FakeDns, Receiver, Reply};
use std::net::Ipv4Addr;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn request(url: String, timeout: Duration) -> Request {
    Request {
        delivery_id: [7; 16],
        attempt: 1,
        msg_id: "msg_test1".into(),
        url,
        keys: vec![SigningKey::parse(SECRET).unwrap()],
        headers: vec![("X-Env".into(), "test".into())],
        body: bytes::Bytes::from_static(
            br#"{"type":"a.b","timestamp":"2026-11-22T10:00:00Z","data":{}}"#,
        ),
        timeout,
    }
}

/// The tests' receivers live on loopback, which the SSRF guard refuses by default.
fn loopback() -> Config {
    allowing("127.0.0.1/32")
}

fn one(sender: &Sender) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut out = sender.take_outcomes();
        if let Some(o) = out.pop() {
            assert!(out.is_empty());
            return o;
        }
        assert!(Instant::now() < deadline, "no outcome");
        let mut pfd = libc::pollfd {
            fd: sender.wake_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one local pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
    }
}

#[test]
fn sends_signed_requests_that_the_reference_library_accepts() {
    let rx = Receiver::start().unwrap();
    rx.set_secret(Some(SECRET.into()));
    let sender = Sender::start(loopback()).unwrap();
    sender.submit(request(rx.url("/hook"), Duration::from_secs(5)));
    let o = one(&sender);
    assert_eq!(o.status_code(), Some(200));
    assert_eq!(o.delivery_id, [7; 16]);
    let got = &rx.received()[0];
    assert_eq!(got.verified, Some(true));
    assert_eq!(got.webhook_id, "msg_test1");
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("x-env"), Some("test"));
    assert!(got
        .header("user-agent")
        .unwrap()
        .starts_with("webhook_outbox/"));
    let ts: i64 = got.timestamp.parse().unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - ts).abs() <= 2);
    assert_eq!(sender.in_flight(), 0);
}

#[test]
fn extra_headers_cannot_replace_the_signature() {
    let rx = Receiver::start().unwrap();
    rx.set_secret(Some(SECRET.into()));
    let sender = Sender::start(loopback()).unwrap();
    let mut req = request(rx.url("/hook"), Duration::from_secs(5));
    req.headers
        .push(("webhook-signature".into(), "v1,forged".into()));
    req.headers.push(("webhook-id".into(), "other".into()));
    sender.submit(req);
    assert_eq!(one(&sender).status_code(), Some(200));
    let got = &rx.received()[0];
    assert_eq!(got.verified, Some(true));
    assert_eq!(
        got.headers
            .iter()
            .filter(|(k, _)| k == "webhook-signature")
            .count(),
        1
    );
    assert_eq!(got.webhook_id, "msg_test1");
}

#[test]
fn two_keys_give_two_signatures() {
    let rx = Receiver::start().unwrap();
    let sender = Sender::start(loopback()).unwrap();
    let mut req = request(rx.url("/hook"), Duration::from_secs(5));
    req.keys.push(SigningKey::from_bytes(vec![3; 32]).unwrap());
    sender.submit(req);
    one(&sender);
    assert_eq!(rx.received()[0].signature.matches("v1,").count(), 2);
}

#[test]
fn a_hanging_receiver_times_out() {
    let rx = Receiver::start().unwrap();
    rx.set_default("/slow", Reply::Hang);
    let sender = Sender::start(loopback()).unwrap();
    sender.submit(request(rx.url("/slow"), Duration::from_millis(300)));
    let o = one(&sender);
    match &o.response {
        Response::Failed { error, timed_out } => {
            assert!(*timed_out);
            assert!(error.contains("timed out after 300 ms"), "{error}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(o.duration >= Duration::from_millis(300) && o.duration < Duration::from_secs(3));
}

#[test]
fn a_refused_connection_is_a_failure_with_its_cause() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sender = Sender::start(loopback()).unwrap();
    sender.submit(request(
        format!("http://127.0.0.1:{port}/x"),
        Duration::from_secs(5),
    ));
    match one(&sender).response {
        Response::Failed { error, timed_out } => {
            assert!(!timed_out);
            assert!(error.to_lowercase().contains("refused"), "{error}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn redirects_are_not_followed() {
    let rx = Receiver::start().unwrap();
    rx.set_default(
        "/moved",
        Reply::StatusWithHeaders(302, vec![("Location".into(), "/new".into())]),
    );
    let sender = Sender::start(loopback()).unwrap();
    sender.submit(request(rx.url("/moved"), Duration::from_secs(5)));
    assert_eq!(one(&sender).status_code(), Some(302));
    assert_eq!(rx.count(), 1);
}

#[test]
fn retry_after_and_the_first_bytes_of_the_body_are_kept() {
    let rx = Receiver::start().unwrap();
    rx.script(
        "/busy",
        vec![Reply::StatusWithHeaders(
            429,
            vec![("Retry-After".into(), "7".into())],
        )],
    );
    rx.set_default("/big", Reply::Body(500, vec![b'x'; 100_000]));
    let sender = Sender::start(Config {
        max_response_body: 16,
        ..loopback()
    })
    .unwrap();
    sender.submit(request(rx.url("/busy"), Duration::from_secs(5)));
    let o = one(&sender);
    assert_eq!(
        o.response,
        Response::Status {
            code: 429,
            retry_after: Some("7".into())
        }
    );
    sender.submit(request(rx.url("/big"), Duration::from_secs(5)));
    let o = one(&sender);
    assert_eq!(o.status_code(), Some(500));
    assert_eq!(o.body_excerpt.as_deref(), Some("xxxxxxxxxxxxxxxx"));
}

#[test]
fn in_flight_is_capped_and_shutdown_returns_finished_work() {
    let rx = Receiver::start().unwrap();
    rx.set_default("/slow", Reply::Delay(Duration::from_millis(300), 200));
    let sender = Sender::start(Config {
        max_in_flight: 2,
        ..loopback()
    })
    .unwrap();
    assert_eq!(sender.capacity(), 2);
    for _ in 0..2 {
        sender.submit(request(rx.url("/slow"), Duration::from_secs(5)));
    }
    assert_eq!(sender.capacity(), 0);
    // Over the cap: either refused at once as a failed attempt, or (when the first two have
    // already left the queue for their slots) held until a slot frees. Never a third
    // request on the wire while two are unanswered, and never lost.
    sender.submit(request(rx.url("/slow"), Duration::from_secs(5)));
    let outcomes = sender.shutdown(Duration::from_secs(5));
    assert_eq!(outcomes.len(), 3);
    let ok = outcomes
        .iter()
        .filter(|o| o.status_code() == Some(200))
        .count();
    let refused = outcomes
        .iter()
        .filter(|o| matches!(&o.response, Response::Failed { error, .. } if error.contains("could not take")))
        .count();
    assert_eq!(ok + refused, 3, "{outcomes:?}");
    assert!(ok >= 2);
    let arrivals: Vec<_> = rx.received().iter().map(|r| r.received_at).collect();
    assert_eq!(arrivals.len(), ok);
    if let [first, _, third] = arrivals[..] {
        assert!(
            third.duration_since(first).unwrap_or_default() >= Duration::from_millis(250),
            "a third request was sent while two were in flight"
        );
    }
}

#[test]
fn shutdown_abandons_requests_past_the_grace_period() {
    let rx = Receiver::start().unwrap();
    rx.set_default("/slow", Reply::Hang);
    let sender = Sender::start(loopback()).unwrap();
    sender.submit(request(rx.url("/slow"), Duration::from_secs(60)));
    let started = Instant::now();
    assert!(sender.shutdown(Duration::from_millis(200)).is_empty());
    assert!(started.elapsed() < Duration::from_secs(2));
}

fn allowing(list: &str) -> Config {
    Config {
        allow: AllowList::parse(list).unwrap(),
        ..Config::default()
    }
}

#[test]
fn the_guard_refuses_private_targets_unless_allowed() {
    let rx = Receiver::start().unwrap();
    // Literal loopback address, not allowed: never sent.
    let strict = Sender::start(Config::default()).unwrap();
    strict.submit(request(rx.url("/x"), Duration::from_secs(5)));
    match one(&strict).response {
        Response::Refused { error } => assert!(error.contains("loopback"), "{error}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A name that resolves to loopback, not allowed: refused at resolution.
    let by_name = format!("http://localhost:{}/x", rx.port());
    strict.submit(request(by_name.clone(), Duration::from_secs(5)));
    match one(&strict).response {
        Response::Refused { error } => assert!(error.contains("SSRF guard"), "{error}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(rx.count(), 0, "nothing reached the receiver");

    // Allowed by name, by block, and after a change of the list at run time.
    let named = Sender::start(allowing("localhost")).unwrap();
    named.submit(request(by_name, Duration::from_secs(5)));
    assert_eq!(one(&named).status_code(), Some(200));
    strict.set_allow_list(AllowList::parse("127.0.0.0/8").unwrap());
    strict.submit(request(rx.url("/x"), Duration::from_secs(5)));
    assert_eq!(one(&strict).status_code(), Some(200));
    assert_eq!(rx.count(), 2);
}

#[test]
fn tls_is_verified_against_the_system_roots_and_an_optional_ca() {
    let issued =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_pem = issued.cert.pem();
    let rx = Receiver::start_tls(&cert_pem, &issued.key_pair.serialize_pem()).unwrap();
    rx.set_secret(Some(SECRET.into()));
    assert!(rx.url("/t").starts_with("https://127.0.0.1:"));

    // A self-signed receiver is not trusted by default: a failed attempt (retried later).
    let default = Sender::start(loopback()).unwrap();
    default.submit(request(rx.url("/t"), Duration::from_secs(5)));
    match one(&default).response {
        Response::Failed { error, .. } => {
            assert!(error.to_lowercase().contains("certificate"), "{error}")
        }
        other => panic!("expected a TLS failure, got {other:?}"),
    }
    assert_eq!(rx.count(), 0);

    // With its certificate as an extra root it is.
    let trusting = Sender::start(Config {
        extra_roots_pem: Some(cert_pem.into_bytes()),
        ..loopback()
    })
    .unwrap();
    trusting.submit(request(rx.url("/t"), Duration::from_secs(5)));
    assert_eq!(one(&trusting).status_code(), Some(200));
    assert_eq!(rx.received()[0].verified, Some(true));

    // A file with no certificate is refused at start.
    assert!(Sender::start(Config {
        extra_roots_pem: Some(b"not a pem".to_vec()),
        ..loopback()
    })
    .is_err());
}

/// A raw TCP server that answers every connection with `respond` (on its own thread).
fn raw_server(respond: fn(std::net::TcpStream)) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || respond(stream));
        }
    });
    port
}

fn read_request(stream: &mut std::net::TcpStream) {
    use std::io::Read;
    let mut buf = [0u8; 8192];
    let _ = stream.read(&mut buf);
}

#[test]
fn endless_headers_and_slow_drip_bodies_cannot_hold_the_sender() {
    use std::io::Write;
    // Headers that never end: hyper gives up on the oversized head, long before any timeout.
    let endless = raw_server(|mut s| {
        read_request(&mut s);
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n");
        for i in 0..2_000_000u32 {
            if s.write_all(format!("X-{i}: {}\r\n", "y".repeat(64)).as_bytes())
                .is_err()
            {
                return;
            }
        }
    });
    // A body dripped one byte at a time, forever.
    let drip = raw_server(|mut s| {
        read_request(&mut s);
        let _ =
            s.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 1000000\r\n\r\n");
        while s.write_all(b"x").is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let sender = Sender::start(loopback()).unwrap();
    let started = Instant::now();
    sender.submit(request(
        format!("http://127.0.0.1:{endless}/"),
        Duration::from_secs(3),
    ));
    match one(&sender).response {
        Response::Failed { .. } => {}
        other => panic!("expected a failure, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    let started = Instant::now();
    sender.submit(request(
        format!("http://127.0.0.1:{drip}/"),
        Duration::from_millis(800),
    ));
    let o = one(&sender);
    assert_eq!(o.status_code(), Some(500));
    assert!(o.body_excerpt.as_deref().unwrap_or("").len() <= 1024);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

/// Loopback allowed, and names resolved by `dns` alone.
fn resolving_through(dns: &FakeDns, dns_timeout: Duration) -> Config {
    Config {
        dns_servers: vec![dns.addr()],
        dns_timeout,
        ..loopback()
    }
}

/// `n` outcomes, each with how long after `since` it was taken.
fn outcomes_after(sender: &Sender, n: usize, since: Instant) -> Vec<(Outcome, Duration)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut all = Vec::new();
    while all.len() < n {
        assert!(Instant::now() < deadline, "only {} outcomes", all.len());
        let mut pfd = libc::pollfd {
            fd: sender.wake_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one local pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        let at = since.elapsed();
        all.extend(sender.take_outcomes().into_iter().map(|o| (o, at)));
    }
    all
}

#[test]
fn a_name_server_that_never_answers_delays_only_its_own_names() {
    let rx = Receiver::start().unwrap();
    let dns = FakeDns::start(&[("good.test", Ipv4Addr::LOCALHOST)], &["black-hole.test"]).unwrap();
    let sender = Sender::start(resolving_through(&dns, Duration::from_secs(3))).unwrap();
    let port = rx.port();
    let submitted = Instant::now();
    // The silent names first, so that they are the ones holding whatever they hold.
    for i in 0..30u8 {
        let mut req = request(
            format!("http://n{i}.black-hole.test:{port}/x"),
            Duration::from_secs(10),
        );
        req.delivery_id = [0, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        sender.submit(req);
    }
    for i in 0..30u8 {
        let mut req = request(
            format!("http://good.test:{port}/x"),
            Duration::from_secs(10),
        );
        req.delivery_id = [1, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        sender.submit(req);
    }
    let outcomes = outcomes_after(&sender, 60, submitted);
    let (good, silent): (Vec<_>, Vec<_>) =
        outcomes.iter().partition(|(o, _)| o.delivery_id[0] == 1);
    assert_eq!(good.len(), 30);
    for (o, at) in &good {
        assert_eq!(o.status_code(), Some(200), "{o:?}");
        assert!(
            *at < Duration::from_millis(1500),
            "delivered {at:?} after submission"
        );
    }
    assert_eq!(rx.count(), 30);
    assert_eq!(silent.len(), 30);
    for (o, _) in &silent {
        let host = format!("n{}.black-hole.test", o.delivery_id[1]);
        match &o.response {
            Response::Failed { error, timed_out } => {
                assert!(*timed_out, "{error}");
                assert!(
                    error.contains(&format!("the DNS lookup of {host} timed out after 3000 ms")),
                    "{error}"
                );
            }
            other => panic!("expected a DNS timeout for {host}, got {other:?}"),
        }
        assert!(
            o.duration >= Duration::from_millis(2900) && o.duration < Duration::from_millis(4500),
            "{host} failed after {:?}",
            o.duration
        );
        assert!(dns.queries(&host) >= 1, "{host} was never asked for");
    }
}

#[test]
fn a_name_that_resolves_to_a_forbidden_address_is_refused_before_connecting() {
    let rx = Receiver::start().unwrap();
    let dns = FakeDns::start(
        &[
            ("internal.test", Ipv4Addr::new(169, 254, 169, 254)),
            ("loop.test", Ipv4Addr::LOCALHOST),
        ],
        &[],
    )
    .unwrap();
    // Nothing allowed: not even the receiver's loopback address.
    let sender = Sender::start(Config {
        dns_servers: vec![dns.addr()],
        ..Config::default()
    })
    .unwrap();
    let port = rx.port();
    sender.submit(request(
        format!("http://internal.test:{port}/x"),
        Duration::from_secs(5),
    ));
    let o = one(&sender);
    match &o.response {
        Response::Refused { error } => assert!(
            error.contains("SSRF guard")
                && error.contains("internal.test -> 169.254.169.254")
                && error.contains("link-local"),
            "{error}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(o.duration < Duration::from_secs(1), "{:?}", o.duration);
    // The same for a name of the receiver's own address: it never hears of it.
    sender.submit(request(
        format!("http://loop.test:{port}/x"),
        Duration::from_secs(5),
    ));
    match one(&sender).response {
        Response::Refused { error } => assert!(
            error.contains("loop.test -> 127.0.0.1") && error.contains("loopback"),
            "{error}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(rx.count(), 0, "nothing reached the receiver");
    // A name that does not exist is a failed attempt, to be retried, not a refusal.
    sender.submit(request(
        format!("http://nowhere.test:{port}/x"),
        Duration::from_secs(5),
    ));
    match one(&sender).response {
        Response::Failed { error, timed_out } => {
            assert!(!timed_out);
            assert!(
                error.contains("the DNS lookup of nowhere.test failed: no such name (NXDOMAIN)"),
                "{error}"
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn answers_are_cached() {
    let rx = Receiver::start().unwrap();
    // Closing after each answer makes the second request connect (so resolve) again,
    // instead of reusing the first one's connection.
    rx.set_default(
        "/close",
        Reply::StatusWithHeaders(200, vec![("Connection".into(), "close".into())]),
    );
    let dns = FakeDns::start(&[("cached.test", Ipv4Addr::LOCALHOST)], &[]).unwrap();
    let sender = Sender::start(resolving_through(&dns, Duration::from_secs(3))).unwrap();
    let url = format!("http://cached.test:{}/close", rx.port());
    sender.submit(request(url.clone(), Duration::from_secs(5)));
    assert_eq!(one(&sender).status_code(), Some(200));
    // One lookup: an A query and an AAAA query.
    assert_eq!(dns.queries("cached.test"), 2);
    std::thread::sleep(Duration::from_millis(200));
    sender.submit(request(url, Duration::from_secs(5)));
    assert_eq!(one(&sender).status_code(), Some(200));
    assert_eq!(
        dns.queries("cached.test"),
        2,
        "the second lookup was not served from the cache"
    );
    assert_eq!(rx.count(), 2);
}
