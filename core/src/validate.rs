//! What the SQL API accepts. Every refusal says what to fix; the extension maps the kind of
//! refusal to a SQLSTATE.

use url::Url;

use crate::ssrf::{self, AllowList};

/// Why an input was refused. The message is written for the person who called the function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A value that parses but is not allowed (SQLSTATE 22023).
    Invalid(String),
    /// A value that does not parse at all (SQLSTATE 22P02).
    Malformed(String),
    /// A value over a size limit (SQLSTATE 54000).
    TooLarge(String),
}

impl Refusal {
    pub fn message(&self) -> &str {
        match self {
            Refusal::Invalid(m) | Refusal::Malformed(m) | Refusal::TooLarge(m) => m,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

pub const MAX_URL_LEN: usize = 2048;
pub const MAX_NAME_LEN: usize = 255;
pub const MAX_HEADERS: usize = 32;
pub const MAX_HEADER_VALUE_LEN: usize = 4096;

/// Headers the extension sets itself, or that belong to the connection rather than the
/// message; an endpoint's extra headers may not name them.
pub const RESERVED_HEADERS: &[&str] = &[
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "user-agent",
];

/// An endpoint URL: absolute http(s), with a host, no credentials, no fragment. Returns the
/// normalized form that is stored.
pub fn endpoint_url(text: &str) -> Result<String, Refusal> {
    if text.len() > MAX_URL_LEN {
        return Err(Refusal::TooLarge(format!(
            "the URL is {} bytes long; the limit is {MAX_URL_LEN}",
            text.len()
        )));
    }
    if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Refusal::Malformed(
            "the URL contains whitespace or control characters".into(),
        ));
    }
    let url = Url::parse(text).map_err(|e| {
        Refusal::Malformed(format!(
            "\"{text}\" is not a valid URL ({e}); expected e.g. https://example.com/webhooks"
        ))
    })?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(Refusal::Invalid(format!(
            "the URL scheme must be http or https, not \"{}\"",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Refusal::Invalid("the URL has no host".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refusal::Invalid(
            "the URL must not contain credentials (user:password@); use the endpoint's headers for authentication"
                .into(),
        ));
    }
    if url.fragment().is_some() {
        return Err(Refusal::Invalid(
            "the URL must not contain a #fragment".into(),
        ));
    }
    Ok(url.to_string())
}

/// Refuses, when the endpoint is saved, a URL whose host is a literal address the SSRF guard
/// would refuse anyway (names are judged by the worker when it resolves them).
pub fn endpoint_target(url: &str, allow: &AllowList) -> Result<(), Refusal> {
    let Ok(url) = Url::parse(url) else {
        return Ok(());
    };
    let ip = match url.host() {
        Some(url::Host::Ipv4(a)) => std::net::IpAddr::V4(a),
        Some(url::Host::Ipv6(a)) => std::net::IpAddr::V6(a),
        _ => return Ok(()),
    };
    ssrf::check(&ip.to_string(), ip, allow).map_err(Refusal::Invalid)
}

fn check_name(what: &str, text: &str) -> Result<(), Refusal> {
    if text.is_empty() {
        return Err(Refusal::Invalid(format!("{what} must not be empty")));
    }
    if text.len() > MAX_NAME_LEN {
        return Err(Refusal::Invalid(format!(
            "{what} is {} bytes long; the limit is {MAX_NAME_LEN}",
            text.len()
        )));
    }
    if text.chars().any(char::is_control) {
        return Err(Refusal::Invalid(format!(
            "{what} must not contain control characters"
        )));
    }
    if text.trim() != text {
        return Err(Refusal::Invalid(format!(
            "{what} must not start or end with whitespace"
        )));
    }
    Ok(())
}

/// An event type such as `order.created`.
pub fn event_type(text: &str) -> Result<(), Refusal> {
    check_name("the event type", text)?;
    if text.contains('*') {
        return Err(Refusal::Invalid(
            "an event type must not contain '*' (wildcards belong in endpoint filters)".into(),
        ));
    }
    Ok(())
}

/// A caller-supplied event id. It becomes the `webhook-id` header and is part of the signed
/// content `id.timestamp.body`, so it may not contain '.' or anything outside a safe set.
pub fn event_id(text: &str) -> Result<(), Refusal> {
    check_name("the event id", text)?;
    if let Some(c) = text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':')))
    {
        return Err(Refusal::Invalid(format!(
            "the event id may contain only letters, digits, '_', '-' and ':', not {c:?}"
        )));
    }
    Ok(())
}

/// Whether an endpoint's event filter (as [`event_filter`] stored it) accepts an event
/// type: no filter accepts everything, as does `*`; `prefix.*` accepts every type that
/// starts with `prefix.`; any other entry must equal the type. The one place this rule
/// lives: enqueue's fan-out calls it through SQL.
pub fn filter_matches<S: AsRef<str>>(filter: Option<&[S]>, event_type: &str) -> bool {
    let Some(filter) = filter else {
        return true;
    };
    filter.iter().map(AsRef::as_ref).any(|p| {
        p == "*"
            || p == event_type
            || p.strip_suffix('*')
                .is_some_and(|prefix| prefix.ends_with('.') && event_type.starts_with(prefix))
    })
}

/// `outbox.dns_servers`: name servers as `ip` or `ip:port` (port 53 by default), separated
/// by commas; empty means the system's (/etc/resolv.conf). IPv6 addresses with a port are
/// written `[ip]:port`.
pub fn name_servers(text: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<std::net::SocketAddr>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                .map_err(|_| format!("{s:?} is not an address (ip or ip:port)"))
        })
        .collect()
}

/// The most databases `outbox.database` may list: each gets its own workers, and their
/// latches live in a fixed array of shared memory sized by it.
pub const MAX_DATABASES: usize = 16;

/// `outbox.database`: the databases the workers serve, separated by commas, each name taken
/// as written (case kept, spaces around it dropped; a name with a comma cannot be listed).
/// At least one, no name twice, none longer than PostgreSQL's 63 bytes.
pub fn databases(text: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> = text.split(',').map(|s| s.trim().to_string()).collect();
    if names.iter().all(String::is_empty) {
        return Err("list at least one database, e.g. 'postgres' or 'app, billing'".into());
    }
    if let Some(i) = names.iter().position(String::is_empty) {
        return Err(format!(
            "database {} of the list is empty (a stray comma?)",
            i + 1
        ));
    }
    if let Some(long) = names.iter().find(|n| n.len() > 63) {
        return Err(format!(
            "{long:?} is longer than a database name can be (63 bytes)"
        ));
    }
    for (i, name) in names.iter().enumerate() {
        if let Some(first) = names[..i].iter().position(|n| n == name) {
            return Err(format!(
                "{name:?} is listed twice (as database {} and {})",
                first + 1,
                i + 1
            ));
        }
    }
    if names.len() > MAX_DATABASES {
        return Err(format!(
            "{} databases are listed; at most {MAX_DATABASES} can be served",
            names.len()
        ));
    }
    Ok(names)
}

/// A tenant key.
pub fn tenant_id(text: &str) -> Result<(), Refusal> {
    check_name("the tenant id", text)
}

/// An endpoint's event filter. Entries are exact types, `prefix.*`, or `*`. Returns `None`
/// when the filter accepts everything (so it is stored as NULL).
pub fn event_filter(patterns: &[Option<String>]) -> Result<Option<Vec<String>>, Refusal> {
    if patterns.is_empty() {
        return Err(Refusal::Invalid(
            "an empty event_types filter would match nothing; pass NULL (or '{*}') to receive every event".into(),
        ));
    }
    let mut out = Vec::with_capacity(patterns.len());
    for p in patterns {
        let p = p
            .as_deref()
            .ok_or_else(|| Refusal::Invalid("event_types must not contain NULL".into()))?;
        if p == "*" {
            return Ok(None);
        }
        match p.strip_suffix(".*") {
            Some(prefix) => event_type(prefix).map_err(|_| {
                Refusal::Invalid(format!(
                    "\"{p}\" is not a valid filter: use an exact type, 'prefix.*' or '*'"
                ))
            })?,
            None => event_type(p).map_err(|e| {
                Refusal::Invalid(format!(
                    "\"{p}\" is not a valid filter ({e}); use an exact type, 'prefix.*' or '*'"
                ))
            })?,
        }
        if !out.iter().any(|q: &String| q == p) {
            out.push(p.to_string());
        }
    }
    Ok(Some(out))
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// An endpoint's extra headers, given as a JSON object of strings.
pub fn headers(value: &serde_json::Value) -> Result<(), Refusal> {
    let map = value.as_object().ok_or_else(|| {
        Refusal::Invalid(
            r#"headers must be a JSON object such as {"Authorization": "Bearer …"}"#.into(),
        )
    })?;
    if map.len() > MAX_HEADERS {
        return Err(Refusal::TooLarge(format!(
            "{} headers given; the limit is {MAX_HEADERS}",
            map.len()
        )));
    }
    for (name, v) in map {
        if name.is_empty() || !name.chars().all(is_token_char) {
            return Err(Refusal::Invalid(format!(
                "{name:?} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)"
            )));
        }
        let lower = name.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("proxy-") {
            return Err(Refusal::Invalid(format!(
                "the header \"{name}\" is set by the extension or the connection and cannot be overridden"
            )));
        }
        let v = v.as_str().ok_or_else(|| {
            Refusal::Invalid(format!(
                "the value of header \"{name}\" must be a JSON string"
            ))
        })?;
        if v.len() > MAX_HEADER_VALUE_LEN {
            return Err(Refusal::TooLarge(format!(
                "the value of header \"{name}\" is {} bytes; the limit is {MAX_HEADER_VALUE_LEN}",
                v.len()
            )));
        }
        if v.chars().any(|c| c.is_control() && c != '\t') {
            return Err(Refusal::Invalid(format!(
                "the value of header \"{name}\" contains control characters (CR, LF, NUL, …)"
            )));
        }
    }
    Ok(())
}

/// The size of an event's payload in bytes against the configured limit.
pub fn payload_size(bytes: usize, limit: usize) -> Result<(), Refusal> {
    if bytes > limit {
        return Err(Refusal::TooLarge(format!(
            "the payload is {bytes} bytes; the limit is {limit} bytes (GUC outbox.max_payload_size)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn filters_match_exact_types_prefixes_and_everything() {
        let f = |v: &[&str], t: &str| filter_matches(Some(v), t);
        assert!(filter_matches::<&str>(None, "anything"));
        assert!(f(&["*"], "a.b"));
        assert!(f(&["order.created"], "order.created"));
        assert!(!f(&["order.created"], "order.deleted"));
        assert!(f(&["order.*"], "order.created"));
        assert!(f(&["order.*"], "order.line.added"));
        assert!(!f(&["order.*"], "order"));
        assert!(!f(&["order.*"], "orders.created"));
        assert!(f(&["invoice.paid", "order.*"], "order.x"));
        assert!(!f(&[], "a"));
    }

    #[test]
    fn databases_are_a_list_of_distinct_names_as_written() {
        assert_eq!(databases("postgres").unwrap(), vec!["postgres"]);
        assert_eq!(databases(" app , Billing").unwrap(), vec!["app", "Billing"]);
        assert!(databases("").unwrap_err().contains("at least one"));
        assert!(databases("app,,billing")
            .unwrap_err()
            .contains("database 2"));
        assert!(databases("app, billing, app")
            .unwrap_err()
            .contains("as database 1 and 3"));
        assert!(databases(&"x".repeat(64)).unwrap_err().contains("63 bytes"));
        let many: Vec<String> = (0..=MAX_DATABASES).map(|i| format!("db{i}")).collect();
        assert!(databases(&many.join(",")).unwrap_err().contains("at most"));
        assert_eq!(
            databases(&many[..MAX_DATABASES].join(",")).unwrap().len(),
            MAX_DATABASES
        );
    }

    #[test]
    fn name_servers_are_addresses_with_an_optional_port() {
        assert_eq!(name_servers(" ").unwrap(), vec![]);
        assert_eq!(
            name_servers("10.0.0.2, 127.0.0.1:5353,[::1]:53").unwrap(),
            vec![
                "10.0.0.2:53".parse().unwrap(),
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert!(name_servers("dns.example.com").is_err());
        assert!(name_servers("10.0.0.2:99999").is_err());
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn urls() {
        assert_eq!(
            endpoint_url("https://Example.com/hook").unwrap(),
            "https://example.com/hook"
        );
        assert_eq!(
            endpoint_url("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080/"
        );
        assert!(matches!(
            endpoint_url("not a url"),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            endpoint_url("example.com/x"),
            Err(Refusal::Malformed(_))
        ));
        assert!(
            matches!(endpoint_url("ftp://example.com/x"), Err(Refusal::Invalid(m)) if m.contains("ftp"))
        );
        assert!(
            matches!(endpoint_url("https://u:p@example.com/"), Err(Refusal::Invalid(m)) if m.contains("credentials"))
        );
        assert!(matches!(
            endpoint_url("https://example.com/#x"),
            Err(Refusal::Invalid(_))
        ));
        assert!(matches!(
            endpoint_url("https://example.com/\r\nX: y"),
            Err(Refusal::Malformed(_))
        ));
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(matches!(endpoint_url(&long), Err(Refusal::TooLarge(_))));
    }

    #[test]
    fn literal_targets() {
        let none = AllowList::default();
        assert!(endpoint_target("https://example.com/x", &none).is_ok());
        assert!(endpoint_target("https://93.184.216.34/x", &none).is_ok());
        assert!(
            matches!(endpoint_target("http://127.0.0.1:8080/x", &none), Err(Refusal::Invalid(m)) if m.contains("SSRF"))
        );
        assert!(endpoint_target("http://[::1]/x", &none).is_err());
        assert!(endpoint_target("http://169.254.169.254/latest/meta-data", &none).is_err());
        assert!(endpoint_target(
            "http://127.0.0.1:8080/x",
            &AllowList::parse("127.0.0.1").unwrap()
        )
        .is_ok());
    }

    #[test]
    fn event_types_and_ids() {
        assert!(event_type("order.created").is_ok());
        assert!(event_type("").is_err());
        assert!(event_type("a\nb").is_err());
        assert!(event_type(" x").is_err());
        assert!(event_type("order.*").is_err());
        assert!(event_type(&"x".repeat(256)).is_err());
        assert!(event_type(&"x".repeat(255)).is_ok());
        assert!(event_id("msg_abc-1:2").is_ok());
        assert!(event_id("msg.1").is_err());
        assert!(event_id("").is_err());
        assert!(tenant_id("acme").is_ok());
        assert!(tenant_id("").is_err());
    }

    #[test]
    fn filters() {
        let s = |v: &[&str]| v.iter().map(|x| Some(x.to_string())).collect::<Vec<_>>();
        assert_eq!(
            event_filter(&s(&["order.*", "user.created", "order.*"])).unwrap(),
            Some(vec!["order.*".to_string(), "user.created".to_string()])
        );
        assert_eq!(event_filter(&s(&["order.created", "*"])).unwrap(), None);
        assert!(event_filter(&[]).is_err());
        assert!(event_filter(&[None]).is_err());
        assert!(event_filter(&s(&["or*der"])).is_err());
        assert!(event_filter(&s(&[".*"])).is_err());
        assert!(event_filter(&s(&[""])).is_err());
    }

    #[test]
    fn header_rules() {
        assert!(headers(&json!({"Authorization": "Bearer x", "X-Env": "prod"})).is_ok());
        assert!(headers(&json!([])).is_err());
        assert!(headers(&json!({"Webhook-Signature": "v1,forged"})).is_err());
        assert!(headers(&json!({"Host": "evil"})).is_err());
        assert!(headers(&json!({"Proxy-Authorization": "x"})).is_err());
        assert!(headers(&json!({"Bad Name": "x"})).is_err());
        assert!(headers(&json!({"X-A": "a\r\nX-B: b"})).is_err());
        assert!(headers(&json!({"X-A": 1})).is_err());
        let many: serde_json::Map<_, _> = (0..33).map(|i| (format!("x-{i}"), json!("v"))).collect();
        assert!(matches!(
            headers(&serde_json::Value::Object(many)),
            Err(Refusal::TooLarge(_))
        ));
    }

    #[test]
    fn payload_limit() {
        assert!(payload_size(10, 10).is_ok());
        assert!(matches!(payload_size(11, 10), Err(Refusal::TooLarge(_))));
    }
}
