//! Job lines: parsing and validating one OpenAI batch request line (plus its
//! optional `nightshift` object) into a [`NewJob`], or a [`LineError`] that
//! names the offending field.
//!
//! Parsing borrows from the line and never builds a JSON tree of the request
//! body: the body is stored verbatim, and only the fields nightshift needs
//! (`model`, `max_tokens`, the text to count) are read. That keeps ingest of
//! million-line files close to the speed of the database insert itself.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::domain::anthropic;
use crate::domain::bounds;
use crate::domain::estimate::{self, TokenEstimate};
use crate::domain::pricing::{Candidates, Catalog, Endpoint, ResolveError, Wire};

/// A validated job, ready to be queued.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub custom_id: String,
    pub endpoint: Endpoint,
    /// The model as requested: a class, a model name, or `provider/model`.
    pub model: String,
    /// The request body, verbatim.
    pub body: String,
    /// The `nightshift` object, verbatim.
    pub options: Option<String>,
    pub priority: i64,
    pub estimate: TokenEstimate,
    pub deadline: DateTime<Utc>,
    /// What decides where the job may run; see [`RouteKey`].
    pub route_key: String,
}

/// Everything that decides which models a job may run on: jobs with the same
/// key are interchangeable for the planner. Stored with each job as a
/// canonical JSON string, so the queue can group by it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, Deserialize)]
pub struct RouteKey {
    pub endpoint: String,
    pub model: String,
    pub providers: Option<Vec<String>>,
    pub regions: Option<Vec<String>>,
    /// The body has no translation to Anthropic's Messages API: the job
    /// never runs on a `kind = "anthropic"` provider. (Absent when false, so
    /// keys stored before it existed read the same.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_anthropic: bool,
}

impl RouteKey {
    /// The key of a job; lists are sorted so equal constraints give equal keys.
    pub fn new(endpoint: Endpoint, model: &str, options: &Options) -> RouteKey {
        let sorted = |v: &Option<Vec<String>>| {
            v.clone().map(|mut v| {
                v.sort();
                v.dedup();
                v
            })
        };
        RouteKey {
            endpoint: endpoint.as_url().to_string(),
            model: model.to_string(),
            providers: sorted(&options.providers),
            regions: sorted(&options.regions),
            no_anthropic: options.no_anthropic,
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a route key serialises")
    }

    pub fn decode(s: &str) -> Option<RouteKey> {
        serde_json::from_str(s).ok()
    }

    /// The candidates of a stored route key in `catalog`, or why there are
    /// none (unreadable key, model gone from the configuration).
    pub fn resolve(key: &str, catalog: &Catalog) -> Result<Candidates, String> {
        let route = RouteKey::decode(key).ok_or_else(|| format!("unreadable route key {key}"))?;
        route.candidates(catalog).map_err(|e| e.to_string())
    }

    /// The models this key may run on in `catalog` (which may have changed
    /// since the job was queued).
    pub fn candidates(&self, catalog: &Catalog) -> Result<Candidates, LineError> {
        let endpoint = Endpoint::from_url(&self.endpoint).ok_or_else(|| LineError {
            custom_id: None,
            field: Some("url".into()),
            message: format!("'{}' is not supported", self.endpoint),
        })?;
        let options = Options {
            providers: self.providers.clone(),
            regions: self.regions.clone(),
            no_anthropic: self.no_anthropic,
            ..Options::default()
        };
        eligible(catalog, &self.model, endpoint, &options)
    }
}

/// Why a line was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// The line's `custom_id`, when it could be read.
    pub custom_id: Option<String>,
    /// Dotted path of the offending field (`body.model`), if one is to blame.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The `nightshift` object of a job line. Unknown fields are an error.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// RFC 3339 timestamp, or a duration after submission (`90m`, `12h`, `2d`).
    pub deadline: Option<String>,
    /// Only these providers may run the job.
    pub providers: Option<Vec<String>>,
    /// Only providers in these regions may run the job.
    pub regions: Option<Vec<String>>,
    /// Higher runs first among jobs due at the same time.
    pub priority: Option<i64>,
    /// The job fails rather than cost more than this (estimated).
    pub max_cost_usd: Option<f64>,
    /// Not a field of the object: set at ingest when the body cannot be
    /// translated for Anthropic's Messages API (see [`parse_line`]).
    #[serde(skip)]
    pub no_anthropic: bool,
}

impl Options {
    /// Parses a stored or submitted `nightshift` object.
    pub fn parse(raw: &str) -> Result<Options, LineError> {
        let de = &mut serde_json::Deserializer::from_str(raw);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            LineError {
                custom_id: None,
                field: Some(if path == "." {
                    "nightshift".into()
                } else {
                    format!("nightshift.{path}")
                }),
                message: without_position(&e.inner().to_string()),
            }
        })
    }
}

/// What validation needs to know besides the line.
pub struct JobContext<'a> {
    pub catalog: &'a Catalog,
    /// Submission time: relative deadlines count from here.
    pub now: DateTime<Utc>,
    pub default_deadline: Duration,
}

/// The models a job may run on: its requested model resolved in the catalog,
/// narrowed by its `providers` and `regions` options. The one place that
/// decides eligibility, used at ingest and again at dispatch.
pub fn eligible(
    catalog: &Catalog,
    model: &str,
    endpoint: Endpoint,
    options: &Options,
) -> Result<Candidates, LineError> {
    let err = |field: &str, message: String| LineError {
        custom_id: None,
        field: Some(field.into()),
        message,
    };
    let mut candidates = catalog.resolve(model, endpoint).map_err(|e| match e {
        ResolveError::Unknown(_) => err("body.model", e.to_string()),
        ResolveError::WrongEndpoint { .. } => err("url", e.to_string()),
    })?;
    if let Some(providers) = &options.providers {
        for p in providers {
            if catalog.provider_id(p).is_none() {
                return Err(err(
                    "nightshift.providers",
                    format!("unknown provider '{p}'"),
                ));
            }
        }
        candidates
            .models
            .retain(|&m| providers.contains(&catalog.providers[catalog.models[m].provider].name));
        if candidates.models.is_empty() {
            return Err(err(
                "nightshift.providers",
                format!("none of these providers serves '{model}'"),
            ));
        }
    }
    if let Some(regions) = &options.regions {
        // The known regions are those the configured providers declare.
        let known = || {
            let mut known: Vec<&str> = catalog
                .providers
                .iter()
                .filter_map(|p| p.region.as_deref())
                .collect();
            known.sort_unstable();
            known.dedup();
            known
        };
        for r in regions {
            if !catalog
                .providers
                .iter()
                .any(|p| p.region.as_deref() == Some(r.as_str()))
            {
                let known = known();
                return Err(err(
                    "nightshift.regions",
                    if known.is_empty() {
                        format!("unknown region '{r}' (no provider declares a region)")
                    } else {
                        format!("unknown region '{r}' (known: {})", known.join(", "))
                    },
                ));
            }
        }
        candidates.models.retain(|&m| {
            catalog.providers[catalog.models[m].provider]
                .region
                .as_ref()
                .is_some_and(|r| regions.contains(r))
        });
        if candidates.models.is_empty() {
            return Err(err(
                "nightshift.regions",
                format!("no provider of '{model}' is in these regions"),
            ));
        }
    }
    if options.no_anthropic {
        candidates
            .models
            .retain(|&m| catalog.providers[catalog.models[m].provider].wire != Wire::Anthropic);
        if candidates.models.is_empty() {
            return Err(err(
                "body",
                format!(
                    "every eligible model of '{model}' is Anthropic's, and this body has no \
                     translation to Anthropic's Messages API"
                ),
            ));
        }
    }
    Ok(candidates)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLine<'a> {
    #[serde(borrow)]
    custom_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow)]
    url: Option<Cow<'a, str>>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
    #[serde(borrow)]
    nightshift: Option<&'a RawValue>,
}

/// Only the custom_id, to name it in errors about other fields.
#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow)]
    custom_id: Option<Cow<'a, str>>,
}

/// The fields of a request body nightshift reads. Everything else is
/// [`Checked`]: read as a provider's JSON parser reads it, then dropped.
#[derive(Default)]
struct BodyPeek<'a> {
    model: Option<Cow<'a, str>>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    n: Option<u64>,
    messages: Option<Vec<MessagePeek>>,
    input: Option<TextLen>,
}

/// The keys of a body that nightshift reads.
enum BodyField {
    Model,
    MaxTokens,
    MaxCompletionTokens,
    N,
    Messages,
    Input,
    Other,
}

impl<'de> Deserialize<'de> for BodyField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<BodyField, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = BodyField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<BodyField, E> {
                Ok(match s {
                    "model" => BodyField::Model,
                    "max_tokens" => BodyField::MaxTokens,
                    "max_completion_tokens" => BodyField::MaxCompletionTokens,
                    "n" => BodyField::N,
                    "messages" => BodyField::Messages,
                    "input" => BodyField::Input,
                    _ => BodyField::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// Sets a field once: a second occurrence is an error, as with derived
/// `Deserialize` (providers would take one of them, silently).
fn once<T, E: de::Error>(
    slot: &mut Option<T>,
    value: Option<T>,
    name: &'static str,
) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::duplicate_field(name));
    }
    *slot = value;
    Ok(())
}

impl<'de> Deserialize<'de> for BodyPeek<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<BodyPeek<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BodyPeek<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BodyPeek<'de>, A::Error> {
                let mut b = BodyPeek::default();
                while let Some(key) = map.next_key::<BodyField>()? {
                    match key {
                        BodyField::Model => once(
                            &mut b.model,
                            map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                            "model",
                        )?,
                        BodyField::MaxTokens => once(
                            &mut b.max_tokens,
                            map.next_value::<Option<Count<1, { bounds::MAX_OUTPUT_TOKENS }>>>()?
                                .map(|c| c.0),
                            "max_tokens",
                        )?,
                        BodyField::MaxCompletionTokens => once(
                            &mut b.max_completion_tokens,
                            map.next_value::<Option<Count<1, { bounds::MAX_OUTPUT_TOKENS }>>>()?
                                .map(|c| c.0),
                            "max_completion_tokens",
                        )?,
                        BodyField::N => once(
                            &mut b.n,
                            map.next_value::<Option<Count<1, { bounds::MAX_CHOICES }>>>()?
                                .map(|c| c.0),
                            "n",
                        )?,
                        BodyField::Messages => {
                            once(&mut b.messages, map.next_value()?, "messages")?
                        }
                        BodyField::Input => once(&mut b.input, map.next_value()?, "input")?,
                        BodyField::Other => {
                            map.next_value::<Checked>()?;
                        }
                    }
                }
                Ok(b)
            }
        }
        d.deserialize_map(V)
    }
}

/// A string, borrowed from the line when it has no escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// A whole number from `MIN` to `MAX`; out of range is an error that says
/// the value and the limit, before any arithmetic sees it.
struct Count<const MIN: u64, const MAX: u64>(u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Count<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const MIN: u64, const MAX: u64>;
        impl<const MIN: u64, const MAX: u64> Visitor<'_> for V<MIN, MAX> {
            type Value = Count<MIN, MAX>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "an integer from {MIN} to {MAX}")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count<MIN, MAX>, E> {
                if v < MIN {
                    Err(E::custom(format!("{v} is below the minimum of {MIN}")))
                } else if v > MAX {
                    Err(E::custom(format!("{v} is above the limit of {MAX}")))
                } else {
                    Ok(Count(v))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count<MIN, MAX>, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("{v} is below the minimum of {MIN}"))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count<MIN, MAX>, E> {
                // An integer too large for u64 arrives as a float.
                if v.fract() == 0.0 && v > MAX as f64 {
                    Err(E::custom(format!("{v} is above the limit of {MAX}")))
                } else {
                    Err(E::invalid_type(de::Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_u64(V::<MIN, MAX>)
    }
}

/// Any JSON value, read as a provider's parser will read it and dropped:
/// strings are decoded (a lone surrogate or a raw control character is an
/// error), numbers must fit a 64-bit float (`1e400` is an error), and
/// nesting is limited by serde_json's recursion limit (127 levels below the
/// body's root, so 128 counting the line: [`bounds::MAX_JSON_DEPTH`]).
/// `IgnoredAny` would skip all of that, and the job would be acknowledged
/// only to fail at dispatch.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Checked, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Checked;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Checked, E> {
                if v.is_finite() {
                    Ok(Checked)
                } else {
                    Err(E::custom("number out of range"))
                }
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
                while seq.next_element::<Checked>()?.is_some() {}
                Ok(Checked)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
                while map.next_key::<Checked>()?.is_some() {
                    map.next_value::<Checked>()?;
                }
                Ok(Checked)
            }
        }
        d.deserialize_any(V)
    }
}

/// A chat message: its `content` is counted, the rest [`Checked`].
struct MessagePeek {
    content: Option<TextLen>,
}

impl<'de> Deserialize<'de> for MessagePeek {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MessagePeek, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MessagePeek;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MessagePeek, A::Error> {
                let mut content = None;
                while let Some(is_content) = map.next_key_seed(KeyIs("content"))? {
                    if is_content {
                        once(&mut content, map.next_value()?, "content")?;
                    } else {
                        map.next_value::<Checked>()?;
                    }
                }
                Ok(MessagePeek { content })
            }
        }
        d.deserialize_map(V)
    }
}

/// Whether a map key is the given name, read without allocating.
struct KeyIs(&'static str);

impl<'de> de::DeserializeSeed<'de> for KeyIs {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        struct V(&'static str);
        impl Visitor<'_> for V {
            type Value = bool;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<bool, E> {
                Ok(s == self.0)
            }
        }
        d.deserialize_identifier(V(self.0))
    }
}

/// The number of bytes of text in a JSON value: a string's length, the sum
/// over an array, a content part's `text`; anything else counts as a token.
/// Saturating: the estimate it feeds is bounded.
struct TextLen(usize);

impl<'de> Deserialize<'de> for TextLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TextLen, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TextLen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("text")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TextLen, E> {
                Ok(TextLen(s.len()))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<TextLen, E> {
                Ok(TextLen(4)) // a token id
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<TextLen, E> {
                Ok(TextLen(4))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<TextLen, E> {
                Checked::visit_number(v)?;
                Ok(TextLen(4))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_unit<E: de::Error>(self) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextLen, A::Error> {
                let mut n: usize = 0;
                while let Some(TextLen(x)) = seq.next_element()? {
                    n = n.saturating_add(x);
                }
                Ok(TextLen(n))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TextLen, A::Error> {
                let mut n: usize = 0;
                while let Some(is_text) = map.next_key_seed(KeyIs("text"))? {
                    if is_text {
                        n = n.saturating_add(map.next_value::<TextLen>()?.0);
                    } else {
                        map.next_value::<Checked>()?;
                    }
                }
                Ok(TextLen(n))
            }
        }
        d.deserialize_any(V)
    }
}

impl Checked {
    /// serde_json never hands a non-finite float to a visitor (it refuses
    /// `1e400` itself); this keeps that true for any deserializer.
    fn visit_number<E: de::Error>(v: f64) -> Result<(), E> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(E::custom("number out of range"))
        }
    }
}

/// Reads a body: the fields nightshift needs, everything else checked.
/// On an error, `(field, message)`; the path is tracked only then (a second
/// parse), so the common case allocates nothing for it.
fn parse_body(body: &str) -> Result<BodyPeek<'_>, (String, String)> {
    if !body.trim_start().starts_with('{') {
        return Err(("body".into(), "must be a JSON object".into()));
    }
    if let Ok(peek) = serde_json::from_str::<BodyPeek>(body) {
        return Ok(peek);
    }
    let de = &mut serde_json::Deserializer::from_str(body);
    let e = match serde_path_to_error::deserialize::<_, BodyPeek>(de) {
        Ok(peek) => return Ok(peek),
        Err(e) => e,
    };
    let path = e.path().to_string();
    let message = without_position(&e.into_inner().to_string());
    let field = if path == "." {
        "body".to_string()
    } else {
        format!("body.{path}")
    };
    if message.starts_with("recursion limit exceeded") {
        return Err((
            "body".into(),
            format!(
                "nested more than {} levels deep (the job line is level 1); providers refuse such JSON",
                bounds::MAX_JSON_DEPTH
            ),
        ));
    }
    if message.starts_with("number out of range") {
        return Err((
            field,
            "a number beyond the range of a 64-bit float; providers refuse it".into(),
        ));
    }
    Err((field, message))
}

/// Drops serde_json's "at line 1 column N" from errors about a nested
/// value, where the column is not the line's.
fn without_position(msg: &str) -> String {
    msg.rfind(" at line ")
        .map_or(msg, |i| &msg[..i])
        .to_string()
}

/// serde_json appends "at line 1 column 17"; on a one-line document the
/// column is the useful part.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line 1 column ") {
        Some(i) => format!(
            "{} (column {})",
            &msg[..i],
            &msg[i + " at line 1 column ".len()..]
        ),
        None => msg.to_string(),
    }
}

/// Parses and validates one job line.
pub fn parse_line(line: &str, ctx: &JobContext) -> Result<NewJob, LineError> {
    if line.len() > bounds::MAX_LINE_BYTES {
        return Err(LineError {
            custom_id: None,
            field: None,
            message: format!(
                "the line is {} bytes long, above the limit of {} bytes",
                line.len(),
                bounds::MAX_LINE_BYTES
            ),
        });
    }
    let raw: RawLine = {
        let de = &mut serde_json::Deserializer::from_str(line);
        match serde_path_to_error::deserialize(de) {
            Ok(raw) => raw,
            Err(e) => {
                let custom_id = serde_json::from_str::<IdOnly>(line)
                    .ok()
                    .and_then(|x| x.custom_id)
                    .map(Cow::into_owned);
                let path = e.path().to_string();
                let inner = e.into_inner();
                let (field, message) = if inner.is_syntax() || inner.is_eof() {
                    (
                        None,
                        format!("invalid JSON: {}", strip_position(&inner.to_string())),
                    )
                } else if path == "." {
                    (None, strip_position(&inner.to_string()))
                } else {
                    (Some(path), strip_position(&inner.to_string()))
                };
                return Err(LineError {
                    custom_id,
                    field,
                    message,
                });
            }
        }
    };
    let custom_id = raw.custom_id.as_deref().map(str::to_owned);
    let fail = |field: &str, message: String| LineError {
        custom_id: custom_id.clone(),
        field: Some(field.to_string()),
        message,
    };
    let id = match raw.custom_id.as_deref() {
        Some(id) if id.len() > bounds::MAX_CUSTOM_ID_BYTES => {
            return Err(LineError {
                custom_id: None, // not repeated: it is too long
                field: Some("custom_id".into()),
                message: format!(
                    "is {} bytes long, above the limit of {} bytes",
                    id.len(),
                    bounds::MAX_CUSTOM_ID_BYTES
                ),
            });
        }
        Some(id) if !id.is_empty() => id.to_owned(),
        Some(_) => return Err(fail("custom_id", "must not be empty".into())),
        None => return Err(fail("custom_id", "required".into())),
    };
    match raw.method.as_deref() {
        Some("POST") => {}
        Some(m) => {
            return Err(fail(
                "method",
                format!("'{m}' is not supported (only POST)"),
            ));
        }
        None => return Err(fail("method", "required".into())),
    }
    let endpoint = match raw.url.as_deref() {
        Some(url) => Endpoint::from_url(url).ok_or_else(|| {
            fail(
                "url",
                format!(
                    "'{url}' is not supported (expected /v1/chat/completions or /v1/embeddings)"
                ),
            )
        })?,
        None => return Err(fail("url", "required".into())),
    };
    let body = raw.body.ok_or_else(|| fail("body", "required".into()))?;
    let peek = parse_body(body.get()).map_err(|(field, message)| fail(&field, message))?;
    let model = match peek.model {
        Some(m) if !m.is_empty() => m.into_owned(),
        _ => return Err(fail("body.model", "required".into())),
    };
    let estimate = match endpoint {
        Endpoint::ChatCompletions => {
            let messages = peek
                .messages
                .ok_or_else(|| fail("body.messages", "required".into()))?;
            if messages.is_empty() {
                return Err(fail("body.messages", "must not be empty".into()));
            }
            let text: usize = messages
                .iter()
                .map(|m| m.content.as_ref().map_or(0, |c| c.0))
                .sum();
            let cap = peek.max_completion_tokens.or(peek.max_tokens);
            let input = estimate::input_tokens(text, messages.len());
            if input > bounds::MAX_INPUT_TOKENS {
                return Err(fail("body.messages", too_many_input_tokens(input)));
            }
            TokenEstimate {
                input,
                output: estimate::expected_output_tokens_n(cap, peek.n.unwrap_or(1)),
            }
        }
        Endpoint::Embeddings => {
            let input = peek
                .input
                .ok_or_else(|| fail("body.input", "required".into()))?;
            let input = estimate::input_tokens(input.0, 0).max(1);
            if input > bounds::MAX_INPUT_TOKENS {
                return Err(fail("body.input", too_many_input_tokens(input)));
            }
            TokenEstimate { input, output: 0 }
        }
    };
    let options = match raw.nightshift {
        Some(o) => Options::parse(o.get()).map_err(|e| LineError {
            custom_id: custom_id.clone(),
            ..e
        })?,
        None => Options::default(),
    };
    let deadline = match &options.deadline {
        None => bounds::add(ctx.now, ctx.default_deadline),
        Some(d) => parse_deadline(d, ctx.now).map_err(|m| fail("nightshift.deadline", m))?,
    };
    if deadline > bounds::add(ctx.now, bounds::MAX_DEADLINE) {
        return Err(fail(
            "nightshift.deadline",
            format!(
                "{} is more than {} after the submission time",
                deadline.to_rfc3339(),
                bounds::show(bounds::MAX_DEADLINE)
            ),
        ));
    }
    if deadline <= ctx.now {
        return Err(fail(
            "nightshift.deadline",
            format!(
                "{} is not after the submission time {}",
                deadline.to_rfc3339(),
                ctx.now.to_rfc3339()
            ),
        ));
    }
    if let Some(max) = options.max_cost_usd
        && !(max.is_finite() && max > 0.0 && max <= bounds::MAX_JOB_COST_USD)
    {
        return Err(fail(
            "nightshift.max_cost_usd",
            format!(
                "{max} is not a positive number of USD up to the limit of {}",
                bounds::MAX_JOB_COST_USD
            ),
        ));
    }
    if let Some(p) = options.priority
        && p.unsigned_abs() > bounds::MAX_PRIORITY as u64
    {
        return Err(fail(
            "nightshift.priority",
            format!("{p} is outside the range -{0} to {0}", bounds::MAX_PRIORITY),
        ));
    }
    let mut options = options;
    let mut candidates =
        eligible(ctx.catalog, &model, endpoint, &options).map_err(|e| LineError {
            custom_id: custom_id.clone(),
            ..e
        })?;
    // Anthropic's models take the job only if its body translates to the
    // Messages API. If it does not, the line is refused (naming the field)
    // when every eligible model is Anthropic's; otherwise the job runs on
    // the others, and its route key says so. Only then is the body parsed
    // as a whole: the common case stays a peek.
    let is_anthropic =
        |m: usize| ctx.catalog.providers[ctx.catalog.models[m].provider].wire == Wire::Anthropic;
    if endpoint == Endpoint::ChatCompletions && candidates.models.iter().any(|&m| is_anthropic(m)) {
        let untranslatable = match serde_json::from_str(body.get()) {
            Ok(map) => anthropic::request(&map, &model).err(),
            Err(e) => Some(anthropic::Untranslatable {
                field: "body".into(),
                message: without_position(&e.to_string()),
            }),
        };
        if let Some(e) = untranslatable {
            if candidates.models.iter().all(|&m| is_anthropic(m)) {
                return Err(fail(&e.field, e.message));
            }
            options.no_anthropic = true;
            candidates =
                eligible(ctx.catalog, &model, endpoint, &options).map_err(|e| LineError {
                    custom_id: custom_id.clone(),
                    ..e
                })?;
        }
    }
    // A request above every eligible model's per-minute token limit could
    // never be sent within the limits: refused now, not left to stall.
    let tokens = estimate.input.saturating_add(estimate.output);
    if !candidates
        .models
        .iter()
        .any(|&m| ctx.catalog.request_fits(m, tokens))
    {
        let largest = candidates
            .models
            .iter()
            .filter_map(|&m| ctx.catalog.max_request_tokens(m))
            .max()
            .unwrap_or(0);
        return Err(fail(
            "body",
            format!(
                "about {tokens} tokens (estimated input plus expected output) is more than \
                 any eligible model's tpm limit takes in one request (the largest is {largest}); \
                 it could never be sent within the limits: lower max_tokens or shorten the prompt"
            ),
        ));
    }
    let route_key = RouteKey::new(endpoint, &model, &options).encode();
    Ok(NewJob {
        custom_id: id,
        endpoint,
        model,
        body: body.get().to_owned(),
        options: raw.nightshift.map(|o| o.get().to_owned()),
        priority: options.priority.unwrap_or(0),
        estimate,
        deadline,
        route_key,
    })
}

fn too_many_input_tokens(n: u64) -> String {
    format!(
        "about {n} input tokens (estimated), above the limit of {}",
        bounds::MAX_INPUT_TOKENS
    )
}

/// Parses a deadline: an RFC 3339 timestamp, or a duration after `now`; at
/// most [`bounds::MAX_DEADLINE`] after `now` either way.
pub fn parse_deadline(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let latest = bounds::add(now, bounds::MAX_DEADLINE);
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        let t = t.with_timezone(&Utc);
        if t > latest {
            return Err(format!(
                "'{s}' is more than {} after the submission time (the limit)",
                bounds::show(bounds::MAX_DEADLINE)
            ));
        }
        return Ok(t);
    }
    let d = crate::domain::units::parse_duration(s).map_err(|_| {
        format!("'{s}' is neither an RFC 3339 timestamp nor a duration like 90m, 12h or 2d")
    })?;
    if d > bounds::MAX_DEADLINE {
        return Err(format!(
            "'{s}' is longer than the limit of {}",
            bounds::show(bounds::MAX_DEADLINE)
        ));
    }
    Ok(bounds::add(now, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn ctx(c: &Config) -> JobContext<'_> {
        JobContext {
            catalog: &c.catalog,
            now: DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            default_deadline: Duration::from_secs(86_400),
        }
    }

    fn err(line: &str) -> LineError {
        let c = Config::embedded_default();
        parse_line(line, &ctx(&c)).unwrap_err()
    }

    const GOOD: &str = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"cheap-chat","messages":[{"role":"user","content":"Hello, how are you?"}],"max_tokens":64},"nightshift":{"deadline":"12h","priority":2}}"#;

    /// An Anthropic provider (`claude`) and an OpenAI one (`gpt`), with a
    /// class `both` over the two.
    fn mixed_config() -> Config {
        let text = "[[providers]]\nname = \"anthropic\"\nkind = \"anthropic\"\napi_key_env = \"K\"\n\
                    [[providers.models]]\nname = \"claude\"\ninput_per_mtok = 1.0\noutput_per_mtok = 5.0\n\
                    [[providers]]\nname = \"openai\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\napi_key_env = \"K\"\n\
                    [[providers.models]]\nname = \"gpt\"\ninput_per_mtok = 1.0\noutput_per_mtok = 1.0\n\
                    [classes]\nboth = [\"anthropic/claude\", \"openai/gpt\"]\n";
        Config::parse(text, "t.toml", std::path::Path::new(".")).unwrap()
    }

    #[test]
    fn a_body_anthropic_cannot_take_is_refused_or_kept_off_anthropic() {
        let c = mixed_config();
        let line = |model: &str, extra: &str| {
            format!(
                r#"{{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]{extra}}}}}"#
            )
        };
        // Every eligible model is Anthropic's: a per-line error naming the field.
        let e = parse_line(&line("claude", r#","logprobs":true"#), &ctx(&c)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "body.logprobs: not supported by Anthropic's Messages API"
        );
        assert_eq!(e.custom_id.as_deref(), Some("a"));
        // A translatable body may run on either.
        let job = parse_line(&line("both", r#","temperature":0.5"#), &ctx(&c)).unwrap();
        let cands = RouteKey::resolve(&job.route_key, &c.catalog).unwrap();
        assert_eq!(cands.models.len(), 2);
        assert!(!job.route_key.contains("no_anthropic"));
        // An untranslatable one runs only on the others, now and at dispatch.
        let job = parse_line(&line("both", r#","logprobs":true"#), &ctx(&c)).unwrap();
        let cands = RouteKey::resolve(&job.route_key, &c.catalog).unwrap();
        assert_eq!(
            cands
                .models
                .iter()
                .map(|&m| c.catalog.qualified_name(m))
                .collect::<Vec<_>>(),
            ["openai/gpt"]
        );
        // A job restricted to Anthropic by its options is refused the same way.
        let e = parse_line(
            &line(
                "both",
                r#","seed":3}, "nightshift": {"providers": ["anthropic"]"#,
            ),
            &ctx(&c),
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("body.seed"));
    }

    #[test]
    fn a_good_line_parses_with_estimate_and_deadline() {
        let c = Config::embedded_default();
        let j = parse_line(GOOD, &ctx(&c)).unwrap();
        assert_eq!(j.custom_id, "a");
        assert_eq!(j.model, "cheap-chat");
        assert_eq!(j.priority, 2);
        assert_eq!(j.estimate.output, 32);
        assert!(j.estimate.input > 5);
        assert_eq!(j.deadline.to_rfc3339(), "2026-11-25T00:00:00+00:00");
        assert!(j.body.starts_with("{\"model\""));
    }

    #[test]
    fn a_request_no_eligible_tpm_can_take_is_refused_and_one_that_fits_somewhere_is_not() {
        let c = Config::parse(
            r#"
[[providers]]
name = "small"
kind = "simulated"
tpm = 1000

[[providers.models]]
name = "s"
input_per_mtok = 1.0
output_per_mtok = 1.0

[[providers]]
name = "big"
kind = "simulated"

[[providers.models]]
name = "b"
input_per_mtok = 2.0
output_per_mtok = 2.0
tpm = 5000

[classes]
chat = ["small/s", "big/b"]
"#,
            "t.toml",
            std::path::Path::new("."),
        )
        .unwrap();
        let line = |model: &str, max_tokens: u64| {
            format!(
                r#"{{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":{max_tokens}}}}}"#
            )
        };
        // ~4000 expected tokens: only big/b takes them.
        assert!(parse_line(&line("chat", 8000), &ctx(&c)).is_ok());
        let e = parse_line(&line("small/s", 8000), &ctx(&c)).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("body"));
        assert!(e.message.contains("tpm limit"), "{e}");
        assert!(e.message.contains("the largest is 1000"), "{e}");
        // Above every model's limit.
        let e = parse_line(&line("chat", 20_000), &ctx(&c)).unwrap_err();
        assert!(e.message.contains("the largest is 5000"), "{e}");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("{not json", None, "invalid JSON"),
            (
                r#"{"method":"POST","url":"/v1/chat/completions","body":{}}"#,
                Some("custom_id"),
                "required",
            ),
            (
                r#"{"custom_id":7,"method":"POST"}"#,
                Some("custom_id"),
                "invalid type",
            ),
            (
                r#"{"custom_id":"x","method":"GET","url":"/v1/chat/completions","body":{}}"#,
                Some("method"),
                "GET",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/images","body":{}}"#,
                Some("url"),
                "/v1/images",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":[1]}"#,
                Some("body"),
                "object",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"content":"hi"}]}}"#,
                Some("body.model"),
                "required",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"nope","messages":[{"content":"hi"}]}}"#,
                Some("body.model"),
                "nope",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"cheap-chat"}}"#,
                Some("body.messages"),
                "required",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/embeddings","body":{"model":"cheap-chat","input":"hi"}}"#,
                Some("url"),
                "does not serve",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"cheap-chat","messages":[{"content":"hi"}]},"nightshift":{"deadline":"soon"}}"#,
                Some("nightshift.deadline"),
                "soon",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"cheap-chat","messages":[{"content":"hi"}]},"nightshift":{"colour":"red"}}"#,
                Some("nightshift.colour"),
                "unknown field",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"cheap-chat","messages":[{"content":"hi"}]},"nightshift":{"priority":"high"}}"#,
                Some("nightshift.priority"),
                "invalid type",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"cheap-chat","messages":[{"content":"hi"}]},"nightshift":{"providers":["acme"]}}"#,
                Some("nightshift.providers"),
                "acme",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"claude-haiku-4-5","messages":[{"content":"hi"}]},"nightshift":{"regions":["eu"]}}"#,
                Some("nightshift.regions"),
                "regions",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"cheap-chat","messages":[{"content":"hi"}]},"nightshift":{"deadline":"2020-01-01T00:00:00Z"}}"#,
                Some("nightshift.deadline"),
                "not after",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"cheap-chat","messages":[{"content":"hi"}]},"extra":1}"#,
                Some("extra"),
                "unknown field `extra`",
            ),
        ];
        for (line, field, needle) in cases {
            let e = err(line);
            assert_eq!(e.field.as_deref(), *field, "{line}: {e}");
            assert!(e.message.contains(needle), "{line}: {e}");
        }
        // The custom_id is kept for errors in other fields.
        let e = err(r#"{"custom_id":"keep","method":"GET"}"#);
        assert_eq!(e.custom_id.as_deref(), Some("keep"));
    }

    fn chat(body_extra: &str, nightshift: &str) -> String {
        format!(
            r#"{{"custom_id":"h","method":"POST","url":"/v1/chat/completions","body":{{"model":"cheap-chat","messages":[{{"role":"user","content":"hi"}}]{body_extra}}}{nightshift}}}"#
        )
    }

    #[test]
    fn numbers_from_outside_are_bounded_with_the_field_named() {
        let cases: &[(String, &str, &str)] = &[
            (
                chat(r#","max_tokens":18446744073709551615"#, ""),
                "body.max_tokens",
                "18446744073709551615 is above the limit of 1000000",
            ),
            (
                chat(r#","max_tokens":184467440737095516150"#, ""),
                "body.max_tokens",
                "is above the limit of 1000000",
            ),
            (
                chat(r#","max_completion_tokens":1000001"#, ""),
                "body.max_completion_tokens",
                "1000001 is above the limit of 1000000",
            ),
            (
                chat(r#","max_tokens":0"#, ""),
                "body.max_tokens",
                "0 is below the minimum of 1",
            ),
            (
                chat(r#","max_tokens":-5"#, ""),
                "body.max_tokens",
                "-5 is below the minimum of 1",
            ),
            (
                chat(r#","max_tokens":"x""#, ""),
                "body.max_tokens",
                r#"invalid type: string "x", expected an integer from 1 to 1000000"#,
            ),
            (
                chat(r#","max_tokens":64.5"#, ""),
                "body.max_tokens",
                "invalid type: floating point `64.5`",
            ),
            (
                chat(r#","n":129"#, ""),
                "body.n",
                "129 is above the limit of 128",
            ),
            (
                chat(r#","temperature":1e400"#, ""),
                "body.temperature",
                "beyond the range of a 64-bit float",
            ),
            (
                chat(r#","logit_bias":{"1":-1e999}"#, ""),
                "body.logit_bias.1",
                "beyond the range of a 64-bit float",
            ),
            (
                chat(r#","stop":["\ud800"]"#, ""),
                "body.stop[0]",
                "hex escape",
            ),
            (
                chat(r#","max_tokens":5,"max_tokens":6"#, ""),
                "body",
                "duplicate field `max_tokens`",
            ),
            (
                chat("", r#","nightshift":{"deadline":"99999999d"}"#),
                "nightshift.deadline",
                "longer than the limit of 365d",
            ),
            (
                chat("", r#","nightshift":{"deadline":"9999-12-31T00:00:00Z"}"#),
                "nightshift.deadline",
                "more than 365d after the submission time",
            ),
            (
                chat(
                    "",
                    r#","nightshift":{"deadline":"100000000000000000000000y"}"#,
                ),
                "nightshift.deadline",
                "neither an RFC 3339 timestamp nor a duration",
            ),
            (
                chat("", r#","nightshift":{"priority":9223372036854775807}"#),
                "nightshift.priority",
                "outside the range -1000000000 to 1000000000",
            ),
            (
                chat("", r#","nightshift":{"priority":1e400}"#),
                "nightshift.priority",
                "number out of range",
            ),
            (
                chat("", r#","nightshift":{"max_cost_usd":1e300}"#),
                "nightshift.max_cost_usd",
                "up to the limit of 1000000",
            ),
        ];
        for (line, field, needle) in cases {
            let e = err(line);
            assert_eq!(e.field.as_deref(), Some(*field), "{line}: {e}");
            assert!(e.message.contains(needle), "{line}: {e}");
            assert_eq!(e.custom_id.as_deref(), Some("h"), "{line}: {e}");
        }
        // The bounds themselves are accepted.
        let c = Config::embedded_default();
        // (Each within its field's bound; together they must also fit an
        // eligible model's tpm, 2M here, in one request.)
        let j = parse_line(&chat(r#","max_tokens":1000000,"n":2"#, ""), &ctx(&c)).unwrap();
        assert_eq!(j.estimate.output, 500_000 * 2);
        let j = parse_line(&chat(r#","max_tokens":16,"n":128"#, ""), &ctx(&c)).unwrap();
        assert_eq!(j.estimate.output, 8 * 128);
        let e = parse_line(&chat(r#","max_tokens":1000000,"n":128"#, ""), &ctx(&c)).unwrap_err();
        assert!(e.message.contains("tpm limit"), "{e}");
        let j = parse_line(&chat("", r#","nightshift":{"deadline":"365d"}"#), &ctx(&c)).unwrap();
        assert_eq!(j.deadline, ctx(&c).now + chrono::Duration::days(365));
        let j = parse_line(&chat(r#","temperature":1e308,"x":[1e-400]"#, ""), &ctx(&c));
        assert!(j.is_ok(), "{j:?}");
    }

    #[test]
    fn sizes_and_nesting_are_bounded() {
        // Nesting: the line is level 1, the body level 2; 128 in all is allowed.
        let nested = |levels: usize| {
            chat(
                &format!(r#","x":{}1{}"#, "[".repeat(levels), "]".repeat(levels)),
                "",
            )
        };
        let c = Config::embedded_default();
        assert!(parse_line(&nested(126), &ctx(&c)).is_ok());
        let e = err(&nested(127));
        assert_eq!(e.field.as_deref(), Some("body"), "{e}");
        assert!(e.message.contains("nested more than 128 levels"), "{e}");
        let e = err(&nested(100_000));
        assert!(e.message.contains("nested more than 128 levels"), "{e}");
        // Objects, on both parse paths (the error path tracks the field path).
        for levels in [126, 127, 200] {
            let line = chat(
                &format!(
                    r#","x":{}1{}"#,
                    "{\"a\":".repeat(levels),
                    "}".repeat(levels)
                ),
                "",
            );
            let out = parse_line(&line, &ctx(&c));
            assert_eq!(out.is_ok(), levels == 126, "{levels}: {out:?}");
            let line = chat(
                &format!(
                    r#","x":{}1e400{}"#,
                    "{\"a\":".repeat(levels.min(126)),
                    "}".repeat(levels.min(126))
                ),
                "",
            );
            assert!(parse_line(&line, &ctx(&c)).is_err());
        }
        // Inside a message, too.
        let deep = format!(
            r#"{{"custom_id":"h","method":"POST","url":"/v1/chat/completions","body":{{"model":"cheap-chat","messages":[{{"content":{}"a"{}}}]}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(
            err(&deep).message.contains("nested more than"),
            "{}",
            err(&deep)
        );

        // A prompt of ~50 MB: its estimate is above the limit, the field named.
        let big = chat("", "").replace("\"hi\"", &format!("\"{}\"", "a".repeat(9_000_000)));
        let e = err(&big);
        assert_eq!(e.field.as_deref(), Some("body.messages"), "{e}");
        assert!(e.message.contains("above the limit of 2000000"), "{e}");
        let emb = format!(
            r#"{{"custom_id":"e","method":"POST","url":"/v1/embeddings","body":{{"model":"embed","input":"{}"}}}}"#,
            "a".repeat(9_000_000)
        );
        assert_eq!(err(&emb).field.as_deref(), Some("body.input"));

        // A custom_id is bounded, and not repeated in the error.
        let long = chat("", "").replace("\"h\"", &format!("\"{}\"", "i".repeat(600)));
        let e = err(&long);
        assert_eq!(e.field.as_deref(), Some("custom_id"), "{e}");
        assert!(e.message.contains("600 bytes"), "{e}");
        assert!(e.custom_id.is_none());
    }

    #[test]
    fn huge_default_deadlines_saturate_instead_of_panicking() {
        let c = Config::embedded_default();
        let ctx = JobContext {
            default_deadline: Duration::MAX,
            ..ctx(&c)
        };
        let e = parse_line(&chat("", ""), &ctx).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("nightshift.deadline"), "{e}");
    }

    #[test]
    fn unknown_regions_are_refused_by_name() {
        let line = |regions: &str| {
            format!(
                r#"{{"custom_id":"r","method":"POST","url":"/v1/chat/completions","body":{{"model":"cheap-chat","messages":[{{"content":"hi"}}]}},"nightshift":{{"regions":{regions}}}}}"#
            )
        };
        // One known region that serves the class does not let a typo through.
        for regions in [r#"["us","mars"]"#, r#"["mars"]"#, r#"["EU"]"#] {
            let e = err(&line(regions));
            assert_eq!(e.custom_id.as_deref(), Some("r"), "{regions}: {e}");
            assert_eq!(
                e.field.as_deref(),
                Some("nightshift.regions"),
                "{regions}: {e}"
            );
            let bad = if regions.contains("EU") { "EU" } else { "mars" };
            assert!(
                e.message.contains(&format!("unknown region '{bad}'")),
                "{regions}: {e}"
            );
            // The known regions are those the configured providers declare.
            assert!(e.message.contains("cn, eu, us"), "{regions}: {e}");
        }
        // Known regions still narrow the candidates.
        let c = Config::embedded_default();
        let j = parse_line(&line(r#"["us","eu"]"#), &ctx(&c)).unwrap();
        assert_eq!(j.custom_id, "r");
    }

    #[test]
    fn embeddings_and_multipart_content_are_counted() {
        let c = Config::embedded_default();
        let line = r#"{"custom_id":"e","method":"POST","url":"/v1/embeddings","body":{"model":"embed","input":["abcd","efgh"]}}"#;
        let j = parse_line(line, &ctx(&c)).unwrap();
        assert_eq!(
            j.estimate,
            TokenEstimate {
                input: 2,
                output: 0
            }
        );
        let line = r#"{"custom_id":"p","method":"POST","url":"/v1/chat/completions","body":{"model":"cheap-chat","messages":[{"role":"user","content":[{"type":"text","text":"abcdefgh"}]}]}}"#;
        let j = parse_line(line, &ctx(&c)).unwrap();
        assert_eq!(j.estimate.input, 2 + 4 + 3);
    }

    #[test]
    fn deadlines_parse_both_ways() {
        let now = DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_deadline("90m", now).unwrap().to_rfc3339(),
            "2026-11-24T13:30:00+00:00"
        );
        assert_eq!(
            parse_deadline("2d", now).unwrap().to_rfc3339(),
            "2026-11-26T12:00:00+00:00"
        );
        assert_eq!(
            parse_deadline("2026-11-25T08:00:00+01:00", now)
                .unwrap()
                .to_rfc3339(),
            "2026-11-25T07:00:00+00:00"
        );
    }
}
