//! When a failed delivery is tried again.
//!
//! The schedule is a list of delays, one per failed attempt: after the first failure wait the
//! first delay, and so on; when the list is used up the delivery is dead. Jitter spreads the
//! retries of many deliveries that failed together (a receiver outage) so they do not all
//! return at the same instant.

use std::time::Duration;

/// The Svix schedule: eight attempts over about 28 hours.
pub const DEFAULT_SCHEDULE: &str = "5s, 5m, 30m, 2h, 5h, 10h, 10h";
/// Each delay is moved by up to this fraction, up or down.
pub const JITTER: f64 = 0.2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule {
    delays: Vec<Duration>,
}

impl RetrySchedule {
    /// Parses a comma-separated list of durations such as `"5s, 5m, 30m, 2h"`.
    /// Units: `ms`, `s`, `m`/`min`, `h`, `d`. An empty list means "never retry".
    pub fn parse(text: &str) -> Result<RetrySchedule, String> {
        let mut delays = Vec::new();
        for (i, item) in text.split(',').map(str::trim).enumerate() {
            if item.is_empty() {
                if text.trim().is_empty() {
                    break;
                }
                return Err(format!("entry {} of the retry schedule is empty", i + 1));
            }
            delays.push(
                parse_duration(item).map_err(|e| format!("retry schedule entry {}: {e}", i + 1))?,
            );
        }
        if delays.len() > 100 {
            return Err("a retry schedule has at most 100 entries".into());
        }
        Ok(RetrySchedule { delays })
    }

    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }

    /// How long to wait after failed attempt number `attempt` (1-based), or `None` when the
    /// schedule is exhausted. `jitter_sample` is a uniform sample in `[-1, 1]`; passing it in
    /// keeps this function deterministic for tests.
    pub fn delay_after(&self, attempt: u32, jitter_sample: f64) -> Option<Duration> {
        let base = *self
            .delays
            .get(usize::try_from(attempt).ok()?.checked_sub(1)?)?;
        let factor = 1.0 + JITTER * jitter_sample.clamp(-1.0, 1.0);
        Some(base.mul_f64(factor))
    }
}

impl Default for RetrySchedule {
    fn default() -> Self {
        RetrySchedule::parse(DEFAULT_SCHEDULE).expect("the default schedule parses")
    }
}

/// Parses one duration: a non-negative number followed by a unit.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("\"{text}\" has no unit (use ms, s, m, h or d)"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("\"{text}\" does not start with a number"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" | "sec" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        other => {
            return Err(format!(
                "unknown unit \"{other}\" in \"{text}\" (use ms, s, m, h or d)"
            ))
        }
    };
    if !seconds.is_finite() || seconds > 30.0 * 86400.0 {
        return Err(format!("\"{text}\" is longer than 30 days"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_default_schedule() {
        let s = RetrySchedule::default();
        let secs: Vec<u64> = s.delays().iter().map(Duration::as_secs).collect();
        assert_eq!(secs, vec![5, 300, 1800, 7200, 18000, 36000, 36000]);
    }

    #[test]
    fn delays_follow_the_schedule_and_end() {
        let s = RetrySchedule::parse("100ms, 2s,1.5m").unwrap();
        assert_eq!(s.delay_after(1, 0.0), Some(Duration::from_millis(100)));
        assert_eq!(s.delay_after(2, 0.0), Some(Duration::from_secs(2)));
        assert_eq!(s.delay_after(3, 0.0), Some(Duration::from_secs(90)));
        assert_eq!(s.delay_after(4, 0.0), None);
        assert_eq!(s.delay_after(0, 0.0), None);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let s = RetrySchedule::parse("10s").unwrap();
        assert_eq!(s.delay_after(1, 1.0), Some(Duration::from_secs(12)));
        assert_eq!(s.delay_after(1, -1.0), Some(Duration::from_secs(8)));
        assert_eq!(s.delay_after(1, 7.0), Some(Duration::from_secs(12)));
    }

    #[test]
    fn empty_schedule_never_retries() {
        let s = RetrySchedule::parse("  ").unwrap();
        assert_eq!(s.delay_after(1, 0.0), None);
    }

    #[test]
    fn refuses_bad_entries() {
        assert!(RetrySchedule::parse("5s,,5m")
            .unwrap_err()
            .contains("entry 2"));
        assert!(RetrySchedule::parse("5").unwrap_err().contains("no unit"));
        assert!(RetrySchedule::parse("5 weeks")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(RetrySchedule::parse("-5s").unwrap_err().contains("number"));
        assert!(RetrySchedule::parse("31d").unwrap_err().contains("30 days"));
    }
}
