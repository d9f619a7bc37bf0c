//! What the daemon tells the outside about itself: Prometheus metrics
//! (`GET /metrics`), the dispatcher's live view of each provider (health,
//! pauses, use of each limit, budgets) and the plan it follows (for
//! `GET /v1/providers`, `GET /v1/plan` and the explanations of
//! `GET /v1/jobs/{id}`). The dispatcher writes; the HTTP API reads.
//!
//! Counters live here; gauges that describe the queue (jobs by state,
//! queue depth per class) are set from SQLite when a scrape asks for them.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BatchStateLabel {
    pub provider: String,
    /// prepared | creating | submitted | cancelling | done | failed
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DaemonLabel {
    pub backend: String,
    /// `[daemon] node` on a shared queue, empty on SQLite.
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub provider: String,
    /// succeeded | retried | failed | provider_disabled
    pub outcome: String,
}

type UsdCounter = Counter<f64, AtomicU64>;

/// The metrics, registered once.
pub struct Telemetry {
    registry: Registry,
    pub jobs: Family<StateLabel, Gauge>,
    pub queued_by_class: Family<ClassLabel, Gauge>,
    /// 1, labelled with this daemon's backend and node.
    pub daemon: Family<DaemonLabel, Gauge>,
    /// 1 while this daemon plans the queue (always on SQLite).
    pub planner: Gauge,
    /// Daemons sharing the queue whose heartbeat is recent.
    pub daemons: Gauge,
    /// Provider batches (the batch channel) by provider and state.
    pub provider_batches: Family<BatchStateLabel, Gauge>,
    pub planned_now: Family<ProviderLabel, Gauge>,
    pub requests: Family<OutcomeLabel, Counter>,
    pub rate_limited: Family<ProviderLabel, Counter>,
    pub pauses: Family<ProviderLabel, Counter>,
    /// 0 closed, 1 open, 2 half-open, 3 disabled.
    pub circuit: Family<ProviderLabel, Gauge>,
    pub latency: Family<ProviderLabel, Histogram>,
    pub input_tokens: Family<ProviderLabel, Counter>,
    pub output_tokens: Family<ProviderLabel, Counter>,
    pub spend_usd: Family<ProviderLabel, UsdCounter>,
    pub list_usd: Family<ProviderLabel, UsdCounter>,
    pub savings_usd: Family<ProviderLabel, UsdCounter>,
    /// The dispatcher's description of each provider's health.
    health: Mutex<BTreeMap<String, String>>,
    /// The dispatcher's last plan, as it follows it.
    plan: Mutex<Option<Arc<PublishedPlan>>>,
    /// The dispatcher's last live view of every provider. Its type belongs
    /// to the dispatcher (`dispatch::live::LiveView`), which stands above
    /// this module: held here as `Any`, so telemetry needs no import of it.
    live: Mutex<Option<Arc<dyn std::any::Any + Send + Sync>>>,
}

/// A plan the dispatcher made and follows: the queue's groups, the LP's
/// allocations, and the catalog and provider capacities (observed latency,
/// success rate, token ratio, health and budget) it was made with.
#[derive(Debug)]
pub struct PublishedPlan {
    pub queue: crate::plan::QueuePlan,
    pub catalog: Arc<crate::domain::pricing::Catalog>,
    pub capacities: Vec<crate::plan::ProviderCapacity>,
    /// Observed output tokens ÷ expected, by route key.
    pub output_scale: std::collections::HashMap<String, f64>,
    /// Per provider: what its tightest budget has left in the current
    /// period (USD), `None` if no budget applies.
    pub budget_remaining_usd: Vec<Option<f64>>,
}

impl Default for Telemetry {
    fn default() -> Telemetry {
        Telemetry::new()
    }
}

impl Telemetry {
    pub fn new() -> Telemetry {
        let mut registry = Registry::with_prefix("nightshift");
        let t = Telemetry {
            jobs: Family::default(),
            queued_by_class: Family::default(),
            daemon: Family::default(),
            planner: Gauge::default(),
            daemons: Gauge::default(),
            provider_batches: Family::default(),
            planned_now: Family::default(),
            requests: Family::default(),
            rate_limited: Family::default(),
            pauses: Family::default(),
            circuit: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.05, 2.0, 12))
            }),
            input_tokens: Family::default(),
            output_tokens: Family::default(),
            spend_usd: Family::default(),
            list_usd: Family::default(),
            savings_usd: Family::default(),
            health: Mutex::new(BTreeMap::new()),
            plan: Mutex::new(None),
            live: Mutex::new(None),
            registry: Registry::default(),
        };
        registry.register("jobs", "Jobs by state", t.jobs.clone());
        registry.register(
            "daemon",
            "This daemon: its queue's backend and (shared queue) node",
            t.daemon.clone(),
        );
        registry.register(
            "planner",
            "1 while this daemon plans the queue",
            t.planner.clone(),
        );
        registry.register(
            "daemons",
            "Daemons sharing this queue whose heartbeat is recent",
            t.daemons.clone(),
        );
        registry.register(
            "queued_jobs",
            "Queued jobs by requested model or class",
            t.queued_by_class.clone(),
        );
        registry.register(
            "provider_batches",
            "Batches sent to providers' Batch APIs, by provider and state (done: ended and applied; failed: abandoned, its jobs re-queued)",
            t.provider_batches.clone(),
        );
        registry.register(
            "planned_now_jobs",
            "Jobs the current plan starts in its first slot, by provider",
            t.planned_now.clone(),
        );
        registry.register(
            "requests",
            "Provider requests by outcome",
            t.requests.clone(),
        );
        registry.register(
            "rate_limited",
            "HTTP 429 answers from providers",
            t.rate_limited.clone(),
        );
        registry.register(
            "provider_pauses",
            "Times a provider asked nightshift to wait (Retry-After, limit at zero)",
            t.pauses.clone(),
        );
        registry.register(
            "circuit_state",
            "Provider circuit breaker: 0 closed, 1 open, 2 half-open, 3 disabled",
            t.circuit.clone(),
        );
        registry.register(
            "dispatch_latency_seconds",
            "Time from sending a request to its answer",
            t.latency.clone(),
        );
        registry.register(
            "input_tokens",
            "Input tokens reported by providers",
            t.input_tokens.clone(),
        );
        registry.register(
            "output_tokens",
            "Output tokens reported by providers",
            t.output_tokens.clone(),
        );
        registry.register(
            "spend_usd",
            "Actual cost of answered requests (USD)",
            t.spend_usd.clone(),
        );
        registry.register(
            "list_usd",
            "The same requests at the class reference model on arrival (USD)",
            t.list_usd.clone(),
        );
        registry.register(
            "savings_usd",
            "list_usd - spend_usd (USD)",
            t.savings_usd.clone(),
        );
        Telemetry { registry, ..t }
    }

    /// Records the dispatcher's view of a provider's health.
    pub fn set_health(&self, provider: &str, circuit: i64, description: String) {
        self.circuit
            .get_or_create(&ProviderLabel {
                provider: provider.to_string(),
            })
            .set(circuit);
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(provider.to_string(), description);
    }

    /// Publishes the plan the dispatcher now follows.
    pub fn publish_plan(&self, plan: PublishedPlan) {
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(plan));
    }

    /// The dispatcher's last plan, if it has made one.
    pub fn plan(&self) -> Option<Arc<PublishedPlan>> {
        self.plan.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Publishes the dispatcher's live view of every provider (circuit,
    /// pauses, use of each limit, budgets).
    pub fn publish_live<T: std::any::Any + Send + Sync>(&self, view: T) {
        *self.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(view));
    }

    /// The dispatcher's last live view, if it has published one (of type `T`).
    pub fn live<T: std::any::Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let any = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        any.downcast::<T>().ok()
    }

    /// The dispatcher's last description of a provider's health, if any.
    pub fn health(&self, provider: &str) -> Option<String> {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(provider)
            .cloned()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Labels for a provider.
pub fn provider(name: &str) -> ProviderLabel {
    ProviderLabel {
        provider: name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let t = Telemetry::new();
        t.requests
            .get_or_create(&OutcomeLabel {
                provider: "p".into(),
                outcome: "succeeded".into(),
            })
            .inc();
        t.spend_usd.get_or_create(&provider("p")).inc_by(0.25);
        t.latency.get_or_create(&provider("p")).observe(0.3);
        t.set_health("p", 1, "circuit open".into());
        let text = t.render();
        assert!(
            text.contains("nightshift_requests_total{provider=\"p\",outcome=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("nightshift_spend_usd_total{provider=\"p\"} 0.25"),
            "{text}"
        );
        assert!(
            text.contains("nightshift_circuit_state{provider=\"p\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("nightshift_dispatch_latency_seconds_bucket"),
            "{text}"
        );
        assert_eq!(t.health("p").as_deref(), Some("circuit open"));
    }
}
