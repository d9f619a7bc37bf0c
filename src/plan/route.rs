//! The per-request rule: the cheapest effective price *now*.
//!
//! Among a job's eligible models, send it to the one with the lowest
//! estimated cost at this instant, if that provider has capacity. When the
//! cheapest provider is busy the job waits for it, unless it is `urgent`, in
//! which case it spills to the cheapest provider that can take it now.
//!
//! This is what a per-request cost router does; the simulator runs it as the
//! `cheapest-now` policy to measure the planner against.

use chrono::{DateTime, Utc};

use crate::domain::estimate::TokenEstimate;
use crate::domain::pricing::{Catalog, ModelId, ProviderId};

/// What to do with a due job now.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send it to this model; `estimated_cost` in USD includes markup.
    Send { model: ModelId, estimated_cost: f64 },
    /// Leave it queued: the provider it should go to has no capacity now.
    Wait,
    /// Every eligible model costs more than the job's `max_cost_usd`.
    TooExpensive { cheapest: f64 },
}

/// Eligible models ordered by estimated cost at `now`, cheapest first (ties
/// keep the candidates' order, i.e. the class order).
pub fn by_cost_at(
    catalog: &Catalog,
    candidates: &[ModelId],
    estimate: TokenEstimate,
    now: DateTime<Utc>,
) -> Vec<(ModelId, f64)> {
    let mut priced: Vec<(ModelId, f64)> = candidates
        .iter()
        .map(|&m| (m, catalog.cost_at(m, now, estimate.input, estimate.output)))
        .collect();
    priced.sort_by(|a, b| a.1.total_cmp(&b.1));
    priced
}

/// Decides where a due job goes. `try_take` asks the rate limiter for
/// capacity on a provider (and takes it when it answers true). `urgent` says
/// the job's deadline is too close to wait for the cheapest provider.
pub fn route(
    catalog: &Catalog,
    candidates: &[ModelId],
    estimate: TokenEstimate,
    max_cost_usd: Option<f64>,
    now: DateTime<Utc>,
    urgent: bool,
    mut try_take: impl FnMut(ProviderId) -> bool,
) -> Decision {
    let priced = by_cost_at(catalog, candidates, estimate, now);
    let affordable: Vec<(ModelId, f64)> = priced
        .iter()
        .copied()
        .filter(|&(_, c)| max_cost_usd.is_none_or(|max| c <= max))
        .collect();
    if affordable.is_empty() {
        return Decision::TooExpensive {
            cheapest: priced.first().map_or(0.0, |p| p.1),
        };
    }
    let tries = if urgent { affordable.len() } else { 1 };
    for &(model, estimated_cost) in affordable.iter().take(tries) {
        if try_take(catalog.models[model].provider) {
            return Decision::Send {
                model,
                estimated_cost,
            };
        }
    }
    Decision::Wait
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn cheapest_now_follows_deepseek_off_peak() {
        let c = Config::embedded_default();
        let cand = c
            .catalog
            .resolve(
                "cheap-chat",
                crate::domain::pricing::Endpoint::ChatCompletions,
            )
            .unwrap();
        // A per-request router: the synchronous rows (the class's batch
        // rows are the planner's).
        let mut cand = cand;
        cand.models.retain(|&m| !c.catalog.is_batch(m));
        let est = TokenEstimate {
            input: 1000,
            output: 1000,
        };
        // Tuesday 02:00 UTC is DeepSeek peak: 0.30/1.20 loses to gpt-4o-mini 0.15/0.60.
        let peak = by_cost_at(&c.catalog, &cand.models, est, at("2026-11-24T02:00:00Z"));
        assert_eq!(c.catalog.qualified_name(peak[0].0), "openai/gpt-4o-mini");
        // Price order is total: every later entry costs at least as much.
        assert!(peak.windows(2).all(|w| w[0].1 <= w[1].1));
        // Tuesday 12:00 is off-peak: half price ties gpt-4o-mini, and the class
        // order breaks the tie in DeepSeek's favour.
        let off = by_cost_at(&c.catalog, &cand.models, est, at("2026-11-24T12:00:00Z"));
        assert_eq!(
            c.catalog.qualified_name(off[0].0),
            "deepseek/deepseek-flash"
        );
        assert_eq!(off[0].1, off[1].1);
    }

    #[test]
    fn busy_cheapest_provider_means_wait_unless_urgent() {
        let c = Config::embedded_default();
        let cand = c
            .catalog
            .resolve(
                "cheap-chat",
                crate::domain::pricing::Endpoint::ChatCompletions,
            )
            .unwrap();
        let est = TokenEstimate {
            input: 100,
            output: 100,
        };
        let now = at("2026-11-24T12:00:00Z");
        let cheapest = by_cost_at(&c.catalog, &cand.models, est, now)[0].0;
        let busy = c.catalog.models[cheapest].provider;
        let d = route(&c.catalog, &cand.models, est, None, now, false, |p| {
            p != busy
        });
        assert_eq!(d, Decision::Wait);
        let d = route(&c.catalog, &cand.models, est, None, now, true, |p| {
            p != busy
        });
        assert!(
            matches!(d, Decision::Send { model, .. } if c.catalog.models[model].provider != busy)
        );
    }

    #[test]
    fn max_cost_excludes_expensive_models() {
        let c = Config::embedded_default();
        let cand = c
            .catalog
            .resolve(
                "smart-chat",
                crate::domain::pricing::Endpoint::ChatCompletions,
            )
            .unwrap();
        let est = TokenEstimate {
            input: 1_000_000,
            output: 0,
        };
        let d = route(
            &c.catalog,
            &cand.models,
            est,
            Some(0.01),
            at("2026-11-24T12:00:00Z"),
            false,
            |_| true,
        );
        assert!(matches!(d, Decision::TooExpensive { cheapest } if cheapest > 0.01));
    }
}
