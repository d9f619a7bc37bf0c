//! Provider clients: send one request, return what happened.
//!
//! [`ProviderClient::Http`] speaks the OpenAI wire format over reqwest
//! (rustls) to any OpenAI-compatible API, or Anthropic's Messages API
//! (`POST /v1/messages`, translated both ways by [`anthropic`]). [`ProviderClient::Simulated`]
//! answers in-process with a deterministic completion, realistic `usage` and
//! latency, so the daemon runs with no API keys.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::config::{Secret, Transport};
use crate::dispatch::reliability::{Outcome, Signals, Usage, parse_signals};
use crate::domain::pricing::{Endpoint, Wire};
use crate::domain::{anthropic, bounds, estimate};

/// Upper bound on a provider response body we keep.
pub(super) const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// How long a simulated provider's batch runs unless the client is built
/// [`ProviderClient::with_batch_turnaround`].
const DEFAULT_BATCH_TURNAROUND: Duration = Duration::from_secs(20);

/// One request to a provider.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub endpoint: Endpoint,
    /// The model id the provider knows.
    pub model: &'a str,
    /// The job's request body; its `model` is replaced by [`Request::model`].
    pub body: &'a str,
    pub custom_id: &'a str,
    /// `Some(timeout)`: send it on the flex channel (`"service_tier":
    /// "flex"` in the body) with this timeout instead of the provider's.
    pub flex_timeout: Option<Duration>,
}

/// One simulated batch, held by its [`ProviderClient::Simulated`] client
/// (the batch API's simulated side, `batch_api::simulated`, runs it). Its
/// lines finish one after another over the turnaround (line `i` of `n` at
/// `created + turnaround × (i + 1) / n`), so a cancel leaves the later ones
/// not run. Defined here, with the client that holds it, so that this
/// module needs nothing from the batch API above it.
#[derive(Debug)]
pub struct SimBatch {
    pub(crate) created: chrono::DateTime<chrono::Utc>,
    pub(crate) turnaround: Duration,
    pub(crate) cancelled: Option<chrono::DateTime<chrono::Utc>>,
    /// `Some(k)`: the provider expires the batch when it ends, only its
    /// first `k` lines run.
    pub(crate) expired_after: Option<usize>,
    pub(crate) endpoint: Endpoint,
    pub(crate) model: String,
    pub(crate) lines: Vec<BatchLine>,
}

/// One request of a batch (`dispatch::batch_api::BatchLine`).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLine {
    /// `ns<batch>_<job>`.
    pub custom_id: String,
    /// The job's request body, verbatim; its `model` is replaced by the
    /// batch's wire model (and for Anthropic translated to Messages params).
    pub body: String,
}

/// A client for one provider.
pub enum ProviderClient {
    Http {
        wire: Wire,
        base_url: String,
        api_key: Secret,
        client: reqwest::Client,
    },
    Simulated {
        name: String,
        latency: Duration,
        ms_per_output_token: f64,
        /// Fraction of requests answered with HTTP 500.
        failure_rate: f64,
        calls: std::sync::atomic::AtomicU64,
        /// How long a simulated batch runs before it ends (wall clock).
        batch_turnaround: Duration,
        /// Fraction of flex requests refused (429 `resource_unavailable`).
        flex_refusal_fraction: f64,
        /// Fraction of batches expired when they end (a drawn share of
        /// their lines not run).
        batch_expire_fraction: f64,
        /// The batches created on this client, by id: in memory only, so a
        /// restart forgets them (their ids are then not found). A std
        /// mutex: it is held for a map lookup, never across an await.
        batches: std::sync::Mutex<HashMap<String, SimBatch>>,
    },
}

impl ProviderClient {
    /// Builds the client for a configured transport.
    pub fn new(
        name: &str,
        transport: &Transport,
        request_timeout: Duration,
    ) -> anyhow::Result<ProviderClient> {
        Ok(match transport {
            Transport::OpenAi {
                wire,
                base_url,
                api_key,
                key,
                timeout,
                connect_timeout,
                ..
            } => ProviderClient::Http {
                wire: *wire,
                base_url: base_url.clone(),
                api_key: match api_key {
                    Some(k) => k.clone(),
                    None => key.read()?,
                },
                client: reqwest::Client::builder()
                    .use_rustls_tls()
                    .connect_timeout(
                        connect_timeout
                            .unwrap_or(Duration::from_secs(10))
                            .min(timeout.unwrap_or(request_timeout)),
                    )
                    .timeout(timeout.unwrap_or(request_timeout))
                    .user_agent(concat!("nightshift/", env!("CARGO_PKG_VERSION")))
                    .build()?,
            },
            Transport::Simulated {
                latency,
                ms_per_output_token,
                failure_rate,
            } => ProviderClient::Simulated {
                name: name.to_string(),
                latency: *latency,
                ms_per_output_token: *ms_per_output_token,
                failure_rate: *failure_rate,
                calls: Default::default(),
                batch_turnaround: DEFAULT_BATCH_TURNAROUND,
                flex_refusal_fraction: 0.0,
                batch_expire_fraction: 0.0,
                batches: Default::default(),
            },
        })
    }

    /// Sets how long a simulated provider's batches run before they end;
    /// no effect on an HTTP provider.
    pub fn with_batch_turnaround(mut self, d: Duration) -> Self {
        if let ProviderClient::Simulated {
            batch_turnaround, ..
        } = &mut self
        {
            *batch_turnaround = d;
        }
        self
    }

    /// Sets a simulated provider's `simulated_refusal_fraction` (flex) and
    /// `simulated_expire_fraction` (batches); no effect on an HTTP provider.
    pub fn with_simulated_channels(mut self, flex_refusal: f64, batch_expire: f64) -> Self {
        if let ProviderClient::Simulated {
            flex_refusal_fraction,
            batch_expire_fraction,
            ..
        } = &mut self
        {
            *flex_refusal_fraction = flex_refusal;
            *batch_expire_fraction = batch_expire;
        }
        self
    }

    /// Sends one request.
    pub async fn send(&self, req: Request<'_>) -> Outcome {
        let body = match with_model(req.body, req.model) {
            Ok(mut b) => {
                if req.flex_timeout.is_some() {
                    b.insert("service_tier".into(), Value::String("flex".into()));
                }
                b
            }
            Err(e) => {
                return Outcome::NoAnswer {
                    code: "invalid_body",
                    message: e.to_string(),
                };
            }
        };
        match self {
            ProviderClient::Http {
                wire: Wire::OpenAi,
                base_url,
                api_key,
                client,
            } => {
                let path = req.endpoint.as_url().trim_start_matches("/v1");
                // base_url ends in /v1, as with the official SDKs.
                let url = format!("{base_url}{path}");
                let mut request = client.post(&url).bearer_auth(api_key.expose()).json(&body);
                if let Some(t) = req.flex_timeout {
                    request = request.timeout(t);
                }
                let answer = send_http(request, &url).await;
                finish_openai(answer, &url)
            }
            ProviderClient::Http {
                wire: Wire::Anthropic,
                base_url,
                api_key,
                client,
            } => {
                if req.endpoint != Endpoint::ChatCompletions {
                    return Outcome::NoAnswer {
                        code: "invalid_body",
                        message: format!(
                            "Anthropic's API does not serve {}",
                            req.endpoint.as_url()
                        ),
                    };
                }
                let body = match anthropic::request(&body, req.model) {
                    Ok(b) => b,
                    Err(e) => {
                        return Outcome::NoAnswer {
                            code: "invalid_body",
                            message: e.to_string(),
                        };
                    }
                };
                let url = format!("{base_url}/v1/messages");
                let request = client
                    .post(&url)
                    .header("x-api-key", api_key.expose())
                    .header("anthropic-version", anthropic::API_VERSION)
                    .json(&body);
                let answer = send_http(request, &url).await;
                finish_anthropic(answer, &url)
            }
            ProviderClient::Simulated {
                name,
                latency,
                ms_per_output_token,
                failure_rate,
                calls,
                flex_refusal_fraction,
                ..
            } => {
                let call = calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if req.flex_timeout.is_some()
                    && simulated_fails(
                        *flex_refusal_fraction,
                        &[name, req.custom_id, "flex", &call.to_string()],
                    )
                {
                    tokio::time::sleep(*latency).await;
                    return simulated_flex_refusal(format!("sim-flex-{call}"));
                }
                if simulated_fails(*failure_rate, &[name, req.custom_id, &call.to_string()]) {
                    tokio::time::sleep(*latency).await;
                    return simulated_failure(format!("sim-fail-{call}"));
                }
                simulate(name, *latency, *ms_per_output_token, req, &body).await
            }
        }
    }
}

/// The request body `body` (a JSON object) with its `model` set to `model`.
pub(super) fn with_model(body: &str, model: &str) -> serde_json::Result<Map<String, Value>> {
    let mut map: Map<String, Value> = serde_json::from_str(body)?;
    map.insert("model".into(), Value::String(model.to_string()));
    Ok(map)
}

#[derive(Deserialize)]
struct UsageBody {
    usage: UsageFields,
}

#[derive(Deserialize)]
struct UsageFields {
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    /// OpenAI (and most OpenAI-compatible APIs): the cached part of the prompt.
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    /// DeepSeek: the prompt's cache hits (`prompt_tokens` = hits + misses).
    #[serde(default)]
    prompt_cache_hit_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

/// Caps a count a provider reported at [`bounds::MAX_REPORTED_TOKENS`]
/// (and logs it): what a provider reports is summed into the accounting,
/// which must not overflow.
fn cap(n: u64, field: &str) -> u64 {
    if n > bounds::MAX_REPORTED_TOKENS {
        tracing::warn!(
            reported = n,
            limit = bounds::MAX_REPORTED_TOKENS,
            "provider reported an implausible usage.{field}; capped"
        );
    }
    n.min(bounds::MAX_REPORTED_TOKENS)
}

/// Reads `usage` from an OpenAI-format response body, with the cached part
/// of the prompt as OpenAI (`prompt_tokens_details.cached_tokens`) or
/// DeepSeek (`prompt_cache_hit_tokens`) reports it. Counts above
/// [`bounds::MAX_REPORTED_TOKENS`] are capped; a cached count is at most
/// the prompt.
pub fn parse_usage(body: &str) -> Option<Usage> {
    let u: UsageBody = serde_json::from_str(body).ok()?;
    let input_tokens = cap(u.usage.prompt_tokens, "prompt_tokens");
    let cached = u
        .usage
        .prompt_tokens_details
        .and_then(|d| d.cached_tokens)
        .or(u.usage.prompt_cache_hit_tokens)
        .unwrap_or(0);
    Some(Usage {
        input_tokens,
        output_tokens: cap(u.usage.completion_tokens, "completion_tokens"),
        cached_input_tokens: cap(cached, "cached_tokens").min(input_tokens),
        cache_write_tokens: 0,
    })
}

/// The usage of an Anthropic answer: `input_tokens` excludes the cache, so
/// the input is the sum of the three; capped as [`parse_usage`] caps.
pub(super) fn anthropic_usage(u: &anthropic::MessagesUsage) -> Usage {
    let cache_read = cap(u.cache_read, "cache_read_input_tokens");
    let cache_write = cap(u.cache_write, "cache_creation_input_tokens");
    let input = cap(u.input, "input_tokens")
        .saturating_add(cache_read)
        .saturating_add(cache_write)
        .min(bounds::MAX_REPORTED_TOKENS);
    Usage {
        input_tokens: input,
        output_tokens: cap(u.output, "output_tokens"),
        cached_input_tokens: cache_read.min(input),
        cache_write_tokens: cache_write.min(input - cache_read.min(input)),
    }
}

/// An HTTP answer, read in full (up to a bound).
pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) request_id: Option<String>,
    pub(super) body: String,
    pub(super) signals: Signals,
}

/// Sends `request` and reads its answer (up to [`MAX_RESPONSE_BYTES`]);
/// `Err` is the outcome when there is no usable answer.
pub(super) async fn send_http(
    request: reqwest::RequestBuilder,
    url: &str,
) -> Result<Answer, Outcome> {
    let mut response = request.send().await.map_err(|e| no_answer(&e, url))?;
    let (status, request_id, signals) = answer_head(&response);
    let bytes = read_body(&mut response, url, MAX_RESPONSE_BYTES).await?;
    Ok(Answer {
        status,
        request_id,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        signals,
    })
}

/// The status, request id and rate-limit signals of an answer's head.
pub(super) fn answer_head(response: &reqwest::Response) -> (u16, Option<String>, Signals) {
    let headers = response.headers();
    let signals = parse_signals(
        |name| headers.get(name).and_then(|v| v.to_str().ok()),
        chrono::Utc::now(),
    );
    // OpenAI's x-request-id, Anthropic's request-id.
    let request_id = ["x-request-id", "request-id"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .map(str::to_owned);
    (response.status().as_u16(), request_id, signals)
}

/// The outcome of a request that got no answer at all.
pub(super) fn no_answer(e: &reqwest::Error, url: &str) -> Outcome {
    let code = if e.is_timeout() {
        "timeout"
    } else {
        "connection_failed"
    };
    Outcome::NoAnswer {
        code,
        message: format!("{url}: {}", error_chain(e)),
    }
}

/// The outcome of an answer whose body broke off.
pub(super) fn truncated(e: &reqwest::Error, url: &str) -> Outcome {
    let code = if e.is_timeout() {
        "timeout"
    } else {
        "truncated_response"
    };
    Outcome::NoAnswer {
        code,
        message: format!("{url}: {}", error_chain(e)),
    }
}

/// The body of `response`, if it is at most `limit` bytes.
pub(super) async fn read_body(
    response: &mut reqwest::Response,
    url: &str,
    limit: usize,
) -> Result<Vec<u8>, Outcome> {
    let mut bytes = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if bytes.len() + chunk.len() > limit {
                    return Err(Outcome::NoAnswer {
                        code: "response_too_large",
                        message: format!("{url}: response body exceeds {limit} bytes"),
                    });
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(bytes),
            Err(e) => return Err(truncated(&e, url)),
        }
    }
}

/// A non-2xx answer, kept verbatim.
pub(super) fn http_error(a: Answer) -> Outcome {
    Outcome::HttpError {
        status: a.status,
        request_id: a.request_id,
        body: a.body,
        signals: a.signals,
    }
}

/// The outcome of an OpenAI-format answer.
fn finish_openai(answer: Result<Answer, Outcome>, url: &str) -> Outcome {
    let a = match answer {
        Ok(a) => a,
        Err(o) => return o,
    };
    if !(200..300).contains(&a.status) {
        return http_error(a);
    }
    match parse_usage(&a.body) {
        Some(usage) => Outcome::Success {
            status: a.status,
            request_id: a.request_id,
            body: a.body,
            usage,
            signals: a.signals,
        },
        None => Outcome::NoAnswer {
            code: "malformed_response",
            message: format!(
                "{url}: HTTP {} without a JSON body carrying usage",
                a.status
            ),
        },
    }
}

/// The outcome of a Messages API answer: a success carries the answer
/// translated into an OpenAI `chat.completion` body; errors stay verbatim
/// (Anthropic's `{"type":"error","error":{...}}`) for [`classify`].
///
/// [`classify`]: crate::dispatch::reliability::classify
fn finish_anthropic(answer: Result<Answer, Outcome>, url: &str) -> Outcome {
    let a = match answer {
        Ok(a) => a,
        Err(o) => return o,
    };
    if !(200..300).contains(&a.status) {
        return http_error(a);
    }
    anthropic_success(a, url)
}

/// A 2xx Messages API answer as a `chat.completion` [`Outcome::Success`]
/// with its usage (cache reads and writes counted in the prompt), or
/// `NoAnswer` if it is not a message with usage. Also the outcome of a
/// `succeeded` line of a Message Batch (`a` then holds its `message`).
pub(super) fn anthropic_success(a: Answer, url: &str) -> Outcome {
    match anthropic::response(&a.body, chrono::Utc::now().timestamp()) {
        Some((body, usage)) => Outcome::Success {
            status: a.status,
            request_id: a.request_id,
            body: body.to_string(),
            usage: anthropic_usage(&usage),
            signals: a.signals,
        },
        None => Outcome::NoAnswer {
            code: "malformed_response",
            message: format!(
                "{url}: HTTP {} without a Messages API body carrying usage",
                a.status
            ),
        },
    }
}

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// FNV-1a: a stable hash so simulated answers are the same on every run.
pub(super) fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The simulated answer to a request: deterministic in (provider, model, body).
pub fn simulated_response(
    provider: &str,
    req: Request<'_>,
    body: &Map<String, Value>,
) -> (Value, Usage) {
    let seed = stable_hash(&[provider, req.model, req.body]);
    let text_bytes: usize;
    match req.endpoint {
        Endpoint::Embeddings => {
            let input = body.get("input").cloned().unwrap_or(Value::Null);
            let inputs: Vec<Value> = match input {
                Value::Array(a) if a.iter().all(|x| x.is_string()) => a,
                other => vec![other],
            };
            text_bytes = inputs.iter().map(|v| v.as_str().map_or(4, str::len)).sum();
            let tokens = estimate::input_tokens(text_bytes, 0).max(1);
            let data: Vec<Value> = inputs
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let h = stable_hash(&[provider, &v.to_string()]);
                    let vector: Vec<f64> = (0..8)
                        .map(|k| (((h >> (k * 8)) & 0xff) as f64 / 127.5) - 1.0)
                        .collect();
                    json!({"object": "embedding", "index": i, "embedding": vector})
                })
                .collect();
            let usage = Usage {
                input_tokens: tokens,
                ..Usage::default()
            };
            let response = json!({
                "object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}
            });
            (response, usage)
        }
        Endpoint::ChatCompletions => {
            let messages = body
                .get("messages")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice);
            text_bytes = messages
                .iter()
                .map(|m| match m.get("content") {
                    Some(Value::String(s)) => s.len(),
                    Some(other) => other.to_string().len(),
                    None => 0,
                })
                .sum();
            let input_tokens = estimate::input_tokens(text_bytes, messages.len());
            let cap = body
                .get("max_completion_tokens")
                .or_else(|| body.get("max_tokens"))
                .and_then(Value::as_u64)
                .unwrap_or(estimate::DEFAULT_OUTPUT_TOKENS * 2);
            // Between a quarter and three quarters of the cap, deterministic per request.
            let output_tokens = (cap / 4 + seed % (cap / 2).max(1)).clamp(1, cap.max(1));
            let content = format!(
                "[simulated {provider}/{}] Reply {:08x} to {}: {} output tokens.",
                req.model, seed as u32, req.custom_id, output_tokens
            );
            let usage = Usage {
                input_tokens,
                output_tokens,
                ..Usage::default()
            };
            let response = json!({
                "id": format!("chatcmpl-sim{:016x}", seed),
                "object": "chat.completion",
                "created": chrono::Utc::now().timestamp(),
                "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
                          "total_tokens": input_tokens + output_tokens,
                          "prompt_tokens_details": {"cached_tokens": 0}}
            });
            (response, usage)
        }
    }
}

/// Whether a simulated request fails (HTTP 500), for a provider failing
/// `failure_rate` of them: deterministic in `key`.
pub(super) fn simulated_fails(failure_rate: f64, key: &[&str]) -> bool {
    let roll = stable_hash(key) % 1_000_000;
    (roll as f64) < failure_rate * 1_000_000.0
}

/// A simulated provider's flex refusal: `429 resource_unavailable`, not
/// billed, not the account's rate limit.
pub(super) fn simulated_flex_refusal(request_id: String) -> Outcome {
    Outcome::HttpError {
        status: 429,
        request_id: Some(request_id),
        body: json!({"error": {
            "message": "Resource unavailable for the flex tier (simulated).",
            "type": "invalid_request_error", "param": null, "code": "resource_unavailable"}})
        .to_string(),
        signals: Signals::default(),
    }
}

/// A simulated provider's HTTP 500.
pub(super) fn simulated_failure(request_id: String) -> Outcome {
    Outcome::HttpError {
        status: 500,
        request_id: Some(request_id),
        body: json!({"error": {
            "message": "The server had an error while processing your request (simulated).",
            "type": "server_error", "param": null, "code": null}})
        .to_string(),
        signals: Signals::default(),
    }
}

/// A simulated provider's answer to `req` (its `body` parsed), without the
/// wait: the [`simulated_response`] as a success.
pub(super) fn simulated_success(
    provider: &str,
    req: Request<'_>,
    body: &Map<String, Value>,
) -> Outcome {
    let (response, usage) = simulated_response(provider, req, body);
    Outcome::Success {
        status: 200,
        request_id: Some(format!(
            "sim-{:016x}",
            stable_hash(&[provider, req.custom_id, req.body])
        )),
        body: response.to_string(),
        usage,
        signals: Signals::default(),
    }
}

async fn simulate(
    provider: &str,
    latency: Duration,
    ms_per_output_token: f64,
    req: Request<'_>,
    body: &Map<String, Value>,
) -> Outcome {
    let outcome = simulated_success(provider, req, body);
    let output_tokens = match &outcome {
        Outcome::Success { usage, .. } => usage.output_tokens,
        _ => 0,
    };
    let extra = Duration::try_from_secs_f64(ms_per_output_token * output_tokens as f64 / 1000.0)
        .unwrap_or(bounds::MAX_CONFIG_DURATION);
    tokio::time::sleep(latency.saturating_add(extra)).await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_answers_are_deterministic_and_bounded() {
        let body = r#"{"model":"cheap-chat","messages":[{"role":"user","content":"Hi there"}],"max_tokens":40}"#;
        let req = Request {
            endpoint: Endpoint::ChatCompletions,
            model: "m",
            body,
            custom_id: "a",
            flex_timeout: None,
        };
        let map = with_model(body, "m").unwrap();
        let (r1, u1) = simulated_response("p", req, &map);
        let (r2, u2) = simulated_response("p", req, &map);
        assert_eq!(u1, u2);
        assert_eq!(r1["choices"], r2["choices"]);
        assert!((1..=40).contains(&u1.output_tokens));
        assert_eq!(parse_usage(&r1.to_string()), Some(u1));
    }

    #[test]
    fn usage_parses_from_openai_bodies() {
        let body = r#"{"id":"x","usage":{"prompt_tokens":52,"completion_tokens":9,"total_tokens":61,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        assert_eq!(
            parse_usage(body),
            Some(Usage {
                input_tokens: 52,
                output_tokens: 9,
                ..Usage::default()
            })
        );
        let body = r#"{"object":"list","usage":{"prompt_tokens":5,"total_tokens":5}}"#;
        assert_eq!(
            parse_usage(body),
            Some(Usage {
                input_tokens: 5,
                ..Usage::default()
            })
        );
        assert_eq!(parse_usage("{\"choices\":[]}"), None);
        // A hostile count is capped; one beyond u64 is no usage at all.
        let body = r#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":5}}"#;
        assert_eq!(
            parse_usage(body),
            Some(Usage {
                input_tokens: bounds::MAX_REPORTED_TOKENS,
                output_tokens: 5,
                ..Usage::default()
            })
        );
        assert_eq!(parse_usage(r#"{"usage":{"prompt_tokens":1e400}}"#), None);
    }

    #[test]
    fn cached_tokens_are_read_in_each_providers_usage_shape() {
        // OpenAI.
        let body = r#"{"usage":{"prompt_tokens":2000,"completion_tokens":10,"total_tokens":2010,"prompt_tokens_details":{"cached_tokens":1536}}}"#;
        assert_eq!(
            parse_usage(body),
            Some(Usage {
                input_tokens: 2000,
                output_tokens: 10,
                cached_input_tokens: 1536,
                cache_write_tokens: 0
            })
        );
        // DeepSeek.
        let body = r#"{"usage":{"prompt_tokens":300,"completion_tokens":20,"total_tokens":320,"prompt_cache_hit_tokens":256,"prompt_cache_miss_tokens":44}}"#;
        assert_eq!(parse_usage(body).unwrap().cached_input_tokens, 256);
        // A cached count above the prompt is capped at it.
        let body = r#"{"usage":{"prompt_tokens":5,"prompt_tokens_details":{"cached_tokens":99}}}"#;
        assert_eq!(parse_usage(body).unwrap().cached_input_tokens, 5);
        // Anthropic: input_tokens excludes the cache.
        let u = anthropic_usage(&anthropic::MessagesUsage {
            input: 20,
            cache_read: 100,
            cache_write: 30,
            output: 7,
        });
        assert_eq!(
            u,
            Usage {
                input_tokens: 150,
                output_tokens: 7,
                cached_input_tokens: 100,
                cache_write_tokens: 30
            }
        );
        let u = anthropic_usage(&anthropic::MessagesUsage {
            input: u64::MAX,
            cache_read: u64::MAX,
            cache_write: u64::MAX,
            output: u64::MAX,
        });
        assert_eq!(u.input_tokens, bounds::MAX_REPORTED_TOKENS);
        assert!(u.cached_input_tokens + u.cache_write_tokens <= u.input_tokens);
    }
}
