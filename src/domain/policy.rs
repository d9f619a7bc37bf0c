//! What the operator configured about money and patience: spending caps
//! ([`Budget`] over a [`Period`]) and how failed requests are retried
//! ([`RetryPolicy`]). Plain values; the accounting that uses them is in
//! `dispatch::budget` and `dispatch::reliability`.

use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};

use crate::domain::pricing::ProviderId;

/// The period a budget renews over (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    /// The start of the period containing `t`.
    pub fn start(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let d = t.date_naive();
        let first = match self {
            Period::Day => d,
            Period::Month => NaiveDate::from_ymd_opt(d.year(), d.month(), 1).expect("valid date"),
        };
        Utc.from_utc_datetime(&first.and_hms_opt(0, 0, 0).expect("midnight"))
    }

    /// The start of the next period after the one containing `t`.
    pub fn next_start(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let s = self.start(t);
        match self {
            Period::Day => s + chrono::Duration::days(1),
            Period::Month => {
                let (y, m) = if s.month() == 12 {
                    (s.year() + 1, 1)
                } else {
                    (s.year(), s.month() + 1)
                };
                Utc.from_utc_datetime(
                    &NaiveDate::from_ymd_opt(y, m, 1)
                        .expect("valid date")
                        .and_hms_opt(0, 0, 0)
                        .expect("midnight"),
                )
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "daily",
            Period::Month => "monthly",
        }
    }
}

/// A cap on spend per period, for one provider or (`None`) all of them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub provider: Option<ProviderId>,
    pub period: Period,
    pub cap_usd: f64,
}

impl Budget {
    pub fn applies_to(&self, provider: ProviderId) -> bool {
        self.provider.is_none_or(|p| p == provider)
    }
}

/// How retries back off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts after which a retryable failure becomes final.
    pub max_attempts: u32,
    /// The first retry waits up to this long; each further one twice as long...
    pub base: Duration,
    /// ... up to this.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 8,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff with full jitter: uniform in [0, min(cap,
    /// base·2^(n-1))] for the n-th retry. `unit` is a draw in [0, 1).
    pub fn backoff(&self, retry: u32, unit: f64) -> Duration {
        let ceiling = (self.base.as_secs_f64() * 2f64.powi(retry.saturating_sub(1).min(30) as i32))
            .min(self.cap.as_secs_f64());
        Duration::try_from_secs_f64((ceiling * unit.clamp(0.0, 1.0)).max(0.01)).unwrap_or(self.cap)
    }
}
