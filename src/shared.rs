//! The handle every component of a running daemon holds: the queue, the
//! reloadable configuration, the metrics, and the two notifications that
//! tie the stages together. One cheap clone instead of loose `Arc`s, so a
//! component's signature says "a part of this daemon", and adding a shared
//! piece does not change every constructor.

use std::sync::Arc;

use tokio::sync::{Notify, watch};

use crate::config::Config;
use crate::config::live::LiveRx;
use crate::store::Store;
use crate::store::coord::Coordination;
use crate::telemetry::Telemetry;

#[derive(Clone)]
pub struct Shared {
    /// The durable queue (SQLite): every state change one transaction.
    pub store: Arc<Store>,
    /// Providers, prices, limits, classes and budgets in force; SIGHUP
    /// replaces them ([`crate::config::live`]).
    pub live: LiveRx,
    /// Metrics and the dispatcher's published view (plan, health).
    pub telemetry: Arc<Telemetry>,
    /// Jobs were queued or cancelled: the dispatcher looks again now.
    pub wake: Arc<Notify>,
    /// Jobs became final: the outbox writes what is complete.
    pub finished: Arc<Notify>,
    /// This daemon's place among those sharing the queue, as the last
    /// heartbeat found it (on SQLite: alone, and the planner).
    pub coordination: Arc<watch::Sender<Coordination>>,
}

impl Shared {
    /// A handle on `store` following `live`, with fresh telemetry and
    /// notifications.
    pub fn new(store: Arc<Store>, live: LiveRx) -> Shared {
        Shared {
            store,
            live,
            telemetry: Arc::new(Telemetry::new()),
            wake: Arc::new(Notify::new()),
            finished: Arc::new(Notify::new()),
            coordination: Arc::new(watch::Sender::new(Coordination {
                planner: true,
                live: 1,
                latest_source: 0,
            })),
        }
    }

    /// A handle whose configuration never changes (tools and benchmarks).
    pub fn fixed(store: Arc<Store>, config: &Config) -> Shared {
        Shared::new(store, crate::config::live::channel(config).1)
    }
}
