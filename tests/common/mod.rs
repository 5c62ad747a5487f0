//! A throwaway PostgreSQL cluster for whole-system tests: its own data directory, a free
//! loopback port, the extension created in database `postgres`. The cluster runs as the
//! `postgres` OS user when the tests run as root (initdb refuses root).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    running: bool,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL program as the cluster's owner.
pub fn pg_command(program: &str) -> Command {
    let path = Path::new(PG_BIN).join(program);
    if is_root() {
        let mut c = Command::new("sudo");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run(mut cmd: Command) -> Output {
    let out = cmd.output().expect("failed to start a PostgreSQL program");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A fresh directory for one cluster, owned by the cluster's OS user.
fn new_dir() -> PathBuf {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "webhook-outbox-it-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        run({
            let mut c = Command::new("chown");
            c.arg("postgres:postgres").arg(&dir);
            c
        });
    }
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// A fresh cluster with the extension created. `settings` are extra postgresql.conf lines.
    pub fn start(settings: &[&str]) -> Cluster {
        let cluster = Cluster::start_empty(settings);
        cluster
            .client()
            .batch_execute("CREATE EXTENSION webhook_outbox")
            .unwrap();
        cluster
    }

    /// A fresh cluster without the extension.
    pub fn start_empty(settings: &[&str]) -> Cluster {
        let dir = new_dir();
        let data = dir.join("data");
        run({
            let mut c = pg_command("initdb");
            c.args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data);
            c
        });
        Cluster::configure_and_start(dir, settings)
    }

    /// A hot standby of `primary`, streaming from it (pg_basebackup -R), with `settings`.
    pub fn standby_of(primary: &Cluster, settings: &[&str]) -> Cluster {
        let dir = new_dir();
        run({
            let mut c = pg_command("pg_basebackup");
            c.args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "--no-sync",
            ])
            .args(["-p", &primary.port.to_string(), "-D"])
            .arg(dir.join("data"));
            c
        });
        Cluster::configure_and_start(dir, settings)
    }

    /// Appends this cluster's settings to postgresql.conf (later lines win) and starts it.
    fn configure_and_start(dir: PathBuf, settings: &[&str]) -> Cluster {
        let data = dir.join("data");
        let port = free_port();
        let mut conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nlog_min_messages = warning\nlogging_collector = off\n\
             outbox.allowed_targets = '127.0.0.1/32'\n",
            dir.display()
        );
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        // The data directory belongs to postgres; append through a program running as it.
        let mut tee = if is_root() {
            let mut c = Command::new("sudo");
            c.args(["-u", "postgres", "--", "tee", "-a"]);
            c
        } else {
            let mut c = Command::new("tee");
            c.arg("-a");
            c
        };
        tee.arg(data.join("postgresql.conf"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null());
        let mut child = tee.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());

        let mut cluster = Cluster {
            dir,
            port,
            running: false,
        };
        cluster.pg_ctl_start();
        cluster
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn pg_ctl_start(&mut self) {
        run({
            let mut c = pg_command("pg_ctl");
            c.args(["-w", "-t", "60", "-D"])
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_file())
                .arg("start");
            c
        });
        self.running = true;
    }

    /// `pg_ctl stop` with the given mode (smart, fast, immediate).
    pub fn stop(&mut self, mode: &str) {
        run({
            let mut c = pg_command("pg_ctl");
            c.args(["-w", "-t", "60", "-m", mode, "-D"])
                .arg(self.data_dir())
                .arg("stop");
            c
        });
        self.running = false;
    }

    /// `pg_ctl promote`: a standby becomes a primary.
    pub fn promote(&self) {
        run({
            let mut c = pg_command("pg_ctl");
            c.args(["-w", "-t", "60", "-D"])
                .arg(self.data_dir())
                .arg("promote");
            c
        });
    }

    pub fn restart(&mut self, mode: &str) {
        self.stop(mode);
        self.pg_ctl_start();
    }

    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=10",
            self.port
        )
    }

    pub fn client(&self) -> postgres::Client {
        self.client_to("postgres")
    }

    /// A connection to `postgres` as `role` (which must be able to log in).
    pub fn client_as(&self, role: &str) -> postgres::Client {
        let info = self
            .conninfo()
            .replace("user=postgres", &format!("user={role}"));
        postgres::Client::connect(&info, postgres::NoTls).unwrap()
    }

    pub fn client_to(&self, database: &str) -> postgres::Client {
        let info = self
            .conninfo()
            .replace("dbname=postgres", &format!("dbname={database}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match postgres::Client::connect(&info, postgres::NoTls) {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("cannot connect to the test cluster: {e}"),
            }
        }
    }

    /// The server log so far (useful in assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let mut c = pg_command("pg_ctl");
            c.args(["-w", "-m", "immediate", "-D"])
                .arg(self.data_dir())
                .arg("stop");
            let _ = c.output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The single text column of every row `sql` returns, in order.
pub fn lines(c: &mut postgres::Client, sql: &str) -> Vec<String> {
    c.query(sql, &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The SQLSTATE of a failed statement, e.g. "55000".
pub fn sqlstate(err: &postgres::Error) -> String {
    err.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {err}"))
}
pub mod worker;
