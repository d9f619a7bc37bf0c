//! The limits on every number and duration nightshift takes from outside:
//! job lines, HTTP query parameters, the configuration, and what providers
//! send back (headers and bodies). Each value is checked where it enters,
//! against one of these constants, with an error that names its field; the
//! arithmetic on times further in saturates ([`add`], [`sub`]) so that no
//! value, bounded or not, can panic the daemon.
//!
//! The limits are generous (well above what any provider accepts) but small
//! enough that every sum over a million jobs fits in an `i64` and every
//! instant stays inside chrono's range. README.md lists them.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// `body.max_tokens` / `body.max_completion_tokens`: at most this (and at
/// least 1). The largest output any provider offers is about 128k tokens.
pub const MAX_OUTPUT_TOKENS: u64 = 1_000_000;
/// `body.n`: choices per request (OpenAI's own maximum).
pub const MAX_CHOICES: u64 = 128;
/// Estimated input tokens of one request (about 8 MB of text). The largest
/// context windows are 1–2 M tokens.
pub const MAX_INPUT_TOKENS: u64 = 2_000_000;
/// One job line, in bytes.
pub const MAX_LINE_BYTES: usize = 64 << 20;
/// `custom_id`, in bytes.
pub const MAX_CUSTOM_ID_BYTES: usize = 512;
/// JSON nesting of a job line, the line's own object being level 1 (so the
/// body may nest 127 levels): the limit of common JSON parsers, OpenAI's
/// among them, and of the one that sends the body to the provider.
pub const MAX_JSON_DEPTH: usize = 128;
/// `nightshift.priority`: from -this to this.
pub const MAX_PRIORITY: i64 = 1_000_000_000;
/// `nightshift.max_cost_usd`: at most this.
pub const MAX_JOB_COST_USD: f64 = 1_000_000.0;
/// A deadline (relative, absolute, `completion_window`, `?deadline=`,
/// `daemon.default_deadline`) is at most this far after submission.
pub const MAX_DEADLINE: Duration = Duration::from_secs(365 * 86_400);
/// Every duration in the configuration except `daemon.retention`.
pub const MAX_CONFIG_DURATION: Duration = Duration::from_secs(365 * 86_400);
/// `daemon.retention`.
pub const MAX_RETENTION: Duration = Duration::from_secs(10 * 365 * 86_400);
/// A wait a provider asks for (`retry-after`, `retry-after-ms`, a rate-limit
/// reset, "try again in ..."): a value above this is not believed and is
/// ignored, as an unreadable header is (the official SDKs ignore any
/// `retry-after` above a minute). Daily limits reset within a day.
pub const MAX_PROVIDER_WAIT: Duration = Duration::from_secs(86_400);
/// Tokens a provider reports in `usage` for one request: above this, the
/// value is capped (and logged).
pub const MAX_REPORTED_TOKENS: u64 = 1_000_000_000;
/// Prices in USD per million tokens (list and price windows).
pub const MAX_PRICE_PER_MTOK: f64 = 100_000.0;
/// A provider's markup (100 = +10,000%).
pub const MAX_MARKUP: f64 = 100.0;
/// A price window's multiplier.
pub const MAX_MULTIPLIER: f64 = 1_000.0;
/// A budget cap in USD.
pub const MAX_BUDGET_USD: f64 = 1e12;
/// Requests per minute (provider or model).
pub const MAX_RPM: u64 = 1_000_000_000;
/// Tokens per minute (provider or model).
pub const MAX_TPM: u64 = 1_000_000_000_000;
/// Requests per day (provider or model).
pub const MAX_RPD: u64 = 1_000_000_000_000;
/// Requests in flight (provider or model).
pub const MAX_CONCURRENCY: u64 = 1_000_000;
/// `daemon.max_attempts`.
pub const MAX_ATTEMPTS: u64 = 1_000;
/// Simulated providers' `ms_per_output_token`.
pub const MAX_MS_PER_OUTPUT_TOKEN: f64 = 10_000.0;
/// `http.max_body` and `http.max_upload`, in bytes. An upload is stored as
/// one SQLite value, which cannot exceed 1,000,000,000 bytes.
pub const MAX_HTTP_BODY: u64 = 512 << 20;

/// `t + d`, or the latest instant chrono represents if that overflows.
pub fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `t - d`, or the earliest instant chrono represents if that overflows.
pub fn sub(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `d` in milliseconds as an `i64`, saturating.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A number of seconds from outside (a header) as a [`Duration`], if it is
/// finite, not negative and at most `max`. Never panics (unlike
/// `Duration::from_secs_f64`).
pub fn secs_within(secs: f64, max: Duration) -> Option<Duration> {
    (secs.is_finite() && secs >= 0.0 && secs <= max.as_secs_f64())
        .then(|| Duration::try_from_secs_f64(secs).ok())
        .flatten()
}

/// A limit for error messages, in the syntax that parses back: `365d`, `6h`.
pub fn show(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() == 0 && s > 0 && s.is_multiple_of(86_400) {
        format!("{}d", s / 86_400)
    } else if d.subsec_nanos() == 0 && s > 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else {
        humantime::format_duration(d).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_arithmetic_saturates() {
        let now = Utc::now();
        assert_eq!(add(now, Duration::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(sub(now, Duration::MAX), DateTime::<Utc>::MIN_UTC);
        assert_eq!(
            add(DateTime::<Utc>::MAX_UTC, Duration::from_secs(1)),
            DateTime::<Utc>::MAX_UTC
        );
        assert_eq!(
            add(now, Duration::from_secs(60)),
            now + chrono::Duration::seconds(60)
        );
        assert_eq!(millis(Duration::MAX), i64::MAX);
        assert_eq!(show(MAX_DEADLINE), "365d");
        assert_eq!(show(MAX_PROVIDER_WAIT), "1d");
    }

    #[test]
    fn seconds_from_outside_are_bounded() {
        let day = MAX_PROVIDER_WAIT;
        assert_eq!(secs_within(1.5, day), Some(Duration::from_millis(1500)));
        assert_eq!(secs_within(86_400.0, day), Some(day));
        for bad in [1e20, 1e23, f64::INFINITY, f64::NAN, -1.0, 86_400.5] {
            assert_eq!(secs_within(bad, day), None, "{bad}");
        }
    }
}
