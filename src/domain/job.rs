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
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::domain::estimate::{self, TokenEstimate};
use crate::domain::pricing::{Candidates, Catalog, Endpoint, ResolveError};

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

#[derive(Deserialize)]
struct BodyPeek<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    messages: Option<Vec<MessagePeek>>,
    input: Option<TextLen>,
}

#[derive(Deserialize)]
struct MessagePeek {
    content: Option<TextLen>,
}

/// The number of bytes of text in a JSON value: a string's length, the sum
/// over an array, a content part's `text`; anything else counts as a token.
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
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<TextLen, E> {
                Ok(TextLen(4))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_unit<E: de::Error>(self) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextLen, A::Error> {
                let mut n = 0;
                while let Some(TextLen(x)) = seq.next_element()? {
                    n += x;
                }
                Ok(TextLen(n))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TextLen, A::Error> {
                let mut n = 0;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "text" {
                        n += map.next_value::<TextLen>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(TextLen(n))
            }
        }
        d.deserialize_any(V)
    }
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
    let peek: BodyPeek = serde_json::from_str(body.get()).map_err(|e| {
        if body.get().trim_start().starts_with('{') {
            fail("body", without_position(&e.to_string()))
        } else {
            fail("body", "must be a JSON object".into())
        }
    })?;
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
            TokenEstimate {
                input: estimate::input_tokens(text, messages.len()),
                output: estimate::expected_output_tokens(cap),
            }
        }
        Endpoint::Embeddings => {
            let input = peek
                .input
                .ok_or_else(|| fail("body.input", "required".into()))?;
            TokenEstimate {
                input: estimate::input_tokens(input.0, 0).max(1),
                output: 0,
            }
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
        None => ctx.now + ctx.default_deadline,
        Some(d) => parse_deadline(d, ctx.now).map_err(|m| fail("nightshift.deadline", m))?,
    };
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
        && !(max.is_finite() && max > 0.0)
    {
        return Err(fail(
            "nightshift.max_cost_usd",
            "must be a positive number".into(),
        ));
    }
    eligible(ctx.catalog, &model, endpoint, &options).map_err(|e| LineError {
        custom_id: custom_id.clone(),
        ..e
    })?;
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

/// Parses a deadline: an RFC 3339 timestamp, or a duration after `now`.
pub fn parse_deadline(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = crate::domain::units::parse_duration(s).map_err(|_| {
        format!("'{s}' is neither an RFC 3339 timestamp nor a duration like 90m, 12h or 2d")
    })?;
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .ok_or_else(|| format!("'{s}' is too far away"))
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
