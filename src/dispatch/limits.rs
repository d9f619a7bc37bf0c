//! Rate-limit accounting as a pure function of (state, now).
//!
//! Each provider has a request bucket (rpm), a token bucket (tpm) and a
//! concurrency cap. Buckets hold one second of the per-minute allowance, as
//! providers enforce per-minute limits over short windows ("60,000 rpm may be
//! enforced as 1,000 per second").
//!
//! Written by hand rather than with `governor` because the planner needs to
//! ask "when could this provider take N more tokens?" about a given instant,
//! and because token charges are estimates that are corrected (refunded or
//! charged extra) once the provider reports `usage` — neither fits governor's
//! clock-owning, take-only API.

use crate::domain::pricing::{Limits, ModelId, ProviderId};

/// nightshift sends at 99% of a configured limit: requests leave evenly
/// spaced but reach the provider with network jitter, and a provider that
/// enforces "per minute" over one-second windows would refuse the few that
/// arrive bunched at exactly 100%.
pub const PACING: f64 = 0.99;

/// A refilling bucket: `capacity` units, refilled at `per_ms` per millisecond.
/// Its debt is bounded: `level` never goes below `floor`, one period's
/// allowance (a minute, a day) below zero. A request bigger than that
/// could not have been accepted by the provider anyway, and an estimate
/// that large must not block the provider for longer.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    capacity: f64,
    per_ms: f64,
    level: f64,
    floor: f64,
    last_ms: i64,
}

impl Bucket {
    /// A bucket for a per-day limit: the whole day's allowance may be used
    /// at once, and it refills over 24 hours.
    pub fn per_day(limit: f64, now_ms: i64) -> Bucket {
        let capacity = limit.max(1.0);
        Bucket {
            capacity,
            per_ms: limit / 86_400_000.0,
            level: capacity,
            floor: -capacity,
            last_ms: now_ms,
        }
    }

    /// A bucket for a per-minute limit, full at `now_ms`.
    pub fn per_minute(limit: f64, now_ms: i64) -> Bucket {
        let capacity = (limit / 60.0).max(1.0);
        Bucket {
            capacity,
            per_ms: limit / 60_000.0,
            level: capacity,
            floor: -limit.max(1.0),
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: i64) {
        if now_ms > self.last_ms {
            self.level =
                (self.level + (now_ms - self.last_ms) as f64 * self.per_ms).min(self.capacity);
            self.last_ms = now_ms;
        }
    }

    /// A request bigger than the whole bucket may go when the bucket is full,
    /// leaving it in debt; otherwise the units must be there.
    fn needed(&self, units: f64) -> f64 {
        units.min(self.capacity)
    }

    /// Milliseconds from `now_ms` until `units` can be taken (0 = now).
    pub fn ready_in_ms(&mut self, units: f64, now_ms: i64) -> i64 {
        self.refill(now_ms);
        let missing = self.needed(units) - self.level;
        if missing <= 1e-9 {
            0
        } else {
            (missing / self.per_ms).ceil() as i64
        }
    }

    /// How many requests of `units` each could be taken now, one after
    /// another (at most `u32::MAX`).
    pub fn whole_now(&mut self, units: f64, now_ms: i64) -> u32 {
        self.refill(now_ms);
        let unit = self.needed(units).max(1e-9);
        if self.level + 1e-9 < unit {
            return 0;
        }
        ((self.level + 1e-9) / unit).floor().min(u32::MAX as f64) as u32
    }

    /// Takes `units` (may leave the bucket in debt).
    pub fn take(&mut self, units: f64, now_ms: i64) {
        self.refill(now_ms);
        self.level = (self.level - units).max(self.floor);
    }

    /// Corrects an earlier charge by `delta` units (negative refunds).
    pub fn adjust(&mut self, delta: f64, now_ms: i64) {
        self.refill(now_ms);
        self.level = (self.level - delta).clamp(self.floor, self.capacity);
    }
}

/// The limit state of one provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderLimiter {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    daily: Option<Bucket>,
    concurrency: Option<u32>,
    in_flight: u32,
}

impl ProviderLimiter {
    /// A limiter pacing at [`PACING`] of the configured limits.
    pub fn new(limits: &Limits, now_ms: i64) -> ProviderLimiter {
        ProviderLimiter::with_pacing(limits, now_ms, PACING)
    }

    /// A limiter at `pacing` × the limits (minus the configured reserve).
    pub fn with_pacing(limits: &Limits, now_ms: i64, pacing: f64) -> ProviderLimiter {
        let usable = (1.0 - limits.reserve.clamp(0.0, 0.9)) * pacing;
        ProviderLimiter {
            requests: limits
                .rpm
                .map(|r| Bucket::per_minute(r as f64 * usable, now_ms)),
            tokens: limits
                .tpm
                .map(|t| Bucket::per_minute(t as f64 * usable, now_ms)),
            daily: limits
                .rpd
                .map(|r| Bucket::per_day(r as f64 * usable, now_ms)),
            concurrency: limits.concurrency,
            in_flight: 0,
        }
    }

    /// Milliseconds until a request of `tokens` may be sent; `None` while the
    /// concurrency cap is reached (a finishing request frees it, not time).
    pub fn ready_in_ms(&mut self, tokens: u64, now_ms: i64) -> Option<i64> {
        if self.concurrency.is_some_and(|c| self.in_flight >= c) {
            return None;
        }
        let r = self
            .requests
            .as_mut()
            .map_or(0, |b| b.ready_in_ms(1.0, now_ms));
        let t = self
            .tokens
            .as_mut()
            .map_or(0, |b| b.ready_in_ms(tokens as f64, now_ms));
        let d = self
            .daily
            .as_mut()
            .map_or(0, |b| b.ready_in_ms(1.0, now_ms));
        Some(r.max(t).max(d))
    }

    /// At most how many requests may start now: free concurrency slots and
    /// whole requests in the rpm and rpd buckets. Tokens are not counted (they
    /// differ per request), so this is an upper bound, for sizing reads.
    pub fn startable_now(&mut self, now_ms: i64) -> u32 {
        let free = self
            .concurrency
            .map_or(u32::MAX, |c| c.saturating_sub(self.in_flight));
        let r = self
            .requests
            .as_mut()
            .map_or(u32::MAX, |b| b.whole_now(1.0, now_ms));
        let d = self
            .daily
            .as_mut()
            .map_or(u32::MAX, |b| b.whole_now(1.0, now_ms));
        free.min(r).min(d)
    }

    /// Takes capacity for a request if the limits allow it now.
    pub fn try_acquire(&mut self, tokens: u64, now_ms: i64) -> bool {
        if self.ready_in_ms(tokens, now_ms) != Some(0) {
            return false;
        }
        if let Some(b) = &mut self.requests {
            b.take(1.0, now_ms);
        }
        if let Some(b) = &mut self.daily {
            b.take(1.0, now_ms);
        }
        if let Some(b) = &mut self.tokens {
            b.take(tokens as f64, now_ms);
        }
        self.in_flight += 1;
        true
    }

    /// Ends a request: frees its concurrency slot and corrects the token
    /// charge from the estimate to what the provider reported.
    pub fn release(&mut self, estimated_tokens: u64, actual_tokens: Option<u64>, now_ms: i64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let (Some(b), Some(actual)) = (&mut self.tokens, actual_tokens) {
            b.adjust(actual as f64 - estimated_tokens as f64, now_ms);
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Takes over the requests in flight of the limiter this one replaces
    /// (a configuration reload), so the concurrency cap still counts them.
    pub fn carry_in_flight(&mut self, n: u32) {
        self.in_flight = n;
    }
}

/// Limit state of every provider, indexed like the catalog, and the cap on
/// requests in flight over all of them.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimits {
    pub providers: Vec<ProviderLimiter>,
    /// Parallel to the catalog's models: limits a provider sets per model.
    pub models: Vec<Option<ProviderLimiter>>,
    /// Requests in flight at most, over all providers (`None`: no cap).
    cap: Option<u32>,
    in_flight: u32,
}

impl RateLimits {
    /// Provider limits only.
    pub fn new(limits: impl IntoIterator<Item = Limits>, now_ms: i64) -> RateLimits {
        RateLimits {
            providers: limits
                .into_iter()
                .map(|l| ProviderLimiter::new(&l, now_ms))
                .collect(),
            models: Vec::new(),
            cap: None,
            in_flight: 0,
        }
    }

    /// At most `cap` requests in flight over all providers: a provider that
    /// sets no concurrency limit cannot open sockets without bound.
    pub fn with_cap(self, cap: u32) -> RateLimits {
        RateLimits {
            cap: Some(cap),
            ..self
        }
    }

    /// Requests in flight over all providers.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Takes over the total in flight of the limits this one replaces (a
    /// reload); [`RateLimits::release_gone`] ends those whose provider left.
    pub fn carry_in_flight(&mut self, n: u32) {
        self.in_flight = n;
    }

    /// Ends a request whose provider is no longer configured: only the
    /// total in flight counts it still.
    pub fn release_gone(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    fn cap_free(&self) -> u32 {
        self.cap
            .map_or(u32::MAX, |c| c.saturating_sub(self.in_flight))
    }

    /// Every provider's limits and every model's that has its own.
    pub fn for_catalog(catalog: &crate::domain::pricing::Catalog, now_ms: i64) -> RateLimits {
        RateLimits {
            models: catalog
                .models
                .iter()
                .map(|m| m.limits.map(|l| ProviderLimiter::new(&l, now_ms)))
                .collect(),
            ..RateLimits::new(catalog.providers.iter().map(|p| p.limits), now_ms)
        }
    }

    pub fn provider(&mut self, id: ProviderId) -> &mut ProviderLimiter {
        &mut self.providers[id]
    }

    fn model(&mut self, id: ModelId) -> Option<&mut ProviderLimiter> {
        self.models.get_mut(id).and_then(Option::as_mut)
    }

    /// Milliseconds until a request of `tokens` to `model` on `provider` may
    /// go (both limits); `None` while a concurrency cap is reached.
    pub fn ready_in_ms(
        &mut self,
        provider: ProviderId,
        model: ModelId,
        tokens: u64,
        now_ms: i64,
    ) -> Option<i64> {
        if self.cap_free() == 0 {
            return None;
        }
        let p = self.providers[provider].ready_in_ms(tokens, now_ms)?;
        let m = match self.model(model) {
            Some(l) => l.ready_in_ms(tokens, now_ms)?,
            None => 0,
        };
        Some(p.max(m))
    }

    /// At most how many requests to `model` on `provider` may start now
    /// (see [`ProviderLimiter::startable_now`]).
    pub fn startable_now(&mut self, provider: ProviderId, model: ModelId, now_ms: i64) -> u32 {
        let p = self.providers[provider]
            .startable_now(now_ms)
            .min(self.cap_free());
        match self.model(model) {
            Some(l) => p.min(l.startable_now(now_ms)),
            None => p,
        }
    }

    /// Takes capacity on both the provider and the model, if both allow it now.
    pub fn try_acquire(
        &mut self,
        provider: ProviderId,
        model: ModelId,
        tokens: u64,
        now_ms: i64,
    ) -> bool {
        if self.ready_in_ms(provider, model, tokens, now_ms) != Some(0) {
            return false;
        }
        let ok = self.providers[provider].try_acquire(tokens, now_ms);
        if let Some(l) = self.model(model) {
            l.try_acquire(tokens, now_ms);
        }
        if ok {
            self.in_flight += 1;
        }
        ok
    }

    /// Ends a request on both limiters (see [`ProviderLimiter::release`]).
    pub fn release(
        &mut self,
        provider: ProviderId,
        model: ModelId,
        estimated: u64,
        actual: Option<u64>,
        now_ms: i64,
    ) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.providers[provider].release(estimated, actual, now_ms);
        if let Some(l) = self.model(model) {
            l.release(estimated, actual, now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startable_now_counts_free_slots_and_whole_requests() {
        let limits = Limits {
            rpm: Some(600),
            concurrency: Some(4),
            ..Limits::default()
        };
        let mut p = ProviderLimiter::with_pacing(&limits, 0, 1.0);
        // A one-second burst of 10 requests, but only 4 slots.
        assert_eq!(p.startable_now(0), 4);
        for _ in 0..3 {
            assert!(p.try_acquire(1, 0));
        }
        assert_eq!(p.startable_now(0), 1);
        for _ in 0..3 {
            p.release(1, Some(1), 0);
        }
        // 3 of the 10 requests are used; the slots are free again.
        assert_eq!(p.startable_now(0), 4);
        let mut rpm_only = ProviderLimiter::with_pacing(
            &Limits {
                rpm: Some(600),
                ..Limits::default()
            },
            0,
            1.0,
        );
        for _ in 0..8 {
            assert!(rpm_only.try_acquire(1, 0));
            rpm_only.release(1, Some(1), 0);
        }
        assert_eq!(rpm_only.startable_now(0), 2);
        assert_eq!(rpm_only.startable_now(100), 3);
        let mut unlimited = ProviderLimiter::with_pacing(&Limits::default(), 0, 1.0);
        assert_eq!(unlimited.startable_now(0), u32::MAX);
    }

    #[test]
    fn rpm_bucket_allows_one_second_burst_then_paces() {
        let mut p = ProviderLimiter::with_pacing(
            &Limits {
                rpm: Some(600),
                tpm: None,
                concurrency: None,
                ..Limits::default()
            },
            0,
            1.0,
        );
        for _ in 0..10 {
            assert!(p.try_acquire(1, 0));
            p.release(1, Some(1), 0);
        }
        assert!(!p.try_acquire(1, 0));
        // 600 rpm = one request per 100 ms.
        assert_eq!(p.ready_in_ms(1, 0), Some(100));
        assert!(p.try_acquire(1, 100));
    }

    #[test]
    fn over_a_minute_the_rate_matches_the_limit() {
        let mut p = ProviderLimiter::with_pacing(
            &Limits {
                rpm: Some(600),
                tpm: Some(60_000),
                concurrency: None,
                ..Limits::default()
            },
            0,
            1.0,
        );
        let mut sent = 0;
        let mut now = 0;
        while now < 60_000 {
            if p.try_acquire(50, now) {
                sent += 1;
                p.release(50, Some(50), now);
            } else {
                now += p.ready_in_ms(50, now).unwrap().max(1);
            }
        }
        // tpm 60,000 / 50 tokens = 1,200 requests by tokens, 600 by rpm; plus the initial burst of 10.
        assert!((600..=611).contains(&sent), "{sent}");
    }

    #[test]
    fn concurrency_blocks_until_release_and_usage_corrects_tokens() {
        let mut p = ProviderLimiter::with_pacing(
            &Limits {
                rpm: None,
                tpm: Some(6_000),
                concurrency: Some(1),
                ..Limits::default()
            },
            0,
            1.0,
        );
        assert!(p.try_acquire(50, 0));
        assert_eq!(p.ready_in_ms(1, 0), None);
        // The request used 100 tokens, not 50: the bucket (100) is now empty.
        p.release(50, Some(100), 0);
        assert_eq!(p.ready_in_ms(1, 0), Some(10));
    }

    #[test]
    fn a_request_larger_than_the_bucket_waits_for_a_full_bucket() {
        let mut p = ProviderLimiter::with_pacing(
            &Limits {
                rpm: None,
                tpm: Some(600),
                concurrency: None,
                ..Limits::default()
            },
            0,
            1.0,
        );
        assert!(p.try_acquire(500, 0)); // bucket of 10 → debt of 490
        assert_eq!(p.ready_in_ms(500, 0), Some(50_000));
    }

    #[test]
    fn a_huge_request_leaves_at_most_a_minute_of_debt() {
        let mut p = ProviderLimiter::with_pacing(
            &Limits {
                tpm: Some(600),
                ..Limits::default()
            },
            0,
            1.0,
        );
        assert!(p.try_acquire(u64::MAX, 0));
        // 600 tokens of debt (a minute), then the bucket of 10 refills: 61 s.
        assert_eq!(p.ready_in_ms(10, 0), Some(61_000));
        p.release(u64::MAX, Some(u64::MAX), 0);
        assert_eq!(p.ready_in_ms(10, 0), Some(61_000));
        // Refunds still work.
        p.release(u64::MAX, Some(0), 0);
        assert_eq!(p.ready_in_ms(10, 0), Some(0));
    }

    #[test]
    fn a_daily_limit_stops_requests_for_the_rest_of_the_day() {
        let limits = Limits {
            rpd: Some(3),
            ..Limits::default()
        };
        let mut p = ProviderLimiter::with_pacing(&limits, 0, 1.0);
        for _ in 0..3 {
            assert!(p.try_acquire(1, 0));
            p.release(1, Some(1), 0);
        }
        assert!(!p.try_acquire(1, 1000));
        // One request's worth comes back after a third of a day.
        assert_eq!(p.ready_in_ms(1, 1000), Some(28_800_000 - 1000));
    }

    #[test]
    fn a_model_limit_applies_on_top_of_its_providers() {
        use crate::domain::pricing::{Catalog, Endpoint, Model, Price, ProviderInfo};
        let provider = ProviderInfo {
            name: "p".into(),
            region: None,
            markup: 0.0,
            windows: vec![],
            limits: Limits {
                rpm: Some(6000),
                ..Limits::default()
            },
            simulated: true,
            wire: Default::default(),
        };
        let model = |name: &str, limits| Model {
            cached_input_per_mtok: None,
            cache_write_per_mtok: None,
            provider: 0,
            name: name.into(),
            list: Price {
                input_per_mtok: 1.0,
                output_per_mtok: 1.0,
            },
            windows: vec![],
            endpoints: [Endpoint::ChatCompletions].into_iter().collect(),
            limits,
        };
        let catalog = Catalog {
            providers: vec![provider],
            models: vec![
                model(
                    "limited",
                    Some(Limits {
                        concurrency: Some(1),
                        ..Limits::default()
                    }),
                ),
                model("free", None),
            ],
            classes: Default::default(),
        };
        let mut l = RateLimits::for_catalog(&catalog, 0);
        assert!(l.try_acquire(0, 0, 1, 0));
        assert!(
            !l.try_acquire(0, 0, 1, 0),
            "the model's concurrency cap is 1"
        );
        assert!(
            l.try_acquire(0, 1, 1, 0),
            "the provider still has room for other models"
        );
        l.release(0, 0, 1, Some(1), 0);
        assert!(l.try_acquire(0, 0, 1, 0));
    }

    #[test]
    fn the_global_cap_holds_over_providers_without_limits() {
        let mut l = RateLimits::new([Limits::default(), Limits::default()], 0).with_cap(3);
        assert_eq!(l.startable_now(0, usize::MAX, 0), 3);
        assert!(l.try_acquire(0, usize::MAX, 1, 0));
        assert!(l.try_acquire(1, usize::MAX, 1, 0));
        assert!(l.try_acquire(1, usize::MAX, 1, 0));
        assert!(!l.try_acquire(0, usize::MAX, 1, 0), "3 in flight over both");
        assert_eq!(l.startable_now(0, usize::MAX, 0), 0);
        // Full: an answer frees it, not time.
        assert_eq!(l.ready_in_ms(0, usize::MAX, 1, 0), None);
        l.release(1, usize::MAX, 1, Some(1), 0);
        assert_eq!(l.in_flight(), 2);
        assert!(l.try_acquire(0, usize::MAX, 1, 0));
        // A reload carries the total; a request of a removed provider ends.
        let mut after = RateLimits::new([Limits::default()], 0).with_cap(3);
        after.carry_in_flight(l.in_flight());
        assert!(!after.try_acquire(0, usize::MAX, 1, 0));
        after.release_gone();
        assert!(after.try_acquire(0, usize::MAX, 1, 0));
    }

    #[test]
    fn the_default_limiter_paces_just_under_the_limit() {
        let limits = Limits {
            rpm: Some(6000),
            ..Limits::default()
        };
        let mut p = ProviderLimiter::new(&limits, 0);
        let mut sent = 0;
        let mut now = 0;
        while now < 60_000 {
            if p.try_acquire(1, now) {
                sent += 1;
                p.release(1, Some(1), now);
            } else {
                now += p.ready_in_ms(1, now).unwrap().max(1);
            }
        }
        // 99% of 6,000, plus the initial one-second burst (99).
        assert!((5940..=6040).contains(&sent), "{sent}");
    }
}
