//! The dispatcher's live view of each provider, as a pure function of its
//! state at an instant: the circuit breaker, whether and why requests may
//! not flow (a `Retry-After`, the circuit, a refused key, a spent budget),
//! and the use of every rate limit (requests and tokens in the sliding
//! 60 s, requests in the rolling 24 h, requests in flight) with when the
//! next request may start.
//!
//! The dispatcher takes a [`snapshot`] at most a few times a second and
//! publishes it ([`crate::telemetry::Telemetry::publish_live`]);
//! `GET /v1/providers` shows it, and [`super::explain`] reads it to say why
//! a job waits. Nothing here reads the clock: `now` is an argument.

use chrono::{DateTime, Utc};

use crate::dispatch::decide::Observed;
use crate::dispatch::limits::{LimiterUse, RateLimits};
use crate::dispatch::reliability::{Circuit, PauseCause};
use crate::domain::policy::Period;
use crate::domain::pricing::{Catalog, Limits};

/// Every provider as the dispatcher saw it at `at`.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveView {
    pub at: DateTime<Utc>,
    /// In the catalog's order when taken.
    pub providers: Vec<ProviderLive>,
    /// Requests in flight over all providers, and `daemon.max_in_flight`.
    pub in_flight: u32,
    pub max_in_flight: Option<u32>,
    /// `daemon.after_deadline = "run"`: a job past its deadline is sent
    /// late instead of expired ([`snapshot`] leaves it false; the
    /// dispatcher sets it).
    pub run_after_deadline: bool,
}

impl LiveView {
    /// The provider called `name`.
    pub fn provider(&self, name: &str) -> Option<&ProviderLive> {
        self.providers.iter().find(|p| p.name == name)
    }
}

/// One provider at the view's instant.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderLive {
    pub name: String,
    pub circuit: CircuitView,
    /// Failures in a row that count towards opening the circuit.
    pub consecutive_failures: u32,
    /// Why no request may be sent now, if none may: the reason that holds
    /// longest.
    pub pause: Option<Pause>,
    /// The configured limits.
    pub limits: Limits,
    /// Their use now.
    pub usage: LimiterUse,
    /// Models with limits of their own, and their use.
    pub models: Vec<ModelLive>,
    /// The budgets that apply to this provider.
    pub budgets: Vec<BudgetUse>,
    /// Until when its flex channel is backed off after a refusal
    /// (`429 resource_unavailable`); the standard channel is not.
    pub flex_off_until: Option<DateTime<Utc>>,
}

impl ProviderLive {
    /// The live limits of the model called `name`, if it has its own.
    pub fn model(&self, name: &str) -> Option<&ModelLive> {
        self.models.iter().find(|m| m.name == name)
    }
}

/// The circuit breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitView {
    Closed,
    /// No request until `until`, then one probe.
    Open {
        until: DateTime<Utc>,
    },
    /// One probe is in flight.
    HalfOpen,
}

impl CircuitView {
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitView::Closed => "closed",
            CircuitView::Open { .. } => "open",
            CircuitView::HalfOpen => "half_open",
        }
    }
}

/// Requests may not flow until `until` (`None`: until an event — the
/// configuration is reloaded, the probe answers).
#[derive(Debug, Clone, PartialEq)]
pub struct Pause {
    pub until: Option<DateTime<Utc>>,
    pub reason: PauseReason,
}

/// Why a provider takes no requests now.
#[derive(Debug, Clone, PartialEq)]
pub enum PauseReason {
    /// The provider asked to wait (`Retry-After` on a refused request).
    RetryAfter,
    /// A rate limit the provider reported at zero, until its reset.
    LimitReset,
    /// The circuit breaker is open until its probe.
    CircuitOpen,
    /// The circuit's probe is in flight.
    CircuitHalfOpen,
    /// The provider refused our key (why); until the configuration is reloaded.
    Disabled(String),
    /// This budget (an index into [`ProviderLive::budgets`]) is spent until
    /// it renews.
    Budget(usize),
}

impl PauseReason {
    /// The name the API uses.
    pub fn as_str(&self) -> &'static str {
        match self {
            PauseReason::RetryAfter => PauseCause::RetryAfter.as_str(),
            PauseReason::LimitReset => PauseCause::LimitReset.as_str(),
            PauseReason::CircuitOpen => "circuit_open",
            PauseReason::CircuitHalfOpen => "circuit_half_open",
            PauseReason::Disabled(_) => "disabled",
            PauseReason::Budget(_) => "budget",
        }
    }
}

/// A model's own limits and their use.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelLive {
    /// The model's name at its provider.
    pub name: String,
    pub limits: Limits,
    pub usage: LimiterUse,
}

/// A budget that applies to a provider, in its current period.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetUse {
    /// The provider it is for; `None`: every provider's spend counts.
    pub provider: Option<String>,
    pub period: Period,
    pub cap_usd: f64,
    /// Spent or committed (jobs in flight are charged their estimate).
    pub spent_usd: f64,
    pub renews_at: DateTime<Utc>,
}

impl BudgetUse {
    /// What is left of it (never below zero).
    pub fn remaining_usd(&self) -> f64 {
        (self.cap_usd - self.spent_usd).max(0.0)
    }

    /// Spent: nothing can be paid from it.
    pub fn exhausted(&self) -> bool {
        self.cap_usd - self.spent_usd <= 1e-9
    }

    /// "the daily budget" or "openai's monthly budget".
    pub fn name(&self) -> String {
        match &self.provider {
            None => format!("the {} budget", self.period.name()),
            Some(p) => format!("{p}'s {} budget", self.period.name()),
        }
    }
}

/// The live view of every provider in `catalog` at `now`. Takes `limits`
/// mutably only to prune what has left its windows.
pub fn snapshot(
    catalog: &Catalog,
    limits: &mut RateLimits,
    observed: &Observed,
    now: DateTime<Utc>,
) -> LiveView {
    let now_ms = now.timestamp_millis();
    let providers = catalog
        .providers
        .iter()
        .enumerate()
        .map(|(p, info)| {
            let health = &observed.health[p];
            let circuit = match health.circuit {
                Circuit::Closed => CircuitView::Closed,
                Circuit::Open { until, .. } => CircuitView::Open { until },
                Circuit::HalfOpen { .. } => CircuitView::HalfOpen,
            };
            let state = &observed.budget;
            let budgets: Vec<BudgetUse> = state
                .budgets
                .iter()
                .zip(&state.spent)
                .filter(|(b, _)| b.applies_to(p))
                .map(|(b, &spent)| BudgetUse {
                    provider: b.provider.map(|q| catalog.providers[q].name.clone()),
                    period: b.period,
                    cap_usd: b.cap_usd,
                    spent_usd: spent,
                    renews_at: b.period.next_start(now),
                })
                .collect();
            let mut pause: Option<Pause> = None;
            let mut consider = |until: DateTime<Utc>, reason: PauseReason| {
                if until > now
                    && pause
                        .as_ref()
                        .is_none_or(|p| p.until.is_some_and(|u| until > u))
                {
                    pause = Some(Pause {
                        until: Some(until),
                        reason,
                    });
                }
            };
            if let Some(until) = health.paused_until {
                let reason = match health.pause_cause {
                    Some(PauseCause::LimitReset) => PauseReason::LimitReset,
                    _ => PauseReason::RetryAfter,
                };
                consider(until, reason);
            }
            if let CircuitView::Open { until } = circuit {
                consider(until, PauseReason::CircuitOpen);
            }
            for (i, b) in budgets.iter().enumerate() {
                if b.exhausted() {
                    consider(b.renews_at, PauseReason::Budget(i));
                }
            }
            // Until an event, not a time: these hold longest.
            if circuit == CircuitView::HalfOpen {
                pause = Some(Pause {
                    until: None,
                    reason: PauseReason::CircuitHalfOpen,
                });
            }
            if let Some(why) = &health.disabled {
                pause = Some(Pause {
                    until: None,
                    reason: PauseReason::Disabled(why.clone()),
                });
            }
            let models = catalog
                .models
                .iter()
                .enumerate()
                .filter(|(_, m)| m.provider == p)
                .filter_map(|(mi, m)| {
                    let own = m.limits?;
                    let usage = limits.model(mi)?.usage(now_ms);
                    Some(ModelLive {
                        name: m.name.clone(),
                        limits: own,
                        usage,
                    })
                })
                .collect();
            ProviderLive {
                name: info.name.clone(),
                circuit,
                consecutive_failures: health.consecutive_failures(),
                pause,
                limits: info.limits,
                usage: limits.provider(p).usage(now_ms),
                models,
                budgets,
                flex_off_until: observed.flex_off_until(p, now),
            }
        })
        .collect();
    LiveView {
        at: now,
        providers,
        in_flight: limits.in_flight(),
        max_in_flight: limits.cap(),
        run_after_deadline: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::dispatch::budget::BudgetState;
    use crate::dispatch::reliability::{Health, Verdict};
    use std::path::Path;
    use std::time::Duration;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// `fast` (limits, a model with its own rpm) and `slow` (none); a
    /// global daily budget of $5 and slow's monthly one of $20.
    fn config() -> Config {
        let text = r#"
[budget]
daily_usd = 5.0

[[providers]]
name = "fast"
kind = "simulated"
rpm = 600
tpm = 100000
rpd = 10000
concurrency = 4

[[providers.models]]
name = "f1"
input_per_mtok = 1.0
output_per_mtok = 1.0
rpm = 60

[[providers]]
name = "slow"
kind = "simulated"
monthly_budget_usd = 20.0

[[providers.models]]
name = "s1"
input_per_mtok = 1.0
output_per_mtok = 1.0
"#;
        Config::parse(text, "live.toml", Path::new(".")).unwrap()
    }

    fn setup(now: DateTime<Utc>) -> (Catalog, RateLimits, Observed) {
        let config = config();
        let c = config.catalog;
        let limits = RateLimits::for_catalog(&c, now.timestamp_millis()).with_cap(100);
        let budgets = BudgetState::new(config.budgets, now, |_, _| 0.0);
        let observed = Observed::new(&[Duration::from_secs(1); 2], budgets);
        (c, limits, observed)
    }

    #[test]
    fn a_healthy_provider_shows_its_use_of_every_limit() {
        let now = at("2026-11-24T12:00:00Z");
        let now_ms = now.timestamp_millis();
        let (c, mut limits, observed) = setup(now);
        let f1 = c.model_id("fast/f1").unwrap();
        // Three requests a second ago (an earlier run's), one now.
        let sent = crate::dispatch::limits::Sent {
            at_ms: now_ms - 1000,
            requests: 3,
            tokens: 1500,
        };
        limits.seed(0, Some(f1), sent, now_ms);
        assert!(limits.try_acquire(0, f1, 500, now_ms));
        let view = snapshot(&c, &mut limits, &observed, now);
        assert_eq!(
            (view.at, view.in_flight, view.max_in_flight),
            (now, 1, Some(100))
        );
        let fast = view.provider("fast").unwrap();
        assert_eq!(fast.circuit, CircuitView::Closed);
        assert_eq!(fast.pause, None);
        assert_eq!(fast.limits.rpm, Some(600));
        let u = fast.usage;
        assert_eq!(
            u.minute_requests.map(|w| (w.used, w.usable)),
            Some((4, 600))
        );
        assert_eq!(u.minute_tokens.map(|w| w.used), Some(2000));
        assert_eq!(u.day_requests.map(|w| w.used), Some(4));
        assert_eq!((u.concurrency, u.in_flight), (Some(4), 1));
        // The model's own rpm: all 60 usable, four used.
        let m = fast.model("f1").unwrap();
        assert_eq!(m.limits.rpm, Some(60));
        assert_eq!(
            m.usage.minute_requests.map(|w| (w.used, w.usable)),
            Some((4, 60))
        );
        // The global daily budget applies to both; slow's monthly one to slow.
        assert_eq!(fast.budgets.len(), 1);
        assert_eq!(fast.budgets[0].name(), "the daily budget");
        assert_eq!(fast.budgets[0].renews_at, at("2026-11-25T00:00:00Z"));
        let slow = view.provider("slow").unwrap();
        let mut names: Vec<String> = slow.budgets.iter().map(BudgetUse::name).collect();
        names.sort();
        assert_eq!(names, ["slow's monthly budget", "the daily budget"]);
        assert_eq!(slow.usage.minute_requests, None);
        assert_eq!(slow.usage.next_start_in_ms, Some(0));
    }

    #[test]
    fn the_pause_that_holds_longest_is_the_one_shown() {
        let now = at("2026-11-24T12:00:00Z");
        let secs = chrono::Duration::seconds;
        let (c, mut limits, mut observed) = setup(now);
        let retry = Verdict::Retry {
            pause: Some(Duration::from_secs(30)),
        };
        observed.health[0].record(&retry, now);
        let view = snapshot(&c, &mut limits, &observed, now);
        assert_eq!(
            view.providers[0].pause,
            Some(Pause {
                until: Some(now + secs(30)),
                reason: PauseReason::RetryAfter
            })
        );
        assert_eq!(view.providers[1].pause, None);
        // Once it has passed, no pause is shown.
        let later = snapshot(&c, &mut limits, &observed, now + secs(30));
        assert_eq!(later.providers[0].pause, None);

        // Five failures open the circuit for 10 s: the 30 s pause still
        // holds longer.
        for _ in 0..5 {
            observed.health[0].record(&Verdict::Retry { pause: None }, now);
        }
        let view = snapshot(&c, &mut limits, &observed, now);
        let fast = &view.providers[0];
        assert_eq!(
            fast.circuit,
            CircuitView::Open {
                until: now + secs(10)
            }
        );
        assert_eq!(fast.consecutive_failures, 5);
        assert_eq!(fast.pause.as_ref().unwrap().reason, PauseReason::RetryAfter);
        // 20 s on, the circuit's probe is due; the pause still holds.
        let on = snapshot(&c, &mut limits, &observed, now + secs(20));
        assert_eq!(
            on.providers[0].pause.as_ref().unwrap().reason,
            PauseReason::RetryAfter
        );

        // A spent daily budget holds until midnight, longer than either.
        observed.budget.charge(0, 5.0);
        let view = snapshot(&c, &mut limits, &observed, now);
        let fast = &view.providers[0];
        assert_eq!(
            fast.pause,
            Some(Pause {
                until: Some(at("2026-11-25T00:00:00Z")),
                reason: PauseReason::Budget(0)
            })
        );
        assert!(fast.budgets[0].exhausted());
        assert_eq!(fast.budgets[0].remaining_usd(), 0.0);

        // A refused key holds until a reload, whatever else applies.
        observed.health[0].record(
            &Verdict::DisableProvider {
                reason: "HTTP 401: bad key".into(),
            },
            now,
        );
        let view = snapshot(&c, &mut limits, &observed, now);
        assert_eq!(
            view.providers[0].pause,
            Some(Pause {
                until: None,
                reason: PauseReason::Disabled("HTTP 401: bad key".into())
            })
        );
        assert_eq!(
            view.providers[0].pause.as_ref().unwrap().reason.as_str(),
            "disabled"
        );

        // A half-open circuit: until its probe answers.
        let mut h = Health::default();
        for _ in 0..5 {
            h.record(&Verdict::Retry { pause: None }, now);
        }
        assert!(h.admit(now + secs(10)));
        observed.health[1] = h;
        let view = snapshot(&c, &mut limits, &observed, now + secs(10));
        assert_eq!(view.providers[1].circuit, CircuitView::HalfOpen);
        assert_eq!(
            view.providers[1].pause,
            Some(Pause {
                until: None,
                reason: PauseReason::CircuitHalfOpen
            })
        );
    }
}
