//! Name resolution for the sender.
//!
//! getaddrinfo blocks a thread for as long as the name servers take, and tokio runs it on a
//! small pool of blocking threads: a few endpoints whose DNS never answers held every one of
//! them, and lookups for healthy endpoints queued behind. Resolution here is asynchronous
//! instead (hickory), so a lookup costs a task rather than a thread, and each one has a
//! deadline of its own covering the whole resolution (search list, retries, A and AAAA).
//!
//! Only names are resolved here; which of the addresses may be connected to is the SSRF
//! guard's decision, taken by the caller on exactly the addresses returned.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::TokioResolver;

/// Answers kept (one per name and record type). Endpoints are few compared to this; the
/// bound only keeps a flood of distinct names from growing the cache without limit.
const CACHE_ENTRIES: u64 = 1024;

/// How long "no such name" and "no such record" are believed. Long enough that a dead
/// endpoint's retries do not query each time, short enough that a name just created (or a
/// missing AAAA record just added) is seen soon.
const NEGATIVE_TTL: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(30));

/// A failed lookup, as reqwest hands it back in its error chain.
#[derive(Debug)]
pub(crate) struct LookupError {
    message: String,
    /// The deadline passed without an answer (as opposed to an answer saying no).
    pub(crate) timed_out: bool,
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LookupError {}

pub(crate) struct Resolver {
    inner: TokioResolver,
    timeout: Duration,
    /// Why no name server is configured, when the system configuration could not be read:
    /// only the hosts file answers then, and every failed lookup must say why.
    unconfigured: Option<String>,
}

impl Resolver {
    /// Asks `servers` (UDP, TCP when an answer is truncated), or the name servers of
    /// /etc/resolv.conf when there are none; /etc/hosts is consulted first either way.
    pub(crate) fn new(servers: &[SocketAddr], timeout: Duration) -> io::Result<Resolver> {
        let source = if servers.is_empty() {
            hickory_resolver::system_conf::read_system_conf().map_err(|e| e.to_string())
        } else {
            let name_servers = servers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            Ok((
                ResolverConfig::from_name_servers(name_servers),
                ResolverOpts::default(),
            ))
        };
        Resolver::build(source, timeout)
    }

    /// `source` is the name servers and options to use, or why the system's could not be
    /// read.
    fn build(
        source: Result<(ResolverConfig, ResolverOpts), String>,
        timeout: Duration,
    ) -> io::Result<Resolver> {
        let (config, mut options, unconfigured) = match source {
            Ok((config, options)) => (config, options, None),
            // Starting anyway keeps deliveries to literal addresses and to names in
            // /etc/hosts going; the others fail (and are retried) with the reason.
            Err(why) => (
                ResolverConfig::from_name_servers(Vec::new()),
                ResolverOpts::default(),
                Some(format!(
                    "no name servers are configured: /etc/resolv.conf could not be used ({why})"
                )),
            ),
        };
        // Both families, as getaddrinfo gave, so that the connector can fall back from one
        // to the other.
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        options.use_hosts_file = ResolveHosts::Always;
        options.cache_size = CACHE_ENTRIES;
        options.negative_min_ttl = Some(NEGATIVE_TTL.0);
        options.negative_max_ttl = Some(NEGATIVE_TTL.1);
        // One query may use at most half of the lookup's time, so that a lost datagram is
        // sent again before the lookup as a whole gives up.
        options.timeout = options
            .timeout
            .min(timeout / 2)
            .max(Duration::from_millis(100));
        let inner = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(options)
            .build()
            .map_err(io::Error::other)?;
        Ok(Resolver {
            inner,
            timeout,
            unconfigured,
        })
    }

    /// Every address `host` has (from the cache when it is fresh there).
    pub(crate) async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, LookupError> {
        let (message, timed_out) =
            match tokio::time::timeout(self.timeout, self.inner.lookup_ip(host)).await {
                Ok(Ok(found)) => return Ok(found.iter().collect()),
                Ok(Err(e)) => (
                    format!("the DNS lookup of {host} failed: {}", explain(&e)),
                    false,
                ),
                Err(_) => (
                    format!(
                        "the DNS lookup of {host} timed out after {} ms",
                        self.timeout.as_millis()
                    ),
                    true,
                ),
            };
        let message = match &self.unconfigured {
            Some(why) => format!("{message} ({why})"),
            None => message,
        };
        Err(LookupError { message, timed_out })
    }
}

/// hickory describes a negative answer with its whole query structure; an operator needs
/// only which of the two it was.
fn explain(e: &NetError) -> String {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(no))
            if no.response_code == ResponseCode::NXDomain =>
        {
            "no such name (NXDOMAIN)".to_string()
        }
        NetError::Dns(DnsError::NoRecordsFound(no))
            if no.response_code == ResponseCode::NoError =>
        {
            "the name has no address records".to_string()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_usable_resolv_conf_only_the_hosts_file_answers_and_errors_say_why() {
        let resolver = Resolver::build(Err("no such file".into()), Duration::from_secs(2)).unwrap();
        let local = resolver.lookup("localhost").await.unwrap();
        assert!(local.contains(&IpAddr::from([127, 0, 0, 1])), "{local:?}");
        let e = resolver.lookup("example.test").await.unwrap_err();
        assert!(!e.timed_out);
        assert!(
            e.to_string().starts_with("the DNS lookup of example.test failed: ")
                && e.to_string().ends_with(
                    "(no name servers are configured: /etc/resolv.conf could not be used (no such file))"
                ),
            "{e}"
        );
    }
}
