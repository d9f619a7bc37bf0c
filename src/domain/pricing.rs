//! Prices as a pure function of time.
//!
//! A [`Catalog`] holds providers, their models with list prices, the price
//! windows that change those prices at certain times, and the model classes
//! jobs ask for. Nothing here does IO or reads the clock: every function takes
//! the instant it is asked about, so the daemon (real time) and tests or a
//! simulator (virtual time) share the same arithmetic.
//!
//! Units: prices are USD per 1,000,000 tokens; costs are USD; instants are UTC.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{
    DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Timelike, Utc, Weekday,
};
use chrono_tz::Tz;

/// Index of a provider in [`Catalog::providers`].
pub type ProviderId = usize;
/// Index of a model in [`Catalog::models`].
pub type ModelId = usize;

/// The request kinds nightshift can dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
}

impl Endpoint {
    /// The OpenAI batch `url` of this endpoint.
    pub fn as_url(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }

    /// Parses an OpenAI batch `url`.
    pub fn from_url(url: &str) -> Option<Endpoint> {
        match url {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        }
    }
}

/// Prices in USD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl Price {
    fn scaled(self, factor: f64) -> Price {
        Price {
            input_per_mtok: self.input_per_mtok * factor,
            output_per_mtok: self.output_per_mtok * factor,
        }
    }

    /// This price × `factor` (a flex discount).
    pub fn scaled_by(self, factor: f64) -> Price {
        self.scaled(factor)
    }

    /// Cost in USD of `input` and `output` tokens at this price, before markup.
    pub fn cost(self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.input_per_mtok + output_tokens as f64 * self.output_per_mtok)
            / 1_000_000.0
    }
}

/// What a matching price window does to the list price.
#[derive(Debug, Clone, PartialEq)]
pub enum WindowEffect {
    /// List price × this factor (0.5 = half price).
    Multiplier(f64),
    /// These prices instead of the list price.
    Prices(Price),
}

/// A daily time range in minutes since local midnight, `[start, end)`.
/// `start > end` crosses midnight and belongs to the day it starts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyRange {
    pub start_minute: u32,
    pub end_minute: u32,
}

/// A recurring or absolute period during which a price applies.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceWindow {
    pub name: String,
    /// Weekdays (of the local start day) on which the window applies,
    /// indexed Monday = 0.
    pub days: [bool; 7],
    /// Daily ranges; empty means the whole day.
    pub hours: Vec<DailyRange>,
    pub timezone: Tz,
    /// If set, the window applies only on these local dates (holidays).
    pub dates: Option<BTreeSet<NaiveDate>>,
    /// The window never applies on these local dates.
    pub except_dates: BTreeSet<NaiveDate>,
    /// If set, the window applies only within `[start, end)`.
    pub absolute: Option<(DateTime<Utc>, DateTime<Utc>)>,
    pub effect: WindowEffect,
}

impl PriceWindow {
    /// A window that always applies (used for tests and simple configs).
    pub fn always(name: &str, effect: WindowEffect) -> PriceWindow {
        PriceWindow {
            name: name.to_string(),
            days: [true; 7],
            hours: Vec::new(),
            timezone: Tz::UTC,
            dates: None,
            except_dates: BTreeSet::new(),
            absolute: None,
            effect,
        }
    }

    fn day_applies(&self, date: NaiveDate) -> bool {
        self.days[date.weekday().num_days_from_monday() as usize]
            && self.dates.as_ref().is_none_or(|d| d.contains(&date))
            && !self.except_dates.contains(&date)
    }

    /// Whether the window applies at instant `t`.
    pub fn applies_at(&self, t: DateTime<Utc>) -> bool {
        if let Some((start, end)) = self.absolute
            && !(start <= t && t < end)
        {
            return false;
        }
        let local = t.with_timezone(&self.timezone);
        let date = local.date_naive();
        let minute = local.hour() * 60 + local.minute();
        if self.hours.is_empty() {
            return self.day_applies(date);
        }
        self.hours.iter().any(|r| {
            if r.start_minute < r.end_minute {
                r.start_minute <= minute && minute < r.end_minute && self.day_applies(date)
            } else {
                (minute >= r.start_minute && self.day_applies(date))
                    || (minute < r.end_minute
                        && date.pred_opt().is_some_and(|d| self.day_applies(d)))
            }
        })
    }

    /// Instants after `t` (within `horizon`) at which this window may open or
    /// close. A superset of the real changes; callers filter by price.
    fn boundaries_after(&self, t: DateTime<Utc>, horizon: Duration, out: &mut Vec<DateTime<Utc>>) {
        let end = t + horizon;
        if let Some((s, e)) = self.absolute {
            for b in [s, e] {
                if b > t && b <= end {
                    out.push(b);
                }
            }
        }
        let first = t.with_timezone(&self.timezone).date_naive();
        let days = horizon.num_days() + 2;
        for offset in 0..=days {
            let Some(date) = first.checked_add_signed(Duration::days(offset)) else {
                continue;
            };
            let mut minutes = vec![0u32];
            for r in &self.hours {
                minutes.push(r.start_minute);
                minutes.push(r.end_minute % 1440);
            }
            for m in minutes {
                let Some(time) = NaiveTime::from_hms_opt(m / 60, m % 60, 0) else {
                    continue;
                };
                if let Some(b) = local_to_utc(self.timezone, date.and_time(time))
                    && b > t
                    && b <= end
                {
                    out.push(b);
                }
            }
        }
    }
}

/// Maps a local wall-clock time to UTC. In a DST gap (the time does not exist)
/// it yields the first instant after the gap; when ambiguous, the earlier one.
fn local_to_utc(tz: Tz, local: chrono::NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&local) {
        chrono::LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        chrono::LocalResult::Ambiguous(a, _) => Some(a.with_timezone(&Utc)),
        chrono::LocalResult::None => {
            // Gaps are at most a few hours; step forward a minute at a time.
            (1..=180).find_map(|m| {
                tz.from_local_datetime(&(local + Duration::minutes(m)))
                    .earliest()
                    .map(|t| t.with_timezone(&Utc))
            })
        }
    }
}

/// The day mask of a list of weekdays.
pub fn weekday_set(days: &[Weekday]) -> [bool; 7] {
    let mut set = [false; 7];
    for d in days {
        set[d.num_days_from_monday() as usize] = true;
    }
    set
}

/// All seven weekdays, Monday first.
pub const ALL_DAYS: [Weekday; 7] = [
    Weekday::Mon,
    Weekday::Tue,
    Weekday::Wed,
    Weekday::Thu,
    Weekday::Fri,
    Weekday::Sat,
    Weekday::Sun,
];

/// The tokens a provider billed for one request. `input_tokens` is every
/// input token; `cached_input_tokens` (read from the prompt cache) and
/// `cache_write_tokens` (written to it) are parts of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Billed {
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
}

/// Rate limits of a provider; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    /// Requests per day (a rolling 24 hours).
    pub rpd: Option<u32>,
    pub concurrency: Option<u32>,
    /// Fraction of rpm and tpm nightshift leaves unused, for interactive
    /// traffic that shares the same API key (0.0 to 0.9).
    pub reserve: f64,
}

/// nightshift paces its requests at 99% of a per-minute limit: requests
/// leave evenly spaced but reach the provider with network jitter, and a
/// provider that enforces "per minute" over one-second windows would refuse
/// the few that arrive bunched at exactly 100%. The pace is the smoothing
/// bucket's; the windows, which are the guarantee, count the whole limit
/// (see [`window_limit`]) and hold each send [`ARRIVAL_MARGIN_MS`] longer.
pub const PACING: f64 = 0.99;

/// A minute, the window of `rpm` and `tpm`.
pub const MINUTE_MS: i64 = 60_000;
/// A day, the window of `rpd`.
pub const DAY_MS: i64 = 86_400_000;

/// How much longer than its window a send counts in the limiter: a send
/// stamped at `at` counts over `[at, at + window + ARRIVAL_MARGIN_MS)`.
///
/// The provider counts a request when it arrives, not when the limiter
/// stamped it, and the delay between the two differs from request to
/// request: the first requests after a start open connections (7 ms from
/// stamp to arrival, where later ones take 3 ms), a loaded machine
/// schedules the sending task late, and a restarted daemon's windows are
/// seeded with the store's stamps, taken before its transaction committed.
/// Were a send's slot free again at exactly stamp + 60 s, the requests
/// sent then could arrive less than 60 s after it did, and the provider
/// would count both in one minute (301 of rpm 300 after a window opened).
/// Holding each send a second longer keeps the provider-side count within
/// the limit as long as arrival delays differ by less than that; it costs
/// under 2% of the allowance of a limit that stays saturated.
pub const ARRIVAL_MARGIN_MS: i64 = 1_000;

/// What a limiter's window admits of a configured rpm, tpm or rpd: the
/// whole limit less the reserve, in whole units, at least one. Jitter is
/// absorbed by [`ARRIVAL_MARGIN_MS`], not by a smaller count: at rpm 25 a
/// count of 99% would round down to 24, a 4% loss.
pub fn window_limit(limit: f64, reserve: f64) -> u64 {
    let usable = 1.0 - reserve.clamp(0.0, 0.9);
    ((limit * usable).floor().max(0.0) as u64).max(1)
}

/// The rate a per-minute limit sustains through the limiter, per minute,
/// once a backlog has drained its first second's allowance: the bucket's
/// pace ([`PACING`]) or the window's count over the span it holds each
/// send, whichever is lower. What the planner counts on a minute to carry.
pub fn sustained_per_minute(limit: f64, reserve: f64) -> f64 {
    let usable = 1.0 - reserve.clamp(0.0, 0.9);
    let held = (MINUTE_MS + ARRIVAL_MARGIN_MS) as f64 / MINUTE_MS as f64;
    (limit * usable * PACING).min(window_limit(limit, reserve) as f64 / held)
}

/// The wire format a provider speaks, where it decides what a job may ask
/// for: a job whose body has no Anthropic translation does not run there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Wire {
    /// OpenAI's chat completions and embeddings (also every simulated provider).
    #[default]
    OpenAi,
    /// Anthropic's Messages API (`kind = "anthropic"`).
    Anthropic,
}

/// How a request reaches a model: the provider's standard synchronous API,
/// the same API at a discount with `"service_tier": "flex"` (slower, and
/// the provider may refuse it when short of capacity), or the provider's
/// asynchronous Batch API (about half price; nothing comes back until the
/// batch ends, promised within its completion window). Result lines and
/// reports name it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    #[default]
    Sync,
    Flex,
    Batch,
}

impl Channel {
    /// The name in result lines, the store and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Sync => "sync",
            Channel::Flex => "flex",
            Channel::Batch => "batch",
        }
    }

    pub fn parse(s: &str) -> Option<Channel> {
        match s {
            "sync" => Some(Channel::Sync),
            "flex" => Some(Channel::Flex),
            "batch" => Some(Channel::Batch),
            _ => None,
        }
    }
}

/// A provider's flex channel (`[providers.flex]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlexTerms {
    /// Flex price = standard price × this, where a model sets no flex prices.
    pub discount: f64,
    /// Per-request timeout of a flex request (flex answers take longer).
    pub timeout: std::time::Duration,
    /// After a flex refusal (429 `resource_unavailable`), flex is not used
    /// on this provider for this long; its standard channel is unaffected.
    pub backoff: std::time::Duration,
    /// Simulated providers: the fraction of flex requests refused (429
    /// `resource_unavailable`).
    pub simulated_refusal_fraction: f64,
}

/// A provider's batch channel (`[providers.batch]`): its asynchronous Batch
/// API (OpenAI's files + batches, Anthropic's Message Batches).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchTerms {
    /// Batch price = standard price × this, where a model sets no batch prices.
    pub discount: f64,
    /// What the provider promises (`completion_window`, sent as written).
    pub completion_window: String,
    /// The same, as a duration: a batch not ended by then has expired.
    pub window: std::time::Duration,
    /// The planner's prior for how long a batch takes, before any has ended
    /// (then a high quantile of what was observed).
    pub expected_turnaround: std::time::Duration,
    /// Requests per batch at most.
    pub max_requests: u32,
    /// Bytes of requests per batch at most.
    pub max_bytes: u64,
    /// How often an open batch is polled (backing off while it runs).
    pub poll_every: std::time::Duration,
    /// Simulated providers: a batch's turnaround is drawn uniformly from
    /// `[from, to]` (`nightshift simulate`).
    pub simulated_turnaround: (std::time::Duration, std::time::Duration),
    /// Simulated providers: the fraction of batches that take the whole
    /// completion window (they come back late and trip the deadline guard).
    pub simulated_late_fraction: f64,
    /// Simulated providers: the fraction of batches the provider expires at
    /// the end of the completion window, with a drawn share (possibly all)
    /// of their lines not run.
    pub simulated_expire_fraction: f64,
}

/// What the router needs to know about a provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderInfo {
    pub name: String,
    pub region: Option<String>,
    /// Added on top of every price: 0.1 = +10%.
    pub markup: f64,
    pub windows: Vec<PriceWindow>,
    pub limits: Limits,
    /// Whether requests are answered in-process by the simulator.
    pub simulated: bool,
    pub wire: Wire,
    /// Its flex channel, if it has one.
    pub flex: Option<FlexTerms>,
    /// Its batch channel, if it has one.
    pub batch: Option<BatchTerms>,
}

/// A model offered by a provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub provider: ProviderId,
    /// The model id sent to the provider's API.
    pub name: String,
    pub list: Price,
    /// List price of input tokens read from the provider's prompt cache
    /// (`None`: the input price).
    pub cached_input_per_mtok: Option<f64>,
    /// List price of input tokens written to the prompt cache (Anthropic's
    /// `cache_creation_input_tokens`; `None`: the input price).
    pub cache_write_per_mtok: Option<f64>,
    /// Checked before the provider's windows; the first match wins.
    pub windows: Vec<PriceWindow>,
    pub endpoints: BTreeSet<Endpoint>,
    /// Limits of this model on top of its provider's (rpm, tpm, rpd,
    /// concurrency), where the provider sets them per model. A flex row
    /// shares its standard row's (see [`Model::standard`]).
    pub limits: Option<Limits>,
    /// The channel this row sells the model on. A flex or batch row is a
    /// copy of the standard row (same provider, same wire name) at the flex
    /// or batch price.
    pub channel: Channel,
    /// For a flex or batch row: the standard row of the same model (the
    /// fallback when flex refuses a request or a batch comes back late; a
    /// flex row shares its model limits, a batch row has none: batches do
    /// not count against the synchronous rpm and tpm).
    pub standard: Option<ModelId>,
}

/// Providers, models, price windows and model classes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    pub providers: Vec<ProviderInfo>,
    pub models: Vec<Model>,
    /// Class name → interchangeable models; the first is the reference model.
    pub classes: BTreeMap<String, Vec<ModelId>>,
}

/// Why a requested model name cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("unknown model or class '{0}'")]
    Unknown(String),
    #[error("'{model}' does not serve {endpoint}")]
    WrongEndpoint {
        model: String,
        endpoint: &'static str,
    },
}

/// The models a job may run on, and the one its list cost refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    pub models: Vec<ModelId>,
    pub reference: ModelId,
}

impl Catalog {
    /// The most tokens one request to `model` may carry: its provider's and
    /// its own `tpm` (a request above a per-minute token limit can never be
    /// sent within it); `None` if neither sets one.
    pub fn max_request_tokens(&self, model: ModelId) -> Option<u64> {
        let m = &self.models[model];
        let own = self.models[self.limits_row(model)]
            .limits
            .and_then(|l| l.tpm);
        let provider = self.providers[m.provider].limits.tpm;
        match (own, provider) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether a request of `tokens` fits `model`'s token limits.
    pub fn request_fits(&self, model: ModelId, tokens: u64) -> bool {
        self.max_request_tokens(model)
            .is_none_or(|max| tokens <= max)
    }

    /// The provider called `name`.
    pub fn provider_id(&self, name: &str) -> Option<ProviderId> {
        self.providers.iter().position(|p| p.name == name)
    }

    /// The model called `provider/model`.
    pub fn model_id(&self, qualified: &str) -> Option<ModelId> {
        (0..self.models.len()).find(|&m| self.qualified_name(m) == qualified)
    }

    /// `provider/model` for display; a flex row is `provider/model@flex`.
    pub fn qualified_name(&self, model: ModelId) -> String {
        let m = &self.models[model];
        match m.channel {
            Channel::Sync => format!("{}/{}", self.providers[m.provider].name, m.name),
            c => format!(
                "{}/{}@{}",
                self.providers[m.provider].name,
                m.name,
                c.as_str()
            ),
        }
    }

    /// A flex row for the standard row `standard` at list price `price`:
    /// the same provider, wire name and windows; cached prices scaled like
    /// the input price; chat completions only.
    pub fn flex_row(&self, standard: ModelId, price: Price) -> Model {
        let m = &self.models[standard];
        let scale = ratio(price.input_per_mtok, m.list.input_per_mtok);
        Model {
            provider: m.provider,
            name: m.name.clone(),
            list: price,
            cached_input_per_mtok: m.cached_input_per_mtok.map(|p| p * scale),
            cache_write_per_mtok: m.cache_write_per_mtok.map(|p| p * scale),
            windows: m.windows.clone(),
            endpoints: [Endpoint::ChatCompletions].into_iter().collect(),
            limits: None,
            channel: Channel::Flex,
            standard: Some(standard),
        }
    }

    /// A batch row for the standard row `standard` at list price `price`:
    /// like [`Catalog::flex_row`], with the standard row's endpoints (an
    /// OpenAI-style Batch API also takes embeddings).
    pub fn batch_row(&self, standard: ModelId, price: Price) -> Model {
        Model {
            endpoints: self.models[standard].endpoints.clone(),
            channel: Channel::Batch,
            ..self.flex_row(standard, price)
        }
    }

    /// The flex row of `standard`, if its provider offers it on flex.
    pub fn flex_of(&self, standard: ModelId) -> Option<ModelId> {
        self.channel_row(standard, Channel::Flex)
    }

    /// The batch row of `standard`, if its provider offers it in batches.
    pub fn batch_of(&self, standard: ModelId) -> Option<ModelId> {
        self.channel_row(standard, Channel::Batch)
    }

    fn channel_row(&self, standard: ModelId, channel: Channel) -> Option<ModelId> {
        self.models
            .iter()
            .position(|m| m.standard == Some(standard) && m.channel == channel)
    }

    /// Whether `model` is a batch row (planned and sent in batches, outside
    /// the synchronous rate limits).
    pub fn is_batch(&self, model: ModelId) -> bool {
        self.models[model].channel == Channel::Batch
    }

    /// The row whose model limits `model` uses: its standard row for a flex
    /// row, else itself.
    pub fn limits_row(&self, model: ModelId) -> ModelId {
        self.models[model].standard.unwrap_or(model)
    }

    /// Resolves what a job asks for — a class, a model name offered by one or
    /// more providers, or `provider/model` — to the models that serve `endpoint`.
    pub fn resolve(&self, requested: &str, endpoint: Endpoint) -> Result<Candidates, ResolveError> {
        let all: Vec<ModelId> = if let Some(models) = self.classes.get(requested) {
            models.clone()
        } else if let Some((provider, model)) = requested.split_once('/') {
            self.models
                .iter()
                .enumerate()
                .filter(|(_, m)| m.name == model && self.providers[m.provider].name == provider)
                .map(|(i, _)| i)
                .collect()
        } else {
            self.models
                .iter()
                .enumerate()
                .filter(|(_, m)| m.name == requested)
                .map(|(i, _)| i)
                .collect()
        };
        if all.is_empty() {
            return Err(ResolveError::Unknown(requested.to_string()));
        }
        let models: Vec<ModelId> = all
            .iter()
            .copied()
            .filter(|&m| self.models[m].endpoints.contains(&endpoint))
            .collect();
        match models.first() {
            Some(&reference) => Ok(Candidates { models, reference }),
            None => Err(ResolveError::WrongEndpoint {
                model: requested.to_string(),
                endpoint: endpoint.as_url(),
            }),
        }
    }

    /// The price window that sets `model`'s price at `t`: the first
    /// matching window of the model, else of its provider; `None`: the list
    /// price applies.
    pub fn window_at(&self, model: ModelId, t: DateTime<Utc>) -> Option<&PriceWindow> {
        let m = &self.models[model];
        m.windows
            .iter()
            .chain(&self.providers[m.provider].windows)
            .find(|w| w.applies_at(t))
    }

    /// The price of `model` at instant `t`, with the markup: what a job pays
    /// per 1M tokens there.
    pub fn price_with_markup_at(&self, model: ModelId, t: DateTime<Utc>) -> Price {
        let markup = self.providers[self.models[model].provider].markup;
        self.price_at(model, t).scaled(1.0 + markup)
    }

    /// The price of `model` at instant `t`: the first matching window of the
    /// model, else of its provider, else the list price. Markup not included.
    pub fn price_at(&self, model: ModelId, t: DateTime<Utc>) -> Price {
        let m = &self.models[model];
        match self.window_at(model, t).map(|w| &w.effect) {
            None => m.list,
            Some(WindowEffect::Multiplier(f)) => m.list.scaled(*f),
            // A window's own prices are the standard channel's; a flex row
            // pays them at its ratio to the standard list price.
            Some(WindowEffect::Prices(p)) => match m.standard.map(|s| self.models[s].list) {
                Some(std) => Price {
                    input_per_mtok: p.input_per_mtok
                        * ratio(m.list.input_per_mtok, std.input_per_mtok),
                    output_per_mtok: p.output_per_mtok
                        * ratio(m.list.output_per_mtok, std.output_per_mtok),
                },
                None => *p,
            },
        }
    }

    /// Cost in USD of running `input`/`output` tokens on `model` at `t`, with the
    /// provider's markup, none of the input cached (estimates).
    pub fn cost_at(
        &self,
        model: ModelId,
        t: DateTime<Utc>,
        input_tokens: u64,
        output_tokens: u64,
    ) -> f64 {
        self.billed_cost_at(
            model,
            t,
            &Billed {
                input_tokens,
                output_tokens,
                ..Billed::default()
            },
        )
    }

    /// Cost in USD of the tokens a provider reported, cache reads and writes
    /// at their own prices, with the provider's markup. This is the one
    /// place a cost is computed.
    ///
    /// A price window changes the cached prices in proportion to the input
    /// price (a multiplier of 0.5 halves them too; a window with its own
    /// prices scales them by its input price over the list input price).
    pub fn billed_cost_at(&self, model: ModelId, t: DateTime<Utc>, b: &Billed) -> f64 {
        let m = &self.models[model];
        let markup = self.providers[m.provider].markup;
        let price = self.price_at(model, t);
        let scale = if m.list.input_per_mtok > 0.0 {
            price.input_per_mtok / m.list.input_per_mtok
        } else {
            1.0
        };
        let cached_price = m
            .cached_input_per_mtok
            .map_or(price.input_per_mtok, |p| p * scale);
        let write_price = m
            .cache_write_per_mtok
            .map_or(price.input_per_mtok, |p| p * scale);
        // Reported counts are capped at the input: a provider's cached
        // count cannot exceed the prompt it belongs to.
        let cached = b.cached_input_tokens.min(b.input_tokens);
        let written = b.cache_write_tokens.min(b.input_tokens - cached);
        let uncached = b.input_tokens - cached - written;
        let usd = (uncached as f64 * price.input_per_mtok
            + cached as f64 * cached_price
            + written as f64 * write_price
            + b.output_tokens as f64 * price.output_per_mtok)
            / 1_000_000.0;
        usd * (1.0 + markup)
    }

    /// The next instant after `t` (within `horizon`) at which the price of any
    /// model changes, if any.
    pub fn next_price_change(&self, t: DateTime<Utc>, horizon: Duration) -> Option<DateTime<Utc>> {
        let mut candidates = Vec::new();
        for w in self
            .providers
            .iter()
            .flat_map(|p| &p.windows)
            .chain(self.models.iter().flat_map(|m| &m.windows))
        {
            w.boundaries_after(t, horizon, &mut candidates);
        }
        candidates.sort();
        candidates.dedup();
        let before: Vec<Price> = (0..self.models.len())
            .map(|m| self.price_at(m, t))
            .collect();
        candidates
            .into_iter()
            .find(|&c| (0..self.models.len()).any(|m| self.price_at(m, c) != before[m]))
    }
}

/// `flex / standard`, 1 where the standard price is zero.
fn ratio(flex: f64, standard: f64) -> f64 {
    if standard > 0.0 { flex / standard } else { 1.0 }
}

/// The token mix used to rank models in price tables and charts: a typical
/// classification or extraction job.
pub const TYPICAL_INPUT: u64 = 1000;
pub const TYPICAL_OUTPUT: u64 = 250;

/// One stretch of time over which a class's cheapest member and its price
/// stay the same.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceStep {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The cheapest member for a job of the given token mix.
    pub model: ModelId,
    /// Its effective price (markup included), USD per 1M tokens.
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// What that job costs there.
    pub job_usd: f64,
}

impl Catalog {
    /// A class's cheapest effective price over `[from, to)` for a job of
    /// `input` / `output` tokens, as steps that change only where some price
    /// window opens or closes. Empty for an unknown class.
    pub fn cheapest_steps(
        &self,
        class: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        input: u64,
        output: u64,
    ) -> Vec<PriceStep> {
        let Some(members) = self.classes.get(class).filter(|m| !m.is_empty()) else {
            return Vec::new();
        };
        let at = |t: DateTime<Utc>| {
            let (m, cost) = members
                .iter()
                .map(|&m| (m, self.cost_at(m, t, input, output)))
                .fold((members[0], f64::INFINITY), |best, x| {
                    if x.1 < best.1 { x } else { best }
                });
            let markup = 1.0 + self.providers[self.models[m].provider].markup;
            let p = self.price_at(m, t);
            PriceStep {
                from: t,
                to,
                model: m,
                input_per_mtok: p.input_per_mtok * markup,
                output_per_mtok: p.output_per_mtok * markup,
                job_usd: cost,
            }
        };
        let mut steps = vec![at(from)];
        let mut t = from;
        while let Some(next) = self.next_price_change(t, to - t).filter(|&n| n < to) {
            let step = at(next);
            let last = steps.last_mut().expect("one step at least");
            if (step.model, step.job_usd) == (last.model, last.job_usd) {
                t = next;
                continue;
            }
            last.to = next;
            steps.push(step);
            t = next;
        }
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn window(days: &[Weekday], hours: &[(u32, u32)], tz: Tz) -> PriceWindow {
        PriceWindow {
            days: weekday_set(days),
            hours: hours
                .iter()
                .map(|&(s, e)| DailyRange {
                    start_minute: s,
                    end_minute: e,
                })
                .collect(),
            timezone: tz,
            ..PriceWindow::always("w", WindowEffect::Multiplier(0.5))
        }
    }

    #[test]
    fn range_crossing_midnight_belongs_to_its_start_day() {
        // Friday 22:00 - 02:00, Fridays only.
        let w = window(&[Weekday::Fri], &[(22 * 60, 2 * 60)], Tz::UTC);
        assert!(w.applies_at(utc("2026-11-27T23:00:00Z"))); // Fri 23:00
        assert!(w.applies_at(utc("2026-11-28T01:59:00Z"))); // Sat 01:59, started Friday
        assert!(!w.applies_at(utc("2026-11-28T02:00:00Z"))); // end is exclusive
        assert!(!w.applies_at(utc("2026-11-27T01:00:00Z"))); // Fri 01:00 belongs to Thursday
        assert!(!w.applies_at(utc("2026-11-28T23:00:00Z"))); // Saturday evening
    }

    #[test]
    fn weekday_boundaries_are_local() {
        // Weekdays 09:00-17:00 in Tokyo (UTC+9).
        let days = [
            Weekday::Mon,
            Weekday::Tue,
            Weekday::Wed,
            Weekday::Thu,
            Weekday::Fri,
        ];
        let w = window(&days, &[(9 * 60, 17 * 60)], chrono_tz::Asia::Tokyo);
        // Monday 2026-11-23 09:30 JST = Monday 00:30 UTC.
        assert!(w.applies_at(utc("2026-11-23T00:30:00Z")));
        // Sunday 2026-11-22 23:30 UTC is Monday 08:30 JST: before opening.
        assert!(!w.applies_at(utc("2026-11-22T23:30:00Z")));
        // Saturday 2026-11-28 10:00 JST = Saturday 01:00 UTC.
        assert!(!w.applies_at(utc("2026-11-28T01:00:00Z")));
    }

    #[test]
    fn dst_shifts_the_utc_instants_of_a_local_window() {
        // 08:00-09:00 New York: 13:00 UTC in winter, 12:00 UTC in summer.
        let w = window(&ALL_DAYS, &[(8 * 60, 9 * 60)], chrono_tz::America::New_York);
        assert!(w.applies_at(utc("2026-01-15T13:30:00Z")));
        assert!(!w.applies_at(utc("2026-01-15T12:30:00Z")));
        assert!(w.applies_at(utc("2026-07-15T12:30:00Z")));
        assert!(!w.applies_at(utc("2026-07-15T13:30:00Z")));
        // The spring-forward day (2026-03-08): the window opens at 12:00 UTC.
        let cat = catalog_with(vec![w], None);
        let change = cat
            .next_price_change(utc("2026-03-08T05:00:00Z"), Duration::hours(24))
            .unwrap();
        assert_eq!(change, utc("2026-03-08T12:00:00Z"));
    }

    #[test]
    fn holiday_dates_are_excluded_and_dates_restrict() {
        let mut w = window(&ALL_DAYS, &[], Tz::UTC);
        w.except_dates
            .insert(NaiveDate::from_ymd_opt(2026, 10, 1).unwrap());
        assert!(!w.applies_at(utc("2026-10-01T12:00:00Z")));
        assert!(w.applies_at(utc("2026-10-02T12:00:00Z")));
        w.dates = Some(
            [NaiveDate::from_ymd_opt(2026, 12, 25).unwrap()]
                .into_iter()
                .collect(),
        );
        assert!(w.applies_at(utc("2026-12-25T00:00:00Z")));
        assert!(!w.applies_at(utc("2026-12-26T00:00:00Z")));
    }

    #[test]
    fn absolute_window_is_half_open() {
        let mut w = PriceWindow::always("promo", WindowEffect::Multiplier(0.1));
        w.absolute = Some((utc("2026-11-24T10:00:00Z"), utc("2026-11-24T11:00:00Z")));
        assert!(!w.applies_at(utc("2026-11-24T09:59:59Z")));
        assert!(w.applies_at(utc("2026-11-24T10:00:00Z")));
        assert!(!w.applies_at(utc("2026-11-24T11:00:00Z")));
    }

    fn catalog_with(
        provider_windows: Vec<PriceWindow>,
        model_window: Option<PriceWindow>,
    ) -> Catalog {
        Catalog {
            providers: vec![ProviderInfo {
                name: "p".into(),
                region: None,
                markup: 0.1,
                windows: provider_windows,
                limits: Limits::default(),
                simulated: true,
                wire: Wire::OpenAi,
                flex: None,
                batch: None,
            }],
            models: vec![Model {
                limits: None,
                cached_input_per_mtok: None,
                cache_write_per_mtok: None,
                provider: 0,
                name: "m".into(),
                list: Price {
                    input_per_mtok: 1.0,
                    output_per_mtok: 4.0,
                },
                windows: model_window.into_iter().collect(),
                endpoints: [Endpoint::ChatCompletions].into_iter().collect(),
                channel: Default::default(),
                standard: None,
            }],
            classes: BTreeMap::new(),
        }
    }

    #[test]
    fn first_matching_window_wins_model_before_provider() {
        let peak = window(&ALL_DAYS, &[(60, 240)], Tz::UTC);
        let peak = PriceWindow {
            effect: WindowEffect::Multiplier(1.0),
            ..peak
        };
        let off = PriceWindow::always("off", WindowEffect::Multiplier(0.5));
        let cat = catalog_with(vec![peak.clone(), off.clone()], None);
        assert_eq!(
            cat.price_at(0, utc("2026-11-24T02:00:00Z")).input_per_mtok,
            1.0
        );
        assert_eq!(
            cat.price_at(0, utc("2026-11-24T05:00:00Z")).input_per_mtok,
            0.5
        );
        // A model window overrides the provider's.
        let explicit = PriceWindow::always(
            "fixed",
            WindowEffect::Prices(Price {
                input_per_mtok: 0.2,
                output_per_mtok: 0.3,
            }),
        );
        let cat = catalog_with(vec![peak, off], Some(explicit));
        assert_eq!(
            cat.price_at(0, utc("2026-11-24T02:00:00Z")).output_per_mtok,
            0.3
        );
    }

    #[test]
    fn cheapest_steps_change_only_where_a_window_changes_the_price() {
        let peak = PriceWindow {
            effect: WindowEffect::Multiplier(1.0),
            ..window(&ALL_DAYS, &[(60, 240)], Tz::UTC)
        };
        let off = PriceWindow::always("off", WindowEffect::Multiplier(0.5));
        let mut cat = catalog_with(vec![peak, off], None);
        cat.classes.insert("c".into(), vec![0]);
        let from = utc("2026-11-24T00:30:00Z");
        let to = utc("2026-11-25T00:30:00Z");
        let steps = cat.cheapest_steps("c", from, to, 1000, 500);
        let spans: Vec<_> = steps.iter().map(|s| (s.from, s.to)).collect();
        assert_eq!(
            spans,
            vec![
                (from, utc("2026-11-24T01:00:00Z")),
                (utc("2026-11-24T01:00:00Z"), utc("2026-11-24T04:00:00Z")),
                (utc("2026-11-24T04:00:00Z"), to),
            ]
        );
        // Off-peak half price, markup included; the job's cost with it.
        assert!((steps[0].input_per_mtok - 0.55).abs() < 1e-12);
        assert!((steps[1].output_per_mtok - 4.4).abs() < 1e-12);
        assert!((steps[1].job_usd - 2.0 * steps[0].job_usd).abs() < 1e-15);
        assert!(cat.cheapest_steps("nope", from, to, 1, 1).is_empty());
    }

    #[test]
    fn cost_includes_markup() {
        let cat = catalog_with(vec![], None);
        // 1000 in × $1/M + 500 out × $4/M = $0.003, +10% markup.
        let c = cat.cost_at(0, utc("2026-11-24T00:00:00Z"), 1000, 500);
        assert!((c - 0.0033).abs() < 1e-12, "{c}");
    }

    #[test]
    fn cached_tokens_cost_their_own_price_through_windows_and_markup() {
        let mut cat = catalog_with(vec![], None);
        let t = utc("2026-11-24T00:00:00Z");
        let usage = Billed {
            input_tokens: 1000,
            cached_input_tokens: 600,
            cache_write_tokens: 100,
            output_tokens: 500,
        };
        // No cached prices: every input token at the input price.
        let c = cat.billed_cost_at(0, t, &usage);
        assert!((c - 0.0033).abs() < 1e-12, "{c}");
        cat.models[0].cached_input_per_mtok = Some(0.1);
        cat.models[0].cache_write_per_mtok = Some(1.25);
        // 300 × $1 + 600 × $0.1 + 100 × $1.25 + 500 × $4 per M, +10%.
        let want = (300.0 + 60.0 + 125.0 + 2000.0) / 1e6 * 1.1;
        let c = cat.billed_cost_at(0, t, &usage);
        assert!((c - want).abs() < 1e-12, "{c} vs {want}");
        // A half-price window halves the cached prices too.
        cat.providers[0].windows = vec![PriceWindow::always("off", WindowEffect::Multiplier(0.5))];
        let c = cat.billed_cost_at(0, t, &usage);
        assert!((c - want / 2.0).abs() < 1e-12, "{c}");
        // A cached count above the prompt is capped at it.
        let hostile = Billed {
            input_tokens: 10,
            cached_input_tokens: u64::MAX,
            cache_write_tokens: u64::MAX,
            output_tokens: 0,
        };
        let c = cat.billed_cost_at(0, t, &hostile);
        assert!((c - 10.0 * 0.05 / 1e6 * 1.1).abs() < 1e-15, "{c}");
        assert_eq!(
            cat.cost_at(0, t, 1000, 500),
            cat.billed_cost_at(
                0,
                t,
                &Billed {
                    input_tokens: 1000,
                    output_tokens: 500,
                    ..Billed::default()
                }
            )
        );
    }

    #[test]
    fn next_price_change_skips_boundaries_that_change_nothing() {
        let peak = PriceWindow {
            effect: WindowEffect::Multiplier(1.0),
            ..window(
                &[
                    Weekday::Mon,
                    Weekday::Tue,
                    Weekday::Wed,
                    Weekday::Thu,
                    Weekday::Fri,
                ],
                &[(60, 240), (360, 600)],
                Tz::UTC,
            )
        };
        let off = PriceWindow::always("off", WindowEffect::Multiplier(0.5));
        let cat = catalog_with(vec![peak, off], None);
        // Tuesday 00:30 → peak opens at 01:00.
        let t = utc("2026-11-24T00:30:00Z");
        assert_eq!(
            cat.next_price_change(t, Duration::hours(48)),
            Some(utc("2026-11-24T01:00:00Z"))
        );
        // Friday 12:00 → next change is Monday 01:00 (midnights in between change nothing).
        let t = utc("2026-11-27T12:00:00Z");
        assert_eq!(
            cat.next_price_change(t, Duration::days(4)),
            Some(utc("2026-11-30T01:00:00Z"))
        );
    }
}
