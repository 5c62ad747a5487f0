//! Runs the `outbox-receiver` binary: JSON lines on stdout and in the log, clean stop on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn post(port: u16, path: &str, headers: &[(&str, &str)], body: &str) -> u16 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut text = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(text.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn prints_json_lines_and_stops_on_sigterm() {
    let log = std::env::temp_dir().join(format!("outbox-receiver-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-receiver"))
        .args(["--port", "0", "--secret", SECRET, "--log"])
        .arg(&log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut banner = String::new();
    stderr.read_line(&mut banner).unwrap();
    let port: u16 = banner
        .trim_end()
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no port in {banner:?}"));

    let ts = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let body = r#"{"type":"order.created","data":{"id":7}}"#;
    let sig = standardwebhooks::Webhook::new(SECRET)
        .unwrap()
        .sign("msg_bin", ts, body.as_bytes())
        .unwrap();
    let ts = ts.to_string();
    let signed = [
        ("webhook-id", "msg_bin"),
        ("webhook-timestamp", ts.as_str()),
        ("webhook-signature", sig.as_str()),
    ];
    assert_eq!(post(port, "/orders", &signed, body), 200);
    assert_eq!(post(port, "/plain", &[], "just text"), 200);

    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        lines.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    assert_eq!(
        lines[0],
        serde_json::json!({
            "webhook_id": "msg_bin",
            "timestamp": ts,
            "verified": true,
            "path": "/orders",
            "body": {"type": "order.created", "data": {"id": 7}},
        })
    );
    assert_eq!(
        lines[1],
        serde_json::json!({
            "webhook_id": "",
            "timestamp": "",
            "verified": false,
            "path": "/plain",
            "body": "just text",
        })
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "still running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");

    let logged: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logged, lines);
    let _ = std::fs::remove_file(&log);
}

#[test]
fn rejects_bad_arguments() {
    let bin = env!("CARGO_BIN_EXE_outbox-receiver");
    for args in [
        &["--port"][..],
        &["--port", "http"],
        &["--secret", "whsec_!!!"],
        &["--bogus"],
    ] {
        let out = Command::new(bin).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"));
    }
    let help = Command::new(bin).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--secret"));
}
