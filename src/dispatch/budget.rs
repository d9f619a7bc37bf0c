//! Spending caps as pure functions of (spend, now): daily and monthly USD
//! budgets, global or per provider, over UTC calendar days and months.
//!
//! The dispatcher charges a job's estimated cost when it sends it and
//! corrects the charge to the actual cost when the answer comes; the planner
//! keeps each period's planned spend under what is left of it. A job is sent
//! only if its estimate fits every budget that applies; one that cannot be
//! sent before its deadline within budget fails with `budget_exhausted`.

use chrono::{DateTime, Utc};

use crate::domain::pricing::ProviderId;

pub use crate::domain::policy::{Budget, Period};

/// Budgets and what has been spent (or committed) in their current periods.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetState {
    pub budgets: Vec<Budget>,
    /// Parallel to `budgets`: spend in the period that started at `period_start`.
    pub spent: Vec<f64>,
    pub period_start: Vec<DateTime<Utc>>,
}

impl BudgetState {
    /// `spent_since(provider, since)` gives what finished jobs cost since then.
    pub fn new(
        budgets: Vec<Budget>,
        now: DateTime<Utc>,
        spent_since: impl Fn(Option<ProviderId>, DateTime<Utc>) -> f64,
    ) -> BudgetState {
        let period_start: Vec<DateTime<Utc>> =
            budgets.iter().map(|b| b.period.start(now)).collect();
        let spent = budgets
            .iter()
            .zip(&period_start)
            .map(|(b, &s)| spent_since(b.provider, s))
            .collect();
        BudgetState {
            budgets,
            spent,
            period_start,
        }
    }

    /// Starts new periods that have begun by `now` (spend back to zero).
    /// Returns true if any did.
    pub fn roll_over(&mut self, now: DateTime<Utc>) -> bool {
        let mut rolled = false;
        for (i, b) in self.budgets.iter().enumerate() {
            let start = b.period.start(now);
            if start > self.period_start[i] {
                self.period_start[i] = start;
                self.spent[i] = 0.0;
                rolled = true;
            }
        }
        rolled
    }

    /// What is left of each budget that applies to `provider`, the smallest.
    pub fn remaining(&self, provider: ProviderId) -> f64 {
        self.budgets
            .iter()
            .zip(&self.spent)
            .filter(|(b, _)| b.applies_to(provider))
            .map(|(b, s)| b.cap_usd - s)
            .fold(f64::INFINITY, f64::min)
    }

    /// Whether `cost` fits every budget that applies to `provider`.
    pub fn fits(&self, provider: ProviderId, cost: f64) -> bool {
        cost <= self.remaining(provider) + 1e-12
    }

    /// Adds `delta` USD (negative refunds) to every budget of `provider`.
    pub fn charge(&mut self, provider: ProviderId, delta: f64) {
        for (b, s) in self.budgets.iter().zip(self.spent.iter_mut()) {
            if b.applies_to(provider) {
                *s += delta;
            }
        }
    }

    /// When the budgets that stop `cost` on `provider` have all renewed.
    pub fn renews_at(&self, provider: ProviderId, cost: f64, now: DateTime<Utc>) -> DateTime<Utc> {
        self.budgets
            .iter()
            .zip(&self.spent)
            .filter(|(b, s)| b.applies_to(provider) && cost > b.cap_usd - **s + 1e-12)
            .map(|(b, _)| b.period.next_start(now))
            .max()
            .unwrap_or(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn periods_are_utc_days_and_months() {
        let t = at("2026-12-31T18:00:00Z");
        assert_eq!(Period::Day.start(t), at("2026-12-31T00:00:00Z"));
        assert_eq!(Period::Day.next_start(t), at("2027-01-01T00:00:00Z"));
        assert_eq!(Period::Month.start(t), at("2026-12-01T00:00:00Z"));
        assert_eq!(Period::Month.next_start(t), at("2027-01-01T00:00:00Z"));
        assert_eq!(
            Period::Month.next_start(at("2026-02-10T00:00:00Z")),
            at("2026-03-01T00:00:00Z")
        );
    }

    #[test]
    fn global_and_provider_budgets_both_apply() {
        let now = at("2026-11-24T12:00:00Z");
        let budgets = vec![
            Budget {
                provider: None,
                period: Period::Month,
                cap_usd: 10.0,
            },
            Budget {
                provider: Some(1),
                period: Period::Day,
                cap_usd: 1.0,
            },
        ];
        let mut s = BudgetState::new(budgets, now, |p, _| if p == Some(1) { 0.9 } else { 5.0 });
        assert!(s.fits(0, 4.9));
        assert!(!s.fits(0, 5.1));
        assert!(s.fits(1, 0.1));
        assert!(!s.fits(1, 0.2));
        assert_eq!(s.renews_at(1, 0.2, now), at("2026-11-25T00:00:00Z"));
        s.charge(1, 0.1);
        assert!(!s.fits(1, 0.01));
        assert!((s.remaining(0) - 4.9).abs() < 1e-12);
        // Midnight: the daily budget renews, the monthly one does not.
        assert!(s.roll_over(at("2026-11-25T00:00:01Z")));
        assert!(s.fits(1, 1.0));
        assert!((s.remaining(0) - 4.9).abs() < 1e-12);
    }
}
