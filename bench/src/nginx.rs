//! A receiver that costs next to nothing: nginx answering 200 on loopback (Debian's
//! `nginx-light`). With it, a delivery rate measures the database side and the sender
//! rather than the bench's own receiver.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::harness::{seconds_between, Bench};
use crate::report::Rows;
use crate::{cpu, Result};

const NGINX: &str = "/usr/sbin/nginx";

pub struct Nginx {
    child: Child,
    port: u16,
    prefix: PathBuf,
    conf: PathBuf,
}

impl Nginx {
    /// Starts nginx with a configuration of its own in `dir` (one worker process: the
    /// machine's cores are the database's and the sender's).
    pub fn start(dir: &Path) -> Result<Nginx> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let prefix: PathBuf = dir.join("nginx");
        std::fs::create_dir_all(prefix.join("logs"))?;
        let conf = prefix.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\n\
                 pid {prefix}/nginx.pid;\n\
                 error_log {prefix}/logs/error.log warn;\n\
                 events {{ worker_connections 8192; }}\n\
                 http {{\n\
                   access_log off;\n\
                   keepalive_requests 10000000;\n\
                   client_body_buffer_size 64k;\n\
                   server {{ listen 127.0.0.1:{port}; location / {{ return 200; }} }}\n\
                 }}\n",
                prefix = prefix.display()
            ),
        )?;
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .spawn()
            .map_err(|e| {
                format!("cannot start {NGINX} (bench/run.sh installs nginx-light): {e}")
            })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("nginx did not listen on port {port}").into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Nginx {
            child,
            port,
            prefix,
            conf,
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }
}

impl Drop for Nginx {
    /// Stops master and workers together (killing the master alone would leave its worker
    /// process behind, holding the port).
    fn drop(&mut self) {
        let stopped = Command::new(NGINX)
            .arg("-p")
            .arg(&self.prefix)
            .arg("-c")
            .arg(&self.conf)
            .args(["-s", "stop"])
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// `n` events enqueued in 10 transactions from one connection while the worker delivers
/// them to nginx; the clock runs from the first enqueue until all are recorded delivered.
pub fn run(bench: &Bench, n: u32) -> Result<Rows> {
    let mut rows = Rows::new("nginx");
    let nginx = Nginx::start(&bench.cluster.dir)?;
    let mut c = bench.client();
    c.execute(
        "SELECT outbox.disable_endpoint($1::text::uuid)",
        &[&bench.endpoint],
    )?;
    let endpoint: String = c
        .query_one(
            "SELECT outbox.create_endpoint($1::text)::text",
            &[&nginx.url()],
        )?
        .get(0);
    let before = bench.cpu_snapshot();
    eprintln!("nginx: {n} events in 10 transactions, delivered to nginx on loopback");
    let enqueued = bench.enqueue_batched(n, (n / 10).max(1), 1, Some(&endpoint))?;
    eprintln!(
        "nginx: enqueued in {:.1} s, waiting for deliveries",
        enqueued.seconds()
    );
    let settled = bench.wait_settled(Duration::from_secs(600))?;
    let usage = cpu::Usage::between(&before, &bench.cpu_snapshot());
    let delivered = bench.delivered("bench.item")?;

    let n_f = f64::from(n);
    let total = seconds_between(enqueued.start, settled);
    rows.add("events", n_f, "events");
    rows.add("enqueue rate", n_f / enqueued.seconds(), "events/s");
    rows.add("all delivered, from first enqueue", total, "s");
    rows.add(
        "end-to-end delivery rate (target >= 30k/s)",
        n_f / total,
        "events/s",
    );
    rows.add("rows delivered", delivered as f64, "deliveries");
    rows.add_cpu(&usage);
    Ok(rows)
}
