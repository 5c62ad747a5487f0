//! What one HTTP attempt means for its delivery.
//!
//! Only 2xx is success. A receiver that is overloaded or briefly broken (timeouts, connection
//! errors, 5xx, 408, 425, 429) gets the delivery again later; a receiver that answered with
//! another 4xx said no, and asking again would not change its mind, so the delivery is dead.
//! 410 Gone additionally means "stop sending here": the endpoint is disabled. Redirects are
//! not followed, and a 3xx counts as a permanent failure: a webhook URL that moved must be
//! updated by the endpoint's owner, not guessed by the sender.

use std::time::{Duration, SystemTime};

use crate::retry::RetrySchedule;

/// How an attempt ended at the transport level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The receiver answered with this status; `retry_after` is its `Retry-After` header.
    Status {
        code: u16,
        retry_after: Option<String>,
    },
    /// No (complete) answer: timeout, refused connection, DNS or TLS failure, reset.
    Failed { error: String, timed_out: bool },
    /// Not sent at all: the target is forbidden (the SSRF guard). Asking again would be
    /// refused again, so this is final.
    Refused { error: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Delivered,
    Retry,
    Dead,
    /// Dead, and the endpoint asked to be disabled (410 Gone).
    Gone,
}

pub fn classify(response: &Response) -> Class {
    match response {
        Response::Failed { .. } => Class::Retry,
        Response::Refused { .. } => Class::Dead,
        Response::Status { code, .. } => match *code {
            200..=299 => Class::Delivered,
            410 => Class::Gone,
            408 | 425 | 429 | 500..=599 => Class::Retry,
            _ => Class::Dead,
        },
    }
}

/// The longest wait a `Retry-After` header can impose.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Parses `Retry-After`: delay-seconds or an HTTP date (relative to `now`). Dates in the past
/// mean "now"; unparsable values are ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What to record for an attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub class: Class,
    /// For retries that must wait longer than the schedule says (a `Retry-After` asking for
    /// more): the delay to use. `None` lets the schedule decide (it is applied where the
    /// outcome is recorded, so every sender follows the same schedule).
    pub retry_after: Option<Duration>,
}

/// Decides the fate of failed attempt `attempt` (1-based). `Retry-After` is honoured on 429
/// and 503 when it asks for longer than the schedule's next delay, capped at
/// [`MAX_RETRY_AFTER`]; it never extends a schedule that is already exhausted.
pub fn decide(
    response: &Response,
    attempt: u32,
    schedule: &RetrySchedule,
    now: SystemTime,
) -> Decision {
    let class = classify(response);
    let retry_after = match (class, response) {
        (
            Class::Retry,
            Response::Status {
                code: 429 | 503,
                retry_after: Some(v),
            },
        ) => {
            let asked = parse_retry_after(v, now).map(|d| d.min(MAX_RETRY_AFTER));
            let scheduled = schedule
                .delays()
                .get(attempt.saturating_sub(1) as usize)
                .copied();
            match (asked, scheduled) {
                (Some(a), Some(s)) if a > s => Some(a),
                _ => None,
            }
        }
        _ => None,
    };
    Decision { class, retry_after }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Response {
        Response::Status {
            code,
            retry_after: None,
        }
    }

    #[test]
    fn classes() {
        for c in [200, 201, 204, 299] {
            assert_eq!(classify(&status(c)), Class::Delivered, "{c}");
        }
        for c in [408, 425, 429, 500, 502, 503, 504, 599] {
            assert_eq!(classify(&status(c)), Class::Retry, "{c}");
        }
        for c in [100, 301, 302, 304, 400, 401, 403, 404, 409, 422] {
            assert_eq!(classify(&status(c)), Class::Dead, "{c}");
        }
        assert_eq!(classify(&status(410)), Class::Gone);
        let failed = Response::Failed {
            error: "connection refused".into(),
            timed_out: false,
        };
        assert_eq!(classify(&failed), Class::Retry);
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn retry_after_only_lengthens_and_is_capped() {
        let schedule = RetrySchedule::parse("5s, 1m").unwrap();
        let now = SystemTime::now();
        let r = |code, v: &str| Response::Status {
            code,
            retry_after: Some(v.to_string()),
        };
        assert_eq!(
            decide(&r(429, "30"), 1, &schedule, now).retry_after,
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            decide(&r(503, "30"), 2, &schedule, now).retry_after,
            None,
            "schedule is longer"
        );
        assert_eq!(
            decide(&r(500, "30"), 1, &schedule, now).retry_after,
            None,
            "only 429 and 503"
        );
        assert_eq!(
            decide(&r(429, "30"), 3, &schedule, now).retry_after,
            None,
            "schedule exhausted"
        );
        assert_eq!(
            decide(&r(429, "999999999"), 1, &schedule, now).retry_after,
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(decide(&r(429, "30"), 1, &schedule, now).class, Class::Retry);
        assert_eq!(
            decide(&status(200), 1, &schedule, now),
            Decision {
                class: Class::Delivered,
                retry_after: None
            }
        );
    }
}
