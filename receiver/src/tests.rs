use super::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const VECTOR_TS: i64 = 1614265330;
const VECTOR_BODY: &str = r#"{"test": 2432232314}"#;
const VECTOR_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn request_text(path: &str, headers: &[(&str, &str)], body: &[u8], close: bool) -> Vec<u8> {
    let mut text = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str(&format!("Content-Length: {}\r\n", body.len()));
    if close {
        text.push_str("Connection: close\r\n");
    }
    text.push_str("\r\n");
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Reads one response whose body is delimited by Content-Length.
fn read_answer(reader: &mut impl BufRead) -> std::io::Result<Answer> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (k, v) = trimmed.split_once(':').expect("header line");
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let answer = Answer { status, headers };
    let length: usize = answer
        .header("content-length")
        .map_or(0, |v| v.parse().unwrap());
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(answer)
}

/// One HTTP/1.1 POST on its own connection.
fn post(rx: &Receiver, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(("127.0.0.1", rx.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(&request_text(path, headers, body, true))
        .unwrap();
    read_answer(&mut BufReader::new(stream)).unwrap()
}

fn webhook_headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("webhook-id", id),
        ("webhook-timestamp", ts),
        ("webhook-signature", sig),
        ("content-type", "application/json"),
    ]
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn answers_200_and_records_everything() {
    let rx = Receiver::start().unwrap();
    assert_eq!(
        rx.url("/hook"),
        format!("http://127.0.0.1:{}/hook", rx.port())
    );
    assert_eq!(rx.url("hook"), rx.url("/hook"));
    let before = SystemTime::now();
    let mut headers = webhook_headers("msg_1", "1700000000", "v1,abc v1,def");
    headers.push(("X-Custom-Header", "Mixed Case Value"));
    let answer = post(&rx, "/hook?attempt=1", &headers, br#"{"a":1}"#);
    assert_eq!(answer.status, 200);
    assert_eq!(rx.count(), 1);

    let got = &rx.received()[0];
    assert_eq!(got.path, "/hook");
    assert_eq!(got.webhook_id, "msg_1");
    assert_eq!(got.timestamp, "1700000000");
    assert_eq!(got.signature, "v1,abc v1,def");
    assert_eq!(got.body, br#"{"a":1}"#);
    assert_eq!(got.json(), Some(serde_json::json!({"a": 1})));
    assert_eq!(got.body_text(), r#"{"a":1}"#);
    assert_eq!(got.verified, None);
    assert!(got
        .headers
        .contains(&("x-custom-header".into(), "Mixed Case Value".into())));
    assert!(got
        .headers
        .iter()
        .all(|(k, _)| *k == k.to_ascii_lowercase()));
    assert_eq!(got.header("Content-Type"), Some("application/json"));
    assert!(got.received_at >= before && got.received_at <= SystemTime::now());

    let bare = post(&rx, "/other", &[], b"not json");
    assert_eq!(bare.status, 200);
    let other = &rx.received_on("other")[0];
    assert_eq!((other.webhook_id.as_str(), other.json()), ("", None));
    assert_eq!(rx.received_on("/hook").len(), 1);
    assert_eq!(rx.count(), 2);
}

#[test]
fn scripts_then_defaults_per_path() {
    let rx = Receiver::start().unwrap();
    rx.script(
        "/s",
        vec![
            Reply::Status(500),
            Reply::StatusWithHeaders(429, vec![("Retry-After".into(), "7".into())]),
            Reply::Status(204),
        ],
    );
    rx.set_default("d", Reply::Status(410));

    let statuses: Vec<u16> = (0..5).map(|_| post(&rx, "/s", &[], b"{}").status).collect();
    assert_eq!(statuses, [500, 429, 204, 200, 200]);
    assert_eq!(post(&rx, "/d", &[], b"{}").status, 410);
    assert_eq!(post(&rx, "/d", &[], b"{}").status, 410);
    assert_eq!(post(&rx, "/elsewhere", &[], b"{}").status, 200);

    // A script takes precedence over the default, and the default resumes after it.
    rx.script("/d", vec![Reply::Status(201)]);
    assert_eq!(post(&rx, "/d", &[], b"{}").status, 201);
    assert_eq!(post(&rx, "/d", &[], b"{}").status, 410);

    rx.script(
        "/s",
        vec![Reply::StatusWithHeaders(
            503,
            vec![("Retry-After".into(), "2".into())],
        )],
    );
    let answer = post(&rx, "/s", &[], b"{}");
    assert_eq!(
        (answer.status, answer.header("retry-after")),
        (503, Some("2"))
    );

    // Requests answered with errors are recorded too.
    assert_eq!(rx.received_on("/s").len(), 6);
    assert_eq!(rx.received_on("/d").len(), 4);
    assert_eq!(rx.count(), 11);
    let paths: Vec<String> = rx.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths[4..7], ["/s", "/d", "/d"]);
}

#[test]
fn wait_for_blocks_until_enough_requests() {
    let rx = Receiver::start().unwrap();
    let url_port = rx.port();
    let sender = std::thread::spawn(move || {
        for i in 0..3 {
            std::thread::sleep(Duration::from_millis(100));
            let mut stream = TcpStream::connect(("127.0.0.1", url_port)).unwrap();
            let body = format!("{{\"n\":{i}}}");
            stream
                .write_all(&request_text("/w", &[], body.as_bytes(), true))
                .unwrap();
            read_answer(&mut BufReader::new(stream)).unwrap();
        }
    });
    assert!(rx.wait_for(3, Duration::from_secs(10)));
    sender.join().unwrap();
    let bodies: Vec<Vec<u8>> = rx.received().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, [b"{\"n\":0}", b"{\"n\":1}", b"{\"n\":2}"]);

    let started = Instant::now();
    assert!(!rx.wait_for(4, Duration::from_millis(300)));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(rx.wait_for(0, Duration::ZERO));

    rx.clear();
    assert_eq!(rx.count(), 0);
    assert!(rx.received().is_empty());
    post(&rx, "/w", &[], b"{}");
    assert!(rx.wait_for(1, Duration::from_secs(5)));
}

#[test]
fn delay_records_first_then_answers_late() {
    let rx = Receiver::start().unwrap();
    rx.script("/slow", vec![Reply::Delay(Duration::from_millis(800), 202)]);
    let port = rx.port();
    let started = Instant::now();
    let client = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .write_all(&request_text("/slow", &[], b"{}", true))
            .unwrap();
        read_answer(&mut BufReader::new(stream)).unwrap().status
    });
    assert!(rx.wait_for(1, Duration::from_secs(5)));
    assert!(!client.is_finished(), "recorded before the answer");
    assert_eq!(client.join().unwrap(), 202);
    assert!(started.elapsed() >= Duration::from_millis(800));
}

#[test]
fn hang_never_answers_and_drop_still_stops() {
    let rx = Receiver::start().unwrap();
    rx.set_default("/hang", Reply::Hang);
    let mut stream = TcpStream::connect(("127.0.0.1", rx.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    stream
        .write_all(&request_text("/hang", &[], b"{}", true))
        .unwrap();
    let mut buf = [0u8; 64];
    let err = stream.read(&mut buf).expect_err("no answer expected");
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    assert_eq!(rx.count(), 1);
    // Other paths keep working while one request hangs.
    assert_eq!(post(&rx, "/ok", &[], b"{}").status, 200);

    let port = rx.port();
    let started = Instant::now();
    drop(rx);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn spec_test_vector_is_recorded_as_sent() {
    let webhook = Webhook::new(SECRET).unwrap();
    assert_eq!(
        webhook
            .sign(MSG_ID, VECTOR_TS, VECTOR_BODY.as_bytes())
            .unwrap(),
        VECTOR_SIG
    );

    let rx = Receiver::start().unwrap();
    rx.set_secret(Some(SECRET.into()));
    let ts = VECTOR_TS.to_string();
    post(
        &rx,
        "/vector",
        &webhook_headers(MSG_ID, &ts, VECTOR_SIG),
        VECTOR_BODY.as_bytes(),
    );
    let got = &rx.received()[0];
    assert_eq!(
        (
            got.webhook_id.as_str(),
            got.timestamp.as_str(),
            got.signature.as_str()
        ),
        (MSG_ID, "1614265330", VECTOR_SIG)
    );
    assert_eq!(got.body, VECTOR_BODY.as_bytes());
    // The signature is right but the timestamp is far outside the 5-minute tolerance.
    assert_eq!(got.verified, Some(false));
}

#[test]
fn verifies_fresh_signatures() {
    let rx = Receiver::start().unwrap();
    let webhook = Webhook::new(SECRET).unwrap();
    let ts = now();
    let good = webhook.sign(MSG_ID, ts, VECTOR_BODY.as_bytes()).unwrap();
    let ts = ts.to_string();
    let send = |sig: &str, body: &str| {
        post(
            &rx,
            "/v",
            &webhook_headers(MSG_ID, &ts, sig),
            body.as_bytes(),
        );
        rx.received().last().unwrap().verified
    };

    assert_eq!(send(&good, VECTOR_BODY), None, "no secret, no verdict");
    rx.set_secret(Some(SECRET.into()));
    assert_eq!(send(&good, VECTOR_BODY), Some(true));
    assert_eq!(send(VECTOR_SIG, VECTOR_BODY), Some(false));
    assert_eq!(send(&good, r#"{"test": 2432232315}"#), Some(false));
    // Several space-separated signatures: one valid one is enough.
    let rotated = format!("{VECTOR_SIG} {good}");
    assert_eq!(send(&rotated, VECTOR_BODY), Some(true));

    post(&rx, "/v", &[], VECTOR_BODY.as_bytes());
    assert_eq!(rx.received().last().unwrap().verified, Some(false));

    rx.set_secret(Some("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".into()));
    assert_eq!(send(&good, VECTOR_BODY), Some(false), "other secret");
    rx.set_secret(Some("whsec_!!!".into()));
    assert_eq!(send(&good, VECTOR_BODY), Some(false), "undecodable secret");
    rx.set_secret(None);
    assert_eq!(send(&good, VECTOR_BODY), None);
}

#[test]
fn keep_alive_serves_several_requests_per_connection() {
    let rx = Receiver::start().unwrap();
    rx.script("/k", vec![Reply::Status(500)]);
    let stream = TcpStream::connect(("127.0.0.1", rx.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for expected in [500, 200, 200] {
        writer
            .write_all(&request_text("/k", &[], b"{}", false))
            .unwrap();
        let answer = read_answer(&mut reader).unwrap();
        assert_eq!(answer.status, expected);
        assert_ne!(answer.header("connection"), Some("close"));
    }
    assert_eq!(rx.count(), 3);
}

#[test]
fn serves_http2_with_prior_knowledge() {
    use hyper_util::client::legacy::Client;

    let rx = Receiver::start().unwrap();
    rx.script("/h2", vec![Reply::Status(503)]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let statuses = runtime.block_on(async {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http::<Full<Bytes>>();
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let request = Request::post(rx.url("/h2"))
                .header("webhook-id", "msg_h2")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(b"{\"h2\":true}")))
                .unwrap();
            let response = client.request(request).await.unwrap();
            assert_eq!(response.version(), hyper::Version::HTTP_2);
            statuses.push(response.status().as_u16());
        }
        statuses
    });
    assert_eq!(statuses, [503, 200]);
    let got = rx.received_on("/h2");
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].webhook_id, "msg_h2");
    assert_eq!(got[1].json(), Some(serde_json::json!({"h2": true})));
}

#[test]
fn start_on_a_chosen_port() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rx = Receiver::start_on(port).unwrap();
    assert_eq!(rx.port(), port);
    assert_eq!(rx.url("/x"), format!("http://127.0.0.1:{port}/x"));
    assert_eq!(post(&rx, "/x", &[], b"{}").status, 200);
    assert!(Receiver::start_on(port).is_err(), "port already taken");
}

#[test]
fn on_request_sees_requests_even_when_not_kept() {
    let rx = Receiver::start().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    rx.on_request(move |r| sink.lock().unwrap().push(r.webhook_id.clone()));
    post(&rx, "/a", &[("webhook-id", "one")], b"{}");
    rx.keep_received(false);
    post(&rx, "/a", &[("webhook-id", "two")], b"{}");
    assert_eq!(*seen.lock().unwrap(), ["one", "two"]);
    assert_eq!(rx.count(), 1);
    rx.keep_received(true);
    post(&rx, "/a", &[("webhook-id", "three")], b"{}");
    assert_eq!(rx.count(), 2);
}

/// Sends one request on a fresh connection and returns everything the receiver sent back
/// before it closed the connection (or `timeout` passed), and how long that took.
fn raw_exchange(rx: &Receiver, path: &str, timeout: Duration) -> (Vec<u8>, Duration) {
    let mut stream = TcpStream::connect(("127.0.0.1", rx.port())).unwrap();
    stream.set_read_timeout(Some(timeout)).unwrap();
    let started = Instant::now();
    stream
        .write_all(&request_text(path, &[], b"{}", true))
        .unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    (got, started.elapsed())
}

#[test]
fn chaos_replies_drop_break_and_drip() {
    let rx = Receiver::start().unwrap();
    rx.script(
        "/chaos",
        vec![
            Reply::Drop,
            Reply::Break(200),
            Reply::Drip {
                status: 200,
                bytes: 5,
                every: Duration::from_millis(100),
            },
        ],
    );
    // Drop: the connection closes with nothing sent back.
    let (got, _) = raw_exchange(&rx, "/chaos", Duration::from_secs(5));
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    // Break: a status line and the start of a body, then the connection is cut before the
    // body is complete (chunked, with no final chunk).
    let (got, _) = raw_exchange(&rx, "/chaos", Duration::from_secs(5));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("partial"), "{text}");
    assert!(!text.ends_with("0\r\n\r\n"), "{text}");
    // Drip: the whole body, one byte every 100 ms.
    let (got, took) = raw_exchange(&rx, "/chaos", Duration::from_secs(5));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("0\r\n\r\n"), "{text}");
    assert!(took >= Duration::from_millis(450), "{took:?}");
    // All three were recorded as they arrived.
    assert_eq!(rx.received_on("/chaos").len(), 3);
}
