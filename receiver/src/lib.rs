//! A webhook receiver for webhook_outbox.
//!
//! [`Receiver`] listens on `127.0.0.1`, records every request it gets, optionally verifies
//! its Standard Webhooks signature, and answers as scripted per path (200 by default).
//! It owns a small tokio runtime on background threads, so it is driven from plain
//! blocking code such as `#[test]` functions:
//!
//! ```no_run
//! use outbox_receiver::{Receiver, Reply};
//! use std::time::Duration;
//!
//! let rx = Receiver::start().unwrap();
//! rx.set_secret(Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()));
//! rx.script("/hook", vec![Reply::Status(500), Reply::Status(503)]);
//! let url = rx.url("/hook");
//! // ... point an endpoint at `url` and let deliveries happen ...
//! assert!(rx.wait_for(3, Duration::from_secs(30)));
//! assert_eq!(rx.received_on("/hook")[2].verified, Some(true));
//! ```
//!
//! HTTP/1.1 (with keep-alive) and HTTP/2 with prior knowledge (h2c) are both served.
//!
//! [`FakeDns`] is its counterpart for name resolution: a DNS server whose answers (and
//! silences) a test chooses.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use standardwebhooks::Webhook;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub mod dns;
pub use dns::FakeDns;

/// How the receiver answers one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Answer at once with this status and an empty body.
    Status(u16),
    /// Answer at once with this status, these headers (e.g. `Retry-After`) and an empty body.
    StatusWithHeaders(u16, Vec<(String, String)>),
    /// Wait this long, then answer with this status.
    Delay(Duration, u16),
    /// Answer at once with this status and this body.
    Body(u16, Vec<u8>),
    /// Never answer; the request stays open until the client gives up or the receiver stops.
    Hang,
    /// Close the connection without answering.
    Drop,
    /// Send the status line and headers, then a few body bytes, then cut the connection.
    Break(u16),
    /// Send the status line and headers at once, then the body one byte at a time, `every`
    /// apart, `bytes` bytes in all.
    Drip {
        status: u16,
        bytes: usize,
        every: Duration,
    },
}

/// One request as the receiver got it.
#[derive(Clone, Debug)]
pub struct Received {
    /// The `webhook-id` header, or `""` when absent.
    pub webhook_id: String,
    /// The `webhook-timestamp` header, or `""` when absent.
    pub timestamp: String,
    /// The `webhook-signature` header, or `""` when absent.
    pub signature: String,
    /// Every header in arrival order, names lowercased; repeated headers appear repeatedly.
    pub headers: Vec<(String, String)>,
    /// The raw request body.
    pub body: Vec<u8>,
    /// The request path, without the query string.
    pub path: String,
    /// When the whole request (headers and body) had arrived.
    pub received_at: SystemTime,
    /// `None` when no secret is set; otherwise whether the Standard Webhooks verification
    /// (signature and timestamp tolerance) succeeded.
    pub verified: Option<bool>,
}

impl Received {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

type Observer = Arc<dyn Fn(&Received) + Send + Sync + 'static>;

/// `None`: no secret. `Some(None)`: a secret that is not valid `whsec_<base64>`, so
/// nothing verifies.
type Secret = Option<Arc<Option<Webhook>>>;

#[derive(Default)]
struct State {
    received: Vec<Received>,
    scripts: HashMap<String, VecDeque<Reply>>,
    defaults: HashMap<String, Reply>,
    secret: Secret,
    observer: Option<Observer>,
    discard: bool,
}

struct Shared {
    state: Mutex<State>,
    arrived: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking observer must not make the receiver unusable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A webhook receiver listening on `127.0.0.1`, with its own runtime on background threads.
///
/// Dropping it stops the server and the runtime.
pub struct Receiver {
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

fn normalize(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

impl Receiver {
    /// Listens on `127.0.0.1` on a free port, answering 200 to everything.
    pub fn start() -> io::Result<Receiver> {
        Receiver::start_on(0)
    }

    /// Listens on `127.0.0.1:port` (0 for a free port), answering 200 to everything.
    pub fn start_on(port: u16) -> io::Result<Receiver> {
        Receiver::launch(port, None)
    }

    /// Listens on a free port with HTTPS, presenting `cert_pem` (a chain) and `key_pem`.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> io::Result<Receiver> {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(io::Error::other)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Receiver::launch(0, Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }

    fn launch(port: u16, tls: Option<tokio_rustls::TlsAcceptor>) -> io::Result<Receiver> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("outbox-receiver")
            .enable_all()
            .build()?;
        let listener = runtime.block_on(TcpListener::bind(SocketAddr::from((
            Ipv4Addr::LOCALHOST,
            port,
        ))))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            arrived: Condvar::new(),
        });
        let (shutdown, stop) = watch::channel(false);
        let is_tls = tls.is_some();
        runtime.spawn(accept_loop(listener, tls, shared.clone(), stop));
        Ok(Receiver {
            runtime: Some(runtime),
            addr,
            tls: is_tls,
            shared,
            shutdown,
        })
    }

    /// `http://127.0.0.1:PORT/path` (a leading `/` is added when missing).
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{}", self.addr, normalize(path))
    }

    /// The port listened on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Sets (or with `None` removes) the `whsec_...` secret that requests are verified
    /// with from now on. A secret that does not decode makes every request unverified.
    pub fn set_secret(&self, secret: Option<String>) {
        let secret = secret.map(|s| Arc::new(Webhook::new(&s).ok()));
        self.shared.lock().secret = secret;
    }

    /// Answers the next requests on `path` with `replies`, in order, replacing any
    /// earlier script for `path`. Once they are used up the default for `path` applies.
    pub fn script(&self, path: &str, replies: Vec<Reply>) {
        self.shared
            .lock()
            .scripts
            .insert(normalize(path), replies.into());
    }

    /// The reply for requests on `path` that no script entry covers (200 unless set).
    pub fn set_default(&self, path: &str, reply: Reply) {
        self.shared.lock().defaults.insert(normalize(path), reply);
    }

    /// Calls `f` with every request once it is recorded, before it is answered, on a
    /// runtime thread. Replaces any earlier callback.
    pub fn on_request<F>(&self, f: F)
    where
        F: Fn(&Received) + Send + Sync + 'static,
    {
        self.shared.lock().observer = Some(Arc::new(f));
    }

    /// With `false`, requests are no longer kept (only passed to [`Receiver::on_request`]),
    /// so [`Receiver::received`], [`Receiver::count`] and [`Receiver::wait_for`] see none of
    /// them. For long runs. Default `true`.
    pub fn keep_received(&self, keep: bool) {
        self.shared.lock().discard = !keep;
    }

    /// Every request recorded since start or the last [`Receiver::clear`], in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().received.clone()
    }

    /// The recorded requests on `path`, in arrival order.
    pub fn received_on(&self, path: &str) -> Vec<Received> {
        let path = normalize(path);
        self.shared
            .lock()
            .received
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// How many requests are recorded.
    pub fn count(&self) -> usize {
        self.shared.lock().received.len()
    }

    /// Blocks until at least `n` requests are recorded or `timeout` passes; tells which.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        while state.received.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .shared
                .arrived
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Forgets the recorded requests. Scripts, defaults and the secret stay.
    pub fn clear(&self) {
        self.shared.lock().received.clear();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(runtime) = self.runtime.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                // Blocking is not allowed inside a runtime.
                runtime.shutdown_background();
            } else {
                runtime.shutdown_timeout(Duration::from_secs(2));
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            _ = stopped(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Such as running out of file descriptors: wait rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let stop = stop.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, shared.clone(), stop.clone()));
            let builder = auto::Builder::new(TokioExecutor::new());
            match tls {
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                // A failed handshake (an untrusting client) just ends the connection.
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            }
        });
    }
}

/// What the receiver answers with: a body that may arrive slowly or break off.
type Body = BoxBody<Bytes, io::Error>;

/// A response body fed frame by frame from a task (for dripping and breaking off).
struct FedBody(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, io::Error>>);

impl hyper::body::Body for FedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx)
    }
}

/// A response with `status` whose body `feed` produces, concurrently with the answer.
fn fed<F, Fut>(status: StatusCode, feed: F) -> Response<Body>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Frame<Bytes>, io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(feed(tx));
    let mut response = Response::new(BodyExt::boxed(FedBody(rx)));
    *response.status_mut() = status;
    response
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<Response<Body>, io::Error> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        // The client went away before sending the whole body: nothing to record or answer.
        Err(_) => return Ok(status_only(StatusCode::BAD_REQUEST)),
    };
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    };
    let path = parts.uri.path().to_owned();
    let secret = shared.lock().secret.clone();
    let verified = secret.map(|webhook| match webhook.as_ref() {
        Some(webhook) => webhook.verify(&body, &parts.headers).is_ok(),
        None => false,
    });
    let received = Received {
        webhook_id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
        path,
        received_at: SystemTime::now(),
        verified,
    };

    let (reply, observer) = {
        let mut state = shared.lock();
        let reply = state
            .scripts
            .get_mut(&received.path)
            .and_then(VecDeque::pop_front)
            .or_else(|| state.defaults.get(&received.path).cloned())
            .unwrap_or(Reply::Status(200));
        if !state.discard {
            state.received.push(received.clone());
            shared.arrived.notify_all();
        }
        (reply, state.observer.clone())
    };
    if let Some(observer) = observer {
        observer(&received);
    }

    let response = match reply {
        Reply::Status(code) => status_only(status(code)),
        Reply::StatusWithHeaders(code, headers) => {
            let mut response = status_only(status(code));
            for (name, value) in headers {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    response.headers_mut().append(name, value);
                }
            }
            response
        }
        Reply::Delay(delay, code) => {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(&mut stop) => {}
            }
            status_only(status(code))
        }
        Reply::Body(code, body) => {
            let mut response = Response::new(full(Bytes::from(body)));
            *response.status_mut() = status(code);
            response
        }
        Reply::Hang => {
            stopped(&mut stop).await;
            status_only(StatusCode::SERVICE_UNAVAILABLE)
        }
        // An error from the service makes the server close the connection unanswered.
        Reply::Drop => return Err(io::Error::other("dropped on purpose")),
        Reply::Break(code) => fed(status(code), |tx| async move {
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(b"{\"partial\":"))))
                .await;
            // Let the start of the body reach the client before the cut.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx
                .send(Err(io::Error::other("connection cut on purpose")))
                .await;
        }),
        Reply::Drip {
            status: code,
            bytes,
            every,
        } => fed(status(code), move |tx| async move {
            for _ in 0..bytes {
                tokio::time::sleep(every).await;
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .is_err()
                {
                    return; // the client hung up
                }
            }
        }),
    };
    Ok(response)
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Resolves once the receiver is stopping (or gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn status_only(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests;
