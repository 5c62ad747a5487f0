//! `outbox-receiver [--port N] [--secret whsec_...] [--log FILE]`
//!
//! Listens on 127.0.0.1, answers 200 to every request and prints one JSON line per
//! request to stdout (and appends it to FILE): `webhook_id`, `timestamp`, `verified`
//! (null without `--secret`), `path` and `body` (parsed JSON, or else a string).
//! Stops on SIGTERM or SIGINT.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::process::ExitCode;
use std::sync::Mutex;

use outbox_receiver::{Received, Receiver};
use tokio::signal::unix::{signal, SignalKind};

const USAGE: &str = "usage: outbox-receiver [--port N] [--secret whsec_...] [--log FILE]

Listens on 127.0.0.1 (port 0, the default, picks a free one; the address is
printed on stderr), answers 200 to every request and prints one JSON line per
request on stdout, also appended to FILE with --log. With --secret, each
request's Standard Webhooks signature is verified. Stops on SIGTERM or SIGINT.";

struct Options {
    port: u16,
    secret: Option<String>,
    log: Option<String>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut options = Options {
        port: 0,
        secret: None,
        log: None,
    };
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name.to_owned(), Some(value.into())),
            _ => (arg, None),
        };
        if name == "-h" || name == "--help" {
            return Ok(None);
        }
        if !matches!(name.as_str(), "--port" | "--secret" | "--log") {
            return Err(format!("unknown argument {name:?}"));
        }
        let value = inline
            .or_else(|| args.next())
            .ok_or_else(|| format!("{name} needs a value"))?;
        match name.as_str() {
            "--port" => {
                options.port = value
                    .parse()
                    .map_err(|_| format!("--port: {value:?} is not a port number"))?
            }
            "--secret" => {
                if standardwebhooks::Webhook::new(&value).is_err() {
                    return Err("--secret: not a whsec_<base64> secret".into());
                }
                options.secret = Some(value)
            }
            _ => options.log = Some(value),
        }
    }
    Ok(Some(options))
}

fn line(r: &Received) -> String {
    let body = serde_json::from_slice::<serde_json::Value>(&r.body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&r.body).into()));
    serde_json::json!({
        "webhook_id": r.webhook_id,
        "timestamp": r.timestamp,
        "verified": r.verified,
        "path": r.path,
        "body": body,
    })
    .to_string()
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("outbox-receiver: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let log: Option<Mutex<File>> = match &options.log {
        Some(path) => match OpenOptions::new().create(true).append(true).open(path) {
            Ok(file) => Some(Mutex::new(file)),
            Err(e) => {
                eprintln!("outbox-receiver: cannot open {path}: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    // Signal handlers go in before listening, so that a stop request is never missed.
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .and_then(|runtime| {
            let _context = runtime.enter();
            let term = signal(SignalKind::terminate())?;
            let int = signal(SignalKind::interrupt())?;
            Ok((runtime, term, int))
        });
    let (signals, mut term, mut int) = match signals {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("outbox-receiver: cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let receiver = match Receiver::start_on(options.port) {
        Ok(receiver) => receiver,
        Err(e) => {
            eprintln!(
                "outbox-receiver: cannot listen on 127.0.0.1:{}: {e}",
                options.port
            );
            return ExitCode::FAILURE;
        }
    };
    receiver.keep_received(false);
    receiver.set_secret(options.secret);
    receiver.on_request(move |r| {
        let text = line(r);
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
        if let Some(log) = &log {
            let mut file = log.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(file, "{text}");
            let _ = file.flush();
        }
    });
    eprintln!("outbox-receiver: listening on {}", receiver.url("/"));

    signals.block_on(async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    });
    drop(receiver);
    ExitCode::SUCCESS
}
