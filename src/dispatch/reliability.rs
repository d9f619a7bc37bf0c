//! Reliability as pure functions: what a provider's answer means (retry,
//! fail, disable the provider, pause it), how long to back off, and each
//! provider's health (a circuit breaker with half-open probes).
//!
//! The one place that decides retry vs. fail is [`classify`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::domain::bounds::{self, MAX_PROVIDER_WAIT, secs_within};

/// Tokens the provider reported, cached input included: what it bills.
pub type Usage = crate::domain::pricing::Billed;

/// What came back.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A 2xx with usage.
    Success {
        status: u16,
        request_id: Option<String>,
        body: String,
        usage: Usage,
        signals: Signals,
    },
    /// An HTTP answer that is not a success; kept verbatim.
    HttpError {
        status: u16,
        request_id: Option<String>,
        body: String,
        signals: Signals,
    },
    /// No usable HTTP answer (connection failure, timeout, malformed body).
    NoAnswer { code: &'static str, message: String },
}

/// What a provider's headers said about its limits and when to come back.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Signals {
    /// `retry-after-ms`, else `retry-after` (seconds or an HTTP date).
    pub retry_after: Option<Duration>,
    pub limit_requests: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_tokens: Option<Duration>,
}

impl Signals {
    /// How long the provider says it will refuse requests, if it does: an
    /// explicit Retry-After, or a limit at zero until its reset.
    pub fn pause(&self) -> Option<Duration> {
        let requests = (self.remaining_requests == Some(0))
            .then_some(self.reset_requests)
            .flatten();
        let tokens = (self.remaining_tokens == Some(0))
            .then_some(self.reset_tokens)
            .flatten();
        [self.retry_after, requests, tokens]
            .into_iter()
            .flatten()
            .max()
    }
}

/// Reads rate-limit and retry headers: OpenAI's `x-ratelimit-*` (Go-style
/// durations), Anthropic's `anthropic-ratelimit-*` (RFC 3339 instants) and
/// `retry-after-ms` / `retry-after`. `get` returns a header's value.
///
/// Every wait is at most [`MAX_PROVIDER_WAIT`]: a header asking for longer
/// (`retry-after: 1e20`) is not believed and is treated as absent, like an
/// unreadable one. No header value can panic.
pub fn parse_signals<'a>(get: impl Fn(&str) -> Option<&'a str>, now: DateTime<Utc>) -> Signals {
    let num = |name: &str| get(name).and_then(|v| v.trim().parse::<u64>().ok());
    let until = |name: &str| {
        get(name)
            .and_then(|v| DateTime::parse_from_rfc3339(v.trim()).ok())
            .and_then(|t| wait_until(t.with_timezone(&Utc), now))
    };
    let retry_after = get("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(|ms| secs_within(ms / 1000.0, MAX_PROVIDER_WAIT))
        .or_else(|| get("retry-after").and_then(|v| parse_retry_after(v, now)));
    let anthropic_tokens = tightest_anthropic_tokens(num, until);
    Signals {
        retry_after,
        limit_requests: num("x-ratelimit-limit-requests")
            .or_else(|| num("anthropic-ratelimit-requests-limit")),
        remaining_requests: num("x-ratelimit-remaining-requests")
            .or_else(|| num("anthropic-ratelimit-requests-remaining")),
        reset_requests: get("x-ratelimit-reset-requests")
            .and_then(parse_go_duration)
            .or_else(|| until("anthropic-ratelimit-requests-reset")),
        limit_tokens: num("x-ratelimit-limit-tokens").or(anthropic_tokens.0),
        remaining_tokens: num("x-ratelimit-remaining-tokens").or(anthropic_tokens.1),
        reset_tokens: get("x-ratelimit-reset-tokens")
            .and_then(parse_go_duration)
            .or(anthropic_tokens.2),
    }
}

/// Anthropic's token limits come as three: `tokens` (the most restrictive
/// of the others), `input-tokens` and `output-tokens`, each with its
/// `limit`, `remaining` and `reset`. The one with the fewest tokens
/// remaining is the one that matters (a tie: the later reset).
fn tightest_anthropic_tokens(
    num: impl Fn(&str) -> Option<u64>,
    until: impl Fn(&str) -> Option<Duration>,
) -> (Option<u64>, Option<u64>, Option<Duration>) {
    let mut best: Option<(Option<u64>, u64, Option<Duration>)> = None;
    for kind in ["tokens", "input-tokens", "output-tokens"] {
        let Some(remaining) = num(&format!("anthropic-ratelimit-{kind}-remaining")) else {
            continue;
        };
        let limit = num(&format!("anthropic-ratelimit-{kind}-limit"));
        let reset = until(&format!("anthropic-ratelimit-{kind}-reset"));
        let tighter = best.as_ref().is_none_or(|(_, r, t)| {
            remaining < *r || (remaining == *r && reset.unwrap_or_default() > t.unwrap_or_default())
        });
        if tighter {
            best = Some((limit, remaining, reset));
        }
    }
    match best {
        Some((limit, remaining, reset)) => (limit, Some(remaining), reset),
        None => (
            num("anthropic-ratelimit-tokens-limit"),
            None,
            until("anthropic-ratelimit-tokens-reset"),
        ),
    }
}

/// The wait from `now` until `t` (zero if `t` has passed), if it is at most
/// [`MAX_PROVIDER_WAIT`].
fn wait_until(t: DateTime<Utc>, now: DateTime<Utc>) -> Option<Duration> {
    let d = (t - now).to_std().unwrap_or(Duration::ZERO);
    (d <= MAX_PROVIDER_WAIT).then_some(d)
}

/// `Retry-After`: delay-seconds (possibly fractional) or an HTTP date; at
/// most [`MAX_PROVIDER_WAIT`], else `None`.
pub fn parse_retry_after(v: &str, now: DateTime<Utc>) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return secs_within(secs, MAX_PROVIDER_WAIT);
    }
    DateTime::parse_from_rfc2822(v)
        .ok()
        .and_then(|t| wait_until(t.with_timezone(&Utc), now))
}

/// Go's `time.Duration` text as OpenAI sends it: `1s`, `6m0s`, `12ms`,
/// `2m59.56s`, `1h2m3s`, `500us`. Hand-written: no crate parses this dialect
/// (humantime rejects fractions and concatenated units like `6m0s.5`).
/// At most [`MAX_PROVIDER_WAIT`], else `None`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0.0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    secs_within(total, MAX_PROVIDER_WAIT)
}

/// OpenAI's 429 bodies say "Please try again in 3.89s" (or "in 120ms").
fn try_again_in(body: &Value) -> Option<Duration> {
    let message = body["error"]["message"].as_str()?;
    let i = message.find("try again in ")? + "try again in ".len();
    let word: String = message[i..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    parse_go_duration(word.trim_end_matches(['.', ',']))
}

/// What to do after a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Succeeded,
    /// Permanent for this job (400, 404, 422, ...): fail it with the answer.
    FailJob,
    /// Worth another attempt, here or elsewhere. `pause` stops the whole
    /// provider for that long (429, 503 with Retry-After, limit at zero).
    Retry {
        pause: Option<Duration>,
    },
    /// The provider refuses us as a customer (401, 403, insufficient_quota):
    /// disable it until the configuration is reloaded; the job goes elsewhere.
    DisableProvider {
        reason: String,
    },
}

/// Whether a flex request was refused for want of flex capacity: OpenAI's
/// `429` with error code `resource_unavailable` ("Resource Unavailable").
/// Not the account's rate limit and not billed: it must neither pause the
/// provider (its standard channel keeps its capacity) nor count toward
/// its circuit breaker; the job waits for flex or goes to the standard
/// channel, as its deadline allows ([`FlexRefusal::of`](crate::dispatch::decide::FlexRefusal::of)).
pub fn is_flex_refusal(outcome: &Outcome) -> bool {
    let Outcome::HttpError {
        status: 429, body, ..
    } = outcome
    else {
        return false;
    };
    let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let field = |f: &str| {
        parsed["error"][f]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    field("code") == "resource_unavailable"
        || field("type") == "resource_unavailable"
        || field("message").contains("resource unavailable")
}

/// The one place that decides retry vs. fail.
pub fn classify(outcome: &Outcome) -> Verdict {
    match outcome {
        Outcome::Success { signals, .. } => {
            // A success that leaves a limit at zero still pauses the provider.
            let _ = signals;
            Verdict::Succeeded
        }
        Outcome::HttpError {
            status,
            body,
            signals,
            ..
        } => {
            let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
            let code = parsed["error"]["code"].as_str().unwrap_or_default();
            let kind = parsed["error"]["type"].as_str().unwrap_or_default();
            let message = parsed["error"]["message"].as_str().unwrap_or_default();
            // Anthropic's errors: {"type": "error", "error": {"type", "message"}}.
            let anthropic = parsed["type"] == "error";
            match status {
                // A spend limit or exhausted credit balance (a 429 without
                // retry-after, or a 400): no retry can succeed until someone
                // pays; the provider is disabled as for insufficient_quota.
                429 | 400
                    if anthropic
                        && matches!(kind, "rate_limit_error" | "invalid_request_error")
                        && (*status == 400 || signals.retry_after.is_none())
                        && crate::domain::anthropic::is_spend_limit(message) =>
                {
                    Verdict::DisableProvider {
                        reason: format!("HTTP {status} {kind} (spend limit): {message}"),
                    }
                }
                429 if code == "insufficient_quota" || kind == "insufficient_quota" => {
                    Verdict::DisableProvider {
                        reason: format!(
                            "HTTP 429 insufficient_quota: {}",
                            parsed["error"]["message"].as_str().unwrap_or(body)
                        ),
                    }
                }
                429 => Verdict::Retry {
                    pause: Some(
                        signals
                            .pause()
                            .or_else(|| try_again_in(&parsed))
                            .unwrap_or(Duration::from_secs(1)),
                    ),
                },
                401 | 403 => Verdict::DisableProvider {
                    reason: format!(
                        "HTTP {status}: {}",
                        parsed["error"]["message"].as_str().unwrap_or(body)
                    ),
                },
                408 | 409 => Verdict::Retry { pause: None },
                503 | 529 => Verdict::Retry {
                    pause: signals.retry_after,
                },
                500..=599 => Verdict::Retry {
                    pause: signals.retry_after,
                },
                _ => Verdict::FailJob,
            }
        }
        Outcome::NoAnswer { code, .. } => match *code {
            "timeout" | "connection_failed" | "truncated_response" | "malformed_response" => {
                Verdict::Retry { pause: None }
            }
            _ => Verdict::FailJob,
        },
    }
}

pub use crate::domain::policy::RetryPolicy;

/// When a failed attempt runs again, or `None` if it is final: the one
/// place that decides retry vs. fail after [`classify`]. `attempts` counts
/// this one; `draw` is a deterministic draw in [0, 1) for the jitter
/// ([`unit_draw`]). A pause the provider asked for is honoured (with at most
/// a second of jitter on top); a disabled provider's job goes straight back
/// to the queue for another provider; no retry starts after the deadline.
pub fn next_attempt(
    verdict: &Verdict,
    attempts: u32,
    policy: &RetryPolicy,
    deadline: DateTime<Utc>,
    now: DateTime<Utc>,
    draw: f64,
) -> Option<DateTime<Utc>> {
    let at = match verdict {
        Verdict::Retry { pause } => {
            let jitter = policy.backoff(attempts, draw);
            let wait = pause.map_or(jitter, |p| {
                p.min(MAX_PROVIDER_WAIT)
                    .max(jitter.min(Duration::from_secs(1)))
            });
            now.checked_add_signed(chrono::Duration::from_std(wait).ok()?)?
        }
        Verdict::DisableProvider { .. } => now,
        Verdict::Succeeded | Verdict::FailJob => return None,
    };
    (attempts < policy.max_attempts && at < deadline).then_some(at)
}

/// A deterministic draw in [0, 1) per (key, attempt): backoff jitter in the
/// daemon (key = job id) and simulated failures in the simulator.
///
/// The mix is MurmurHash3's full 64-bit finalizer. Its first half alone
/// (one multiply) left the draws of one key's successive attempts
/// correlated: in the flaky scenario 33 of 4,000 jobs drew a failure on all
/// 8 attempts of a provider failing 25% of requests, against 0.06 expected.
pub fn unit_draw(key: u64, attempt: u32) -> f64 {
    let mut x = key ^ (u64::from(attempt) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// A provider's health: paused (the provider asked us to wait), disabled
/// (it refused our key), and a circuit breaker over consecutive failures.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub paused_until: Option<DateTime<Utc>>,
    /// Why `paused_until` is set: what asked for the pause that ends last.
    pub pause_cause: Option<PauseCause>,
    pub disabled: Option<String>,
    pub circuit: Circuit,
    consecutive_failures: u32,
}

/// What paused a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseCause {
    /// It refused a request and asked to wait: `Retry-After` (or a limit
    /// at zero) on a 429 or 5xx answer.
    RetryAfter,
    /// A successful answer's headers left a rate limit at zero until its reset.
    LimitReset,
}

impl PauseCause {
    /// The name the API and explanations use.
    pub fn as_str(self) -> &'static str {
        match self {
            PauseCause::RetryAfter => "retry_after",
            PauseCause::LimitReset => "limit_reset",
        }
    }
}

/// The circuit breaker's state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Circuit {
    /// Requests flow.
    Closed,
    /// No requests until `until`, then one probe. `since`: when it opened;
    /// answers to requests sent before then say nothing about now.
    Open {
        until: DateTime<Utc>,
        cooldown: Duration,
        since: DateTime<Utc>,
    },
    /// One probe request is in flight; its outcome closes or re-opens.
    HalfOpen {
        cooldown: Duration,
        since: DateTime<Utc>,
    },
}

/// Consecutive failures that open the circuit.
pub const FAILURES_TO_OPEN: u32 = 5;
/// A success rate under which a provider whose circuit probe failed is
/// planned out entirely while the circuit is open
/// ([`Health::plan_excluded_until`]).
pub const DEAD_BELOW: f64 = 0.5;
const FIRST_COOLDOWN: Duration = Duration::from_secs(10);
/// The cooldown after five failed probes in a row (10 s doubled five times):
/// only from then on may a provider be planned out entirely. After one
/// failed probe it was not enough: a provider failing a quarter of its
/// requests fails a probe one time in four, its recent success rate dips
/// under [`DEAD_BELOW`] now and then, and the whole remaining share of the
/// cheap provider went to the dear one (issue 10's `flaky` scenario: 968
/// jobs in its last ten minutes; after three failed probes, still 937 jobs
/// once in a run). Five failed probes in a row happen to it once in 1,024
/// openings; a dead provider reaches them in about five minutes (10 + 20 +
/// 40 + 80 + 160 s), and until then is planned only from its next probe —
/// unless it fails nearly everything ([`DEAD_EARLY_BELOW`]).
const DEAD_AFTER_COOLDOWN: Duration = Duration::from_secs(320);
/// A recent success rate under which one failed probe is enough to plan a
/// provider out entirely: 21 failures in a row from full success (0.95²¹ ≈
/// 0.34), which a provider failing a quarter of its requests shows about
/// once in 10⁵ windows of 20 answers.
const DEAD_EARLY_BELOW: f64 = 0.35;
const MAX_COOLDOWN: Duration = Duration::from_secs(600);

impl Default for Health {
    fn default() -> Health {
        Health {
            paused_until: None,
            pause_cause: None,
            disabled: None,
            circuit: Circuit::Closed,
            consecutive_failures: 0,
        }
    }
}

impl Health {
    /// When requests may flow again: `None` if never (disabled), `now` if
    /// they flow now.
    pub fn available_from(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.disabled.is_some() {
            return None;
        }
        let mut t = now;
        if let Some(p) = self.paused_until {
            t = t.max(p);
        }
        match self.circuit {
            Circuit::Open { until, .. } => t = t.max(until),
            // One probe is out; nothing else until it returns (soon).
            Circuit::HalfOpen { .. } => t = t.max(bounds::add(now, Duration::from_secs(1))),
            Circuit::Closed => {}
        }
        Some(t)
    }

    /// For planning: until when the provider gets no work (`MAX_UTC` =
    /// indefinitely), or `None` if it may be planned now. `success_rate`
    /// is the provider's recent fraction of requests that succeed (the last
    /// ~20 answers, [`crate::dispatch::decide::SuccessRate::recent`]).
    ///
    /// An open circuit plans nothing there until its probe is due; the
    /// provider's capacity after that is discounted by its success rate
    /// (the planner's extra attempts). Planning it out indefinitely whenever
    /// the circuit opens would hand its whole share to dearer providers each
    /// time five failures happen in a row — on a provider failing a quarter
    /// of its requests that is every few hundred requests (issue 10's flaky
    /// scenario: 306 of 4,000 jobs on the cheap provider, against ~3,000
    /// that fit). But a provider whose probe failed and that fails nearly
    /// everything (recent success under [`DEAD_EARLY_BELOW`]), or whose last
    /// five probes failed ([`DEAD_AFTER_COOLDOWN`]) and that fails most of
    /// what it is sent (under [`DEAD_BELOW`]), is planned out entirely
    /// until its next probe is due (re-planned then,
    /// [`Health::probe_due`]): one that keeps failing must not hold jobs
    /// back on the hope it recovers.
    pub fn plan_excluded_until(
        &self,
        now: DateTime<Utc>,
        success_rate: f64,
    ) -> Option<DateTime<Utc>> {
        if self.disabled.is_some() {
            return Some(DateTime::<Utc>::MAX_UTC);
        }
        let paused = self.paused_until.filter(|p| *p > now);
        match self.circuit {
            Circuit::Open {
                cooldown, until, ..
            } if now < until => {
                let failing_all = cooldown > FIRST_COOLDOWN && success_rate < DEAD_EARLY_BELOW;
                let failing_most = cooldown >= DEAD_AFTER_COOLDOWN && success_rate < DEAD_BELOW;
                if failing_all || failing_most {
                    Some(DateTime::<Utc>::MAX_UTC)
                } else {
                    Some(paused.map_or(until, |p| p.max(until)))
                }
            }
            _ => paused,
        }
    }

    /// When an open circuit's probe is due (re-plan then to include it).
    pub fn probe_due(&self) -> Option<DateTime<Utc>> {
        match self.circuit {
            Circuit::Open { until, .. } if self.disabled.is_none() => Some(until),
            _ => None,
        }
    }

    /// Whether a request may be sent now; takes the half-open probe slot.
    pub fn admit(&mut self, now: DateTime<Utc>) -> bool {
        if self.disabled.is_some() || self.paused_until.is_some_and(|p| now < p) {
            return false;
        }
        match self.circuit {
            Circuit::Closed => true,
            Circuit::Open {
                until,
                cooldown,
                since,
            } if now >= until => {
                self.circuit = Circuit::HalfOpen { cooldown, since };
                true
            }
            Circuit::Open { .. } | Circuit::HalfOpen { .. } => false,
        }
    }

    /// Gives back a half-open probe slot taken by [`Health::admit`] for a
    /// request that was never sent: the probe is due again now.
    pub fn abandon_probe(&mut self, now: DateTime<Utc>) {
        if let Circuit::HalfOpen { cooldown, since } = self.circuit {
            self.circuit = Circuit::Open {
                until: now,
                cooldown,
                since,
            };
        }
    }

    /// Records the verdict of a request sent just now (see
    /// [`Health::record_sent`]).
    pub fn record(&mut self, verdict: &Verdict, now: DateTime<Utc>) -> bool {
        self.record_sent(verdict, now, now)
    }

    /// Records the verdict of a request sent at `sent_at`. Returns true if
    /// availability changed (the plan should be redone).
    ///
    /// An answer to a request sent before the circuit opened neither closes
    /// it nor counts towards it: with many requests in flight, the answers
    /// that were already on their way would otherwise close a fresh circuit
    /// within milliseconds. Only the probe decides. A pause or a refused key
    /// is news whenever the request was sent, and is applied.
    pub fn record_sent(
        &mut self,
        verdict: &Verdict,
        sent_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> bool {
        let before = (self.paused_until, self.disabled.clone(), self.circuit);
        let stale = match self.circuit {
            Circuit::Open { since, .. } | Circuit::HalfOpen { since, .. } => sent_at < since,
            Circuit::Closed => false,
        };
        match verdict {
            Verdict::Succeeded | Verdict::FailJob if stale => {}
            Verdict::Retry { pause: None } if stale => {}
            Verdict::Succeeded | Verdict::FailJob => {
                // A permanent error is the job's fault, not the provider's.
                self.consecutive_failures = 0;
                self.circuit = Circuit::Closed;
            }
            Verdict::DisableProvider { reason } => self.disabled = Some(reason.clone()),
            Verdict::Retry { pause } => {
                if let Some(p) = pause {
                    let until = bounds::add(now, (*p).min(MAX_PROVIDER_WAIT));
                    if self.paused_until.is_none_or(|u| until >= u) {
                        self.paused_until = Some(until);
                        self.pause_cause = Some(PauseCause::RetryAfter);
                    }
                } else {
                    // Only failures the provider did not announce count towards the breaker.
                    self.consecutive_failures += 1;
                    let reopen = |cooldown: Duration| Circuit::Open {
                        until: bounds::add(now, cooldown),
                        cooldown,
                        since: now,
                    };
                    self.circuit = match self.circuit {
                        Circuit::HalfOpen { cooldown, .. } => {
                            reopen((cooldown * 2).min(MAX_COOLDOWN))
                        }
                        Circuit::Closed if self.consecutive_failures >= FAILURES_TO_OPEN => {
                            reopen(FIRST_COOLDOWN)
                        }
                        other => other,
                    };
                }
            }
        }
        if self.paused_until.is_some_and(|p| p <= now) {
            self.paused_until = None;
            self.pause_cause = None;
        }
        before != (self.paused_until, self.disabled.clone(), self.circuit)
    }

    /// Pauses the provider for `d` (a limit at zero until its reset).
    /// Returns true if that extends the current pause.
    pub fn pause(&mut self, now: DateTime<Utc>, d: Duration) -> bool {
        let until = bounds::add(now, d.min(MAX_PROVIDER_WAIT));
        if self.paused_until.is_some_and(|p| p >= until) {
            return false;
        }
        self.paused_until = Some(until);
        self.pause_cause = Some(PauseCause::LimitReset);
        true
    }

    /// Failures in a row that counted towards the circuit breaker.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// A short description for logs and the API.
    pub fn describe(&self, now: DateTime<Utc>) -> String {
        if let Some(reason) = &self.disabled {
            return format!("disabled: {reason}");
        }
        match (self.paused_until.filter(|p| *p > now), self.circuit) {
            (_, Circuit::Open { until, .. }) => {
                format!("circuit open until {}", until.to_rfc3339())
            }
            (_, Circuit::HalfOpen { .. }) => "circuit half-open (probing)".into(),
            (Some(p), _) => format!("paused until {}", p.to_rfc3339()),
            (None, Circuit::Closed) => "healthy".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(
            parse_go_duration("2m59.56s"),
            Some(Duration::from_secs_f64(179.56))
        );
        assert_eq!(parse_go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration("5x"), None);
        assert_eq!(parse_go_duration("24h"), Some(MAX_PROVIDER_WAIT));
    }

    #[test]
    fn huge_provider_values_are_ignored_never_panic() {
        let now = at("2026-11-24T12:00:00Z");
        let h = |pairs: &[(&str, &str)]| {
            parse_signals(
                |n| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v),
                now,
            )
        };
        for v in [
            "1e20",
            "1e400",
            "inf",
            "NaN",
            "-5",
            "86401",
            "99999999999999999999",
        ] {
            assert_eq!(h(&[("retry-after", v)]).retry_after, None, "{v}");
        }
        for v in ["1e23", "inf", "-1", "86400001"] {
            assert_eq!(h(&[("retry-after-ms", v)]).retry_after, None, "{v}");
        }
        // A bad retry-after-ms falls back to retry-after.
        assert_eq!(
            h(&[("retry-after-ms", "1e23"), ("retry-after", "2")]).retry_after,
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            h(&[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")]).retry_after,
            None
        );
        for v in [
            "1e23s",
            "100000000000000000000000s",
            "99999999999999999999h",
            "25h",
            "1.7976931348623157e308s",
            &"9".repeat(400),
            &format!("{}s", "9".repeat(400)),
        ] {
            let s = h(&[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", v),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", v),
            ]);
            assert_eq!(
                (s.reset_requests, s.reset_tokens, s.pause()),
                (None, None, None),
                "{v}"
            );
        }
        let s = h(&[
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "9999-12-31T23:59:59Z"),
        ]);
        assert_eq!(s.pause(), None);
        for message in [
            "Please try again in 99999999999999999999s.",
            "Please try again in 1e23s.",
            "Please try again in 25h.",
        ] {
            let body = openai_error_body(message);
            assert_eq!(
                classify(&http(429, &body)),
                Verdict::Retry {
                    pause: Some(Duration::from_secs(1))
                },
                "{message}"
            );
        }
        // Whatever reaches the circuit breaker cannot overflow a time.
        let mut health = Health::default();
        health.record(
            &Verdict::Retry {
                pause: Some(Duration::MAX),
            },
            now,
        );
        assert_eq!(health.paused_until, Some(now + chrono::Duration::days(1)));
        assert!(Health::default().pause(DateTime::<Utc>::MAX_UTC, Duration::MAX));
        let policy = RetryPolicy::default();
        let far = DateTime::<Utc>::MAX_UTC;
        assert!(
            next_attempt(
                &Verdict::Retry {
                    pause: Some(Duration::MAX)
                },
                1,
                &policy,
                far,
                now,
                0.5
            )
            .is_some()
        );
    }

    fn openai_error_body(message: &str) -> String {
        serde_json::json!({"error": {"message": message, "type": "requests", "code": "rate_limit_exceeded"}})
            .to_string()
    }

    #[test]
    fn retry_after_in_each_form() {
        let now = at("2026-11-24T12:00:00Z");
        let h = |pairs: &'static [(&'static str, &'static str)]| {
            parse_signals(
                |n| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v),
                now,
            )
        };
        assert_eq!(
            h(&[("retry-after-ms", "1500")]).retry_after,
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            h(&[("retry-after", "7")]).retry_after,
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            h(&[("retry-after", "Tue, 24 Nov 2026 12:00:30 GMT")]).retry_after,
            Some(Duration::from_secs(30))
        );
        // retry-after-ms wins over retry-after.
        assert_eq!(
            h(&[("retry-after", "9"), ("retry-after-ms", "100")]).retry_after,
            Some(Duration::from_millis(100))
        );
        let s = h(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "2m59.56s"),
        ]);
        assert_eq!(s.pause(), Some(Duration::from_secs_f64(179.56)));
        let s = h(&[
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", "2026-11-24T12:00:05Z"),
        ]);
        assert_eq!(s.pause(), Some(Duration::from_secs(5)));
        assert_eq!(h(&[("x-ratelimit-remaining-requests", "5")]).pause(), None);
    }

    fn http(status: u16, body: &str) -> Outcome {
        Outcome::HttpError {
            status,
            request_id: None,
            body: body.into(),
            signals: Signals::default(),
        }
    }

    #[test]
    fn classification() {
        let rate = r#"{"error":{"message":"Rate limit reached. Please try again in 3.89s.","type":"tokens","code":"rate_limit_exceeded"}}"#;
        assert_eq!(
            classify(&http(429, rate)),
            Verdict::Retry {
                pause: Some(Duration::from_secs_f64(3.89))
            }
        );
        let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert!(matches!(
            classify(&http(429, quota)),
            Verdict::DisableProvider { .. }
        ));
        assert!(matches!(
            classify(&http(401, "{}")),
            Verdict::DisableProvider { .. }
        ));
        assert!(matches!(
            classify(&http(403, "{}")),
            Verdict::DisableProvider { .. }
        ));
        for s in [400, 404, 422] {
            assert_eq!(classify(&http(s, "{}")), Verdict::FailJob, "{s}");
        }
        for s in [408, 409, 500, 502, 503, 529] {
            assert!(
                matches!(classify(&http(s, "{}")), Verdict::Retry { .. }),
                "{s}"
            );
        }
        let overloaded =
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert!(matches!(
            classify(&http(529, overloaded)),
            Verdict::Retry { .. }
        ));
        for code in [
            "timeout",
            "connection_failed",
            "truncated_response",
            "malformed_response",
        ] {
            let o = Outcome::NoAnswer {
                code,
                message: String::new(),
            };
            assert_eq!(classify(&o), Verdict::Retry { pause: None }, "{code}");
        }
        assert_eq!(
            classify(&Outcome::NoAnswer {
                code: "invalid_body",
                message: String::new()
            }),
            Verdict::FailJob
        );
    }

    #[test]
    fn anthropic_errors_are_classified() {
        let err = |kind: &str, message: &str| {
            serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
                .to_string()
        };
        let overloaded = err("overloaded_error", "Overloaded");
        assert_eq!(
            classify(&http(529, &overloaded)),
            Verdict::Retry { pause: None }
        );
        let rate = err(
            "rate_limit_error",
            "Number of request tokens has exceeded your per-minute rate limit",
        );
        let with_retry_after = Outcome::HttpError {
            status: 429,
            request_id: None,
            body: rate.clone(),
            signals: Signals {
                retry_after: Some(Duration::from_secs(7)),
                ..Signals::default()
            },
        };
        assert_eq!(
            classify(&with_retry_after),
            Verdict::Retry {
                pause: Some(Duration::from_secs(7))
            }
        );
        let spend = err(
            "rate_limit_error",
            "You have reached your specified API usage limits. You will regain access on 2026-12-01 at 00:00 UTC.",
        );
        assert!(matches!(
            classify(&http(429, &spend)),
            Verdict::DisableProvider { .. }
        ));
        let credit = err(
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API.",
        );
        assert!(matches!(
            classify(&http(400, &credit)),
            Verdict::DisableProvider { .. }
        ));
        let invalid = err("invalid_request_error", "max_tokens: Field required");
        assert_eq!(classify(&http(400, &invalid)), Verdict::FailJob);
        for s in [401, 403] {
            let body = err("authentication_error", "invalid x-api-key");
            assert!(matches!(
                classify(&http(s, &body)),
                Verdict::DisableProvider { .. }
            ));
        }
        for s in [500, 504] {
            let body = err("api_error", "Internal server error");
            assert!(matches!(classify(&http(s, &body)), Verdict::Retry { .. }));
        }
    }

    #[test]
    fn anthropic_input_and_output_token_limits_are_read() {
        let now = at("2026-11-24T12:00:00Z");
        let pairs = [
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2026-11-24T12:00:01Z"),
            ("anthropic-ratelimit-tokens-limit", "48000"),
            ("anthropic-ratelimit-tokens-remaining", "40000"),
            ("anthropic-ratelimit-tokens-reset", "2026-11-24T12:00:02Z"),
            ("anthropic-ratelimit-input-tokens-limit", "40000"),
            ("anthropic-ratelimit-input-tokens-remaining", "39000"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2026-11-24T12:00:02Z",
            ),
            ("anthropic-ratelimit-output-tokens-limit", "8000"),
            ("anthropic-ratelimit-output-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2026-11-24T12:00:09Z",
            ),
        ];
        let s = parse_signals(
            |n| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v),
            now,
        );
        assert_eq!(s.limit_requests, Some(50));
        assert_eq!(s.remaining_requests, Some(49));
        assert_eq!(s.reset_requests, Some(Duration::from_secs(1)));
        // The output-token limit is the one at zero: it decides the pause.
        assert_eq!(
            (s.limit_tokens, s.remaining_tokens, s.reset_tokens),
            (Some(8000), Some(0), Some(Duration::from_secs(9)))
        );
        assert_eq!(s.pause(), Some(Duration::from_secs(9)));
        // Garbage and far-future values never panic and are not believed.
        for v in ["9999-12-31T23:59:59Z", "soon", "", "2026-11-26T12:00:00Z"] {
            let pairs = [
                ("anthropic-ratelimit-input-tokens-remaining", "0"),
                ("anthropic-ratelimit-input-tokens-reset", v),
                (
                    "anthropic-ratelimit-output-tokens-remaining",
                    "99999999999999999999999",
                ),
            ];
            let s = parse_signals(
                |n| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v),
                now,
            );
            assert_eq!(s.pause(), None, "{v}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_a_cap() {
        let p = RetryPolicy::default();
        assert!(p.backoff(1, 0.999) <= Duration::from_secs(1));
        assert!(
            p.backoff(4, 0.999) > Duration::from_secs(7)
                && p.backoff(4, 0.999) <= Duration::from_secs(8)
        );
        assert!(p.backoff(30, 0.999) <= Duration::from_secs(300));
        assert!(p.backoff(3, 0.0) >= Duration::from_millis(10));
        assert!(
            p.backoff(3, 0.2) < p.backoff(3, 0.8),
            "jitter spreads retries"
        );
    }

    #[test]
    fn the_circuit_opens_probes_and_closes() {
        let mut h = Health::default();
        let t0 = at("2026-11-24T12:00:00Z");
        for _ in 0..FAILURES_TO_OPEN - 1 {
            h.record(&Verdict::Retry { pause: None }, t0);
        }
        assert!(h.admit(t0));
        assert!(
            h.record(&Verdict::Retry { pause: None }, t0),
            "opening changes availability"
        );
        assert!(!h.admit(t0 + chrono::Duration::seconds(5)));
        // After the cooldown, exactly one probe.
        let t1 = t0 + chrono::Duration::seconds(10);
        assert!(h.admit(t1));
        assert!(!h.admit(t1));
        // The probe fails: open again, for twice as long.
        h.record(&Verdict::Retry { pause: None }, t1);
        assert!(!h.admit(t1 + chrono::Duration::seconds(19)));
        let t2 = t1 + chrono::Duration::seconds(20);
        assert!(h.admit(t2));
        h.record(&Verdict::Succeeded, t2);
        assert_eq!(h.circuit, Circuit::Closed);
        assert!(h.admit(t2));
    }

    /// One key's draws over successive attempts are independent enough that
    /// a 25% failure rate fails all 8 attempts about as rarely as it should
    /// (0.25^8 × 4,000 keys ≈ 0.06), and each attempt's draws are uniform.
    #[test]
    fn draws_of_successive_attempts_are_not_correlated() {
        let keys = 0..4000u64;
        let all_fail = keys
            .clone()
            .filter(|&k| (1..=8).all(|a| unit_draw(k.wrapping_mul(0x0100_0000_01b3), a) < 0.25))
            .count();
        assert!(all_fail <= 2, "{all_fail} keys failed all 8 attempts");
        for a in 1..=8 {
            let below = keys.clone().filter(|&k| unit_draw(k, a) < 0.25).count();
            assert!(
                (900..=1100).contains(&below),
                "attempt {a}: {below} of 4000 below 0.25"
            );
        }
    }

    /// An open circuit keeps the provider out of the plan until its probe
    /// is due; after a failed probe, a provider failing most requests is
    /// out entirely until then (a disabled provider is out for ever).
    #[test]
    fn an_open_circuit_is_planned_out_only_until_its_probe() {
        let mut h = Health::default();
        let t0 = at("2026-11-24T12:00:00Z");
        assert_eq!(h.plan_excluded_until(t0, 1.0), None);
        for _ in 0..FAILURES_TO_OPEN {
            h.record(&Verdict::Retry { pause: None }, t0);
        }
        let probe = t0 + chrono::Duration::seconds(10);
        assert_eq!(h.plan_excluded_until(t0, 1.0), Some(probe));
        assert_eq!(h.probe_due(), Some(probe));
        // A longer pause wins; at the probe's time the plan includes it.
        h.pause(t0, Duration::from_secs(30));
        assert_eq!(
            h.plan_excluded_until(t0, 1.0),
            Some(t0 + chrono::Duration::seconds(30))
        );
        let mut h = Health::default();
        for _ in 0..FAILURES_TO_OPEN {
            h.record(&Verdict::Retry { pause: None }, t0);
        }
        assert_eq!(h.plan_excluded_until(probe, 1.0), None);
        // The probe fails.
        assert!(h.admit(probe));
        h.record(&Verdict::Retry { pause: None }, probe);
        let later = probe + chrono::Duration::seconds(5);
        // After one failed probe the provider is planned back at the next
        // one, also while its recent answers mostly failed (a flaky one
        // fails a probe often); one that fails nearly everything is out.
        assert_eq!(
            h.plan_excluded_until(later, 0.75),
            Some(probe + chrono::Duration::seconds(20))
        );
        assert_eq!(
            h.plan_excluded_until(later, 0.45),
            Some(probe + chrono::Duration::seconds(20))
        );
        assert_eq!(
            h.plan_excluded_until(later, 0.3),
            Some(DateTime::<Utc>::MAX_UTC)
        );
        // Four more failed probes, each doubling the cooldown (20, 40, 80,
        // 160 s): one that still answers most requests is planned back at
        // the probe; one that fails most of them is out until then.
        let mut next_probe = probe + chrono::Duration::seconds(20);
        for cooldown in [20, 40, 80, 160] {
            assert!(h.admit(next_probe));
            h.record(&Verdict::Retry { pause: None }, next_probe);
            next_probe += chrono::Duration::seconds(cooldown * 2);
        }
        let later = next_probe - chrono::Duration::seconds(5);
        assert_eq!(h.plan_excluded_until(later, 0.75), Some(next_probe));
        assert_eq!(
            h.plan_excluded_until(later, 0.45),
            Some(DateTime::<Utc>::MAX_UTC)
        );
        assert_eq!(h.probe_due(), Some(next_probe));
        assert_eq!(h.plan_excluded_until(next_probe, 0.1), None);
        h.record(
            &Verdict::DisableProvider {
                reason: "key refused".into(),
            },
            t0,
        );
        assert_eq!(
            h.plan_excluded_until(t0, 1.0),
            Some(DateTime::<Utc>::MAX_UTC)
        );
    }

    #[test]
    fn answers_to_requests_sent_before_the_circuit_opened_do_not_close_it() {
        let mut h = Health::default();
        let t0 = at("2026-11-24T12:00:00Z");
        let before = t0 - chrono::Duration::seconds(2);
        for _ in 0..FAILURES_TO_OPEN {
            h.record(&Verdict::Retry { pause: None }, t0);
        }
        assert!(matches!(h.circuit, Circuit::Open { .. }));
        // Many requests were in flight when it opened; their answers arrive.
        let soon = t0 + chrono::Duration::milliseconds(5);
        assert!(!h.record_sent(&Verdict::Succeeded, before, soon));
        assert!(!h.record_sent(&Verdict::Retry { pause: None }, before, soon));
        assert!(
            matches!(h.circuit, Circuit::Open { until, .. } if until == t0 + chrono::Duration::seconds(10))
        );
        // The probe, sent after the cooldown, closes it; a late answer to
        // an old request during the probe changes nothing.
        let t1 = t0 + chrono::Duration::seconds(10);
        assert!(h.admit(t1));
        h.record_sent(&Verdict::Succeeded, before, t1);
        assert!(matches!(h.circuit, Circuit::HalfOpen { .. }));
        h.record_sent(&Verdict::Succeeded, t1, t1 + chrono::Duration::seconds(1));
        assert_eq!(h.circuit, Circuit::Closed);
        // A provider's pause is news whenever the request was sent.
        for _ in 0..FAILURES_TO_OPEN {
            h.record(&Verdict::Retry { pause: None }, t1);
        }
        let pause = Some(Duration::from_secs(30));
        assert!(h.record_sent(&Verdict::Retry { pause }, before, t1));
        assert!(h.paused_until.is_some());
    }

    #[test]
    fn pauses_and_disabling() {
        let mut h = Health::default();
        let t0 = at("2026-11-24T12:00:00Z");
        h.record(
            &Verdict::Retry {
                pause: Some(Duration::from_secs(30)),
            },
            t0,
        );
        assert!(!h.admit(t0 + chrono::Duration::seconds(29)));
        assert!(h.admit(t0 + chrono::Duration::seconds(30)));
        assert_eq!(
            h.available_from(t0),
            Some(t0 + chrono::Duration::seconds(30))
        );
        h.record(
            &Verdict::DisableProvider {
                reason: "HTTP 401".into(),
            },
            t0,
        );
        assert_eq!(h.available_from(t0), None);
        assert!(!h.admit(t0 + chrono::Duration::days(1)));
        assert!(h.describe(t0).contains("401"));
    }

    #[test]
    fn a_pause_remembers_what_asked_for_it() {
        let mut h = Health::default();
        let t0 = at("2026-11-24T12:00:00Z");
        let secs = chrono::Duration::seconds;
        // A success that leaves a limit at zero: paused until its reset.
        assert!(h.pause(t0, Duration::from_secs(5)));
        assert_eq!(h.pause_cause, Some(PauseCause::LimitReset));
        // A 429 asking for longer takes over the pause and its cause.
        let retry = |s| Verdict::Retry {
            pause: Some(Duration::from_secs(s)),
        };
        h.record(&retry(30), t0);
        assert_eq!(
            (h.paused_until, h.pause_cause),
            (Some(t0 + secs(30)), Some(PauseCause::RetryAfter))
        );
        // A shorter reset does not: the longer pause holds, with its cause.
        assert!(!h.pause(t0, Duration::from_secs(10)));
        assert_eq!(h.pause_cause, Some(PauseCause::RetryAfter));
        // Once the pause has passed, neither is left.
        h.record(&Verdict::Succeeded, t0 + secs(31));
        assert_eq!((h.paused_until, h.pause_cause), (None, None));
        assert_eq!(PauseCause::RetryAfter.as_str(), "retry_after");
    }
}
