//! The HTTP side of webhook_outbox.
//!
//! PostgreSQL backends are single-threaded and none of their functions may be called from
//! another thread, so the sender is a world of its own: a small tokio runtime whose threads
//! never see a PostgreSQL signal, fed with plain owned [`Request`]s and answering with plain
//! [`Outcome`]s. The worker's main thread submits without blocking, and an `eventfd` tells it
//! when outcomes are waiting, so it can sleep on its latch and that descriptor together.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outbox_core::outcome::Response;
use outbox_core::signing::{signature_header, SigningKey};
use outbox_core::ssrf::{self, AllowList};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use tokio::sync::{mpsc, Semaphore};

mod dns;

/// One attempt to send, as claimed from the queue.
#[derive(Debug, Clone)]
pub struct Request {
    /// The delivery's id (opaque to the sender; handed back in the outcome).
    pub delivery_id: [u8; 16],
    pub attempt: i32,
    /// The `webhook-id`: the event id, identical on every retry.
    pub msg_id: String,
    pub url: String,
    /// Signing keys; more than one during a secret rotation.
    pub keys: Vec<SigningKey>,
    /// The endpoint's extra headers (already validated when the endpoint was saved).
    pub headers: Vec<(String, String)>,
    pub body: bytes::Bytes,
    pub timeout: Duration,
}

/// How one attempt ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub delivery_id: [u8; 16],
    pub attempt: i32,
    pub response: Response,
    pub duration: Duration,
    /// The first bytes of the response body (lossy UTF-8), up to the configured cap.
    pub body_excerpt: Option<String>,
}

impl Outcome {
    pub fn status_code(&self) -> Option<u16> {
        match &self.response {
            Response::Status { code, .. } => Some(*code),
            Response::Failed { .. } | Response::Refused { .. } => None,
        }
    }
}

/// Idle keep-alive connections kept per receiver host.
const IDLE_CONNECTIONS_PER_HOST: usize = 128;

#[derive(Debug, Clone)]
pub struct Config {
    /// Requests in flight at once, across all endpoints.
    pub max_in_flight: usize,
    /// Bytes of each response body kept for the attempt history.
    pub max_response_body: usize,
    pub user_agent: String,
    /// tokio worker threads; one or two is best on a small machine, where more only
    /// compete with PostgreSQL for the cores.
    pub threads: usize,
    pub connect_timeout: Duration,
    /// Private and special-purpose targets that may be contacted anyway.
    pub allow: AllowList,
    /// Extra trusted root certificates (PEM), e.g. a private CA, on top of the system's.
    pub extra_roots_pem: Option<Vec<u8>>,
    /// How long one name may take to resolve, all retries included. A name whose servers
    /// never answer fails its attempt after this, without holding anything other requests
    /// need.
    pub dns_timeout: Duration,
    /// Name servers to ask instead of those of /etc/resolv.conf (empty: the system's).
    pub dns_servers: Vec<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_in_flight: 256,
            max_response_body: 1024,
            user_agent: concat!("webhook_outbox/", env!("CARGO_PKG_VERSION")).to_string(),
            threads: 1,
            connect_timeout: Duration::from_secs(10),
            allow: AllowList::default(),
            extra_roots_pem: None,
            dns_timeout: Duration::from_secs(5),
            dns_servers: Vec::new(),
        }
    }
}

/// Signals a thread may never receive: PostgreSQL's handlers assume its main thread.
fn block_postgres_signals() {
    // SAFETY: plain libc signal-mask calls on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        // Faults must still reach the thread that caused them.
        for s in [libc::SIGSEGV, libc::SIGBUS, libc::SIGFPE, libc::SIGILL] {
            libc::sigdelset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Wakes the owner of the sender when outcomes are ready.
struct Waker(OwnedFd);

impl Waker {
    fn new() -> io::Result<Waker> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(Waker(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our own eventfd. A full counter (EAGAIN)
        // still leaves the descriptor readable, which is all that matters.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn reset(&self) {
        let mut buf: u64 = 0;
        // SAFETY: reads 8 bytes into a local; EAGAIN when nothing is pending is fine.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
    }
}

struct Shared {
    outcomes: Mutex<Vec<Outcome>>,
    waker: Waker,
    in_flight: AtomicUsize,
    /// Read per request, so a reload takes effect without restarting the sender.
    max_response_body: AtomicUsize,
    allow: RwLock<Arc<AllowList>>,
}

impl Shared {
    fn allow_list(&self) -> Arc<AllowList> {
        self.allow.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A refusal by the SSRF guard, raised from name resolution and recognised again in the
/// error chain reqwest hands back.
#[derive(Debug)]
struct GuardRefusal(String);

impl std::fmt::Display for GuardRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GuardRefusal {}

/// Resolves names itself and drops every address the guard refuses, so the connection is
/// only ever made to an address that was checked (no rebinding between check and connect).
struct GuardedResolver {
    shared: Arc<Shared>,
    dns: Arc<dns::Resolver>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.shared.allow_list();
        let dns = self.dns.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let resolved = dns.lookup(&host).await?;
            let mut usable = Vec::new();
            let mut refusal = None;
            for ip in resolved {
                match ssrf::check(&host, ip, &allow) {
                    Ok(()) => usable.push(SocketAddr::new(ip, 0)),
                    Err(e) => refusal = Some(e),
                }
            }
            if usable.is_empty() {
                let why = refusal.unwrap_or_else(|| format!("{host} has no addresses"));
                return Err(Box::new(GuardRefusal(why)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(usable.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl Shared {
    fn finish(&self, outcome: Outcome) {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(outcome);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.waker.wake();
    }
}

/// The running sender.
pub struct Sender {
    runtime: Option<tokio::runtime::Runtime>,
    submit: Option<mpsc::Sender<Request>>,
    shared: Arc<Shared>,
    max_in_flight: usize,
}

impl Sender {
    pub fn start(config: Config) -> io::Result<Sender> {
        let shared = Arc::new(Shared {
            outcomes: Mutex::new(Vec::new()),
            waker: Waker::new()?,
            in_flight: AtomicUsize::new(0),
            max_response_body: AtomicUsize::new(config.max_response_body),
            allow: RwLock::new(Arc::new(config.allow.clone())),
        });
        // Threads inherit the creating thread's mask: block before spawning, restore after.
        let previous = unsafe {
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), &mut old);
            old
        };
        block_postgres_signals();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads.max(1))
            // Nothing is expected on blocking threads (names are resolved asynchronously);
            // one bounds whatever might turn up there.
            .max_blocking_threads(1)
            .thread_name("outbox-sender")
            .on_thread_start(block_postgres_signals)
            .enable_all()
            .build();
        // SAFETY: restores the mask read above on this thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
        let runtime = runtime?;
        // Its queries run as tasks of whichever runtime performs the lookup: this one.
        let dns = Arc::new(dns::Resolver::new(&config.dns_servers, config.dns_timeout)?);

        let mut builder = reqwest::Client::builder();
        if let Some(pem) = &config.extra_roots_pem {
            let roots = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("invalid CA certificates: {e}"),
                )
            })?;
            if roots.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "no certificate in the CA file",
                ));
            }
            for root in roots {
                builder = builder.add_root_certificate(root);
            }
        }
        let client = builder
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(config.user_agent.clone())
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            // After a burst of thousands of requests to one receiver, keep a working set of
            // connections, not one per request of the burst (each holds its buffers).
            .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_HOST)
            .tcp_nodelay(true)
            // A proxy from the environment would connect on our behalf, past the guard.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                shared: shared.clone(),
                dns,
            }))
            .build()
            .map_err(io::Error::other)?;

        // Bounded by the in-flight cap: the owner submits only up to `capacity()`, so the
        // channel can never hold more than that.
        let (tx, mut rx) = mpsc::channel::<Request>(config.max_in_flight.max(1));
        let limit = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
        let dispatcher_shared = shared.clone();
        runtime.spawn(async move {
            while let Some(req) = rx.recv().await {
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    break;
                };
                let client = client.clone();
                let shared = dispatcher_shared.clone();
                tokio::spawn(async move {
                    let body_cap = shared.max_response_body.load(Ordering::Relaxed);
                    let outcome = match literal_ip_refusal(&req, &shared.allow_list()) {
                        Some(error) => ended(&req, Response::Refused { error }, Duration::ZERO),
                        None => send(&client, req, body_cap).await,
                    };
                    drop(permit);
                    shared.finish(outcome);
                });
            }
        });
        Ok(Sender {
            runtime: Some(runtime),
            submit: Some(tx),
            shared,
            max_in_flight: config.max_in_flight.max(1),
        })
    }

    /// Hands a request over; never blocks. The caller submits at most [`Sender::capacity`]
    /// requests; one that cannot be queued ends at once as a failed attempt (to be retried).
    pub fn submit(&self, req: Request) {
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        let refused = match &self.submit {
            Some(tx) => tx.try_send(req).err().map(|e| match e {
                mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
            }),
            None => Some(req),
        };
        if let Some(req) = refused {
            self.shared.finish(failed(
                &req,
                "the sender could not take the request".into(),
                false,
                Duration::ZERO,
            ));
        }
    }

    /// Changes how many bytes of each response body are kept, from the next request on.
    pub fn set_max_response_body(&self, bytes: usize) {
        self.shared
            .max_response_body
            .store(bytes, Ordering::Relaxed);
    }

    /// Replaces the SSRF allow-list, from the next request on.
    pub fn set_allow_list(&self, allow: AllowList) {
        *self.shared.allow.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(allow);
    }

    /// Requests submitted and not finished yet.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// How many more requests may be submitted now.
    pub fn capacity(&self) -> usize {
        self.max_in_flight.saturating_sub(self.in_flight())
    }

    /// The descriptor that becomes readable when outcomes are waiting.
    pub fn wake_fd(&self) -> RawFd {
        self.shared.waker.0.as_raw_fd()
    }

    /// Every outcome finished so far; never blocks.
    pub fn take_outcomes(&self) -> Vec<Outcome> {
        self.shared.waker.reset();
        std::mem::take(
            &mut *self
                .shared
                .outcomes
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Stops accepting requests, waits up to `grace` for those in flight, and returns every
    /// outcome not yet taken. Requests still unfinished after `grace` are abandoned; their
    /// deliveries stay claimed until their lease expires and are then sent again.
    pub fn shutdown(mut self, grace: Duration) -> Vec<Outcome> {
        self.submit = None;
        let deadline = Instant::now() + grace;
        while self.in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let outcomes = self.take_outcomes();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        outcomes
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// An attempt that ended without a response body to keep.
fn ended(req: &Request, response: Response, duration: Duration) -> Outcome {
    Outcome {
        delivery_id: req.delivery_id,
        attempt: req.attempt,
        response,
        duration,
        body_excerpt: None,
    }
}

fn failed(req: &Request, error: String, timed_out: bool, duration: Duration) -> Outcome {
    ended(req, Response::Failed { error, timed_out }, duration)
}

/// URLs with a literal IP address never reach the resolver, so they are checked here.
fn literal_ip_refusal(req: &Request, allow: &AllowList) -> Option<String> {
    let url = reqwest::Url::parse(&req.url).ok()?;
    let ip = match url.host()? {
        url::Host::Ipv4(a) => std::net::IpAddr::V4(a),
        url::Host::Ipv6(a) => std::net::IpAddr::V6(a),
        url::Host::Domain(_) => return None,
    };
    ssrf::check(&ip.to_string(), ip, allow).err()
}

/// The first error of type `T` among the causes of `e`.
fn cause<T: std::error::Error + 'static>(e: &reqwest::Error) -> Option<&T> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(found) = s.downcast_ref::<T>() {
            return Some(found);
        }
        source = s.source();
    }
    None
}

fn guard_refusal(e: &reqwest::Error) -> Option<String> {
    cause::<GuardRefusal>(e).map(|g| g.0.clone())
}

/// A name that did not resolve in time is a timeout like any other, though reqwest does not
/// count it as one.
fn timed_out(e: &reqwest::Error) -> bool {
    e.is_timeout() || cause::<dns::LookupError>(e).is_some_and(|l| l.timed_out)
}

/// Describes a transport error with its causes ("error sending request: …: Connection
/// refused"), which is what an operator needs in the attempt history.
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("timed out after {} ms", timeout.as_millis());
    }
    let mut text = if e.is_connect() {
        "connect error".to_string()
    } else {
        "request error".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn build_headers(req: &Request, timestamp: i64) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::with_capacity(req.headers.len() + 4);
    for (name, value) in &req.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let value =
            HeaderValue::from_str(value).map_err(|_| format!("invalid value for header {name}"))?;
        headers.append(name, value);
    }
    // Set last, so extra headers can never replace them.
    let signature = signature_header(&req.keys, &req.msg_id, timestamp, &req.body);
    let set = |h: &mut HeaderMap, name: &'static str, value: &str| -> Result<(), String> {
        h.insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(value).map_err(|_| format!("invalid {name} value"))?,
        );
        Ok(())
    };
    set(&mut headers, "webhook-id", &req.msg_id)?;
    set(&mut headers, "webhook-timestamp", &timestamp.to_string())?;
    set(&mut headers, "webhook-signature", &signature)?;
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(headers)
}

async fn send(client: &reqwest::Client, req: Request, body_cap: usize) -> Outcome {
    let started = Instant::now();
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let headers = match build_headers(&req, timestamp) {
        Ok(h) => h,
        Err(e) => return failed(&req, e, false, started.elapsed()),
    };
    let deadline = tokio::time::Instant::now() + req.timeout;
    let response = client
        .post(&req.url)
        .headers(headers)
        .timeout(req.timeout)
        .body(req.body.clone())
        .send()
        .await;
    let mut response = match response {
        Ok(r) => r,
        Err(e) => {
            if let Some(error) = guard_refusal(&e) {
                return ended(&req, Response::Refused { error }, started.elapsed());
            }
            return failed(
                &req,
                describe(&e, req.timeout),
                timed_out(&e),
                started.elapsed(),
            );
        }
    };
    let code = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // Keep the first bytes; stop reading at the cap or the deadline, whichever comes first,
    // so a huge or slow-dripping body cannot hold memory or the request slot.
    let mut excerpt = Vec::new();
    while excerpt.len() < body_cap {
        match tokio::time::timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                let room = body_cap - excerpt.len();
                excerpt.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => break,
        }
    }
    Outcome {
        delivery_id: req.delivery_id,
        attempt: req.attempt,
        response: Response::Status { code, retry_after },
        duration: started.elapsed(),
        body_excerpt: (!excerpt.is_empty()).then(|| String::from_utf8_lossy(&excerpt).into_owned()),
    }
}

#[cfg(test)]
mod tests;
