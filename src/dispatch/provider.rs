//! Provider clients: send one request, return what happened.
//!
//! [`ProviderClient::Http`] speaks the OpenAI wire format over reqwest
//! (rustls) to any OpenAI-compatible API. [`ProviderClient::Simulated`]
//! answers in-process with a deterministic completion, realistic `usage` and
//! latency, so the daemon runs with no API keys.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::config::{Secret, Transport};
use crate::dispatch::reliability::{Outcome, Signals, Usage, parse_signals};
use crate::domain::pricing::Endpoint;
use crate::domain::{bounds, estimate};

/// Upper bound on a provider response body we keep.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// One request to a provider.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub endpoint: Endpoint,
    /// The model id the provider knows.
    pub model: &'a str,
    /// The job's request body; its `model` is replaced by [`Request::model`].
    pub body: &'a str,
    pub custom_id: &'a str,
}

/// A client for one provider.
pub enum ProviderClient {
    Http {
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
                base_url,
                api_key,
                key,
                timeout,
                connect_timeout,
                ..
            } => ProviderClient::Http {
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
            },
        })
    }

    /// Sends one request.
    pub async fn send(&self, req: Request<'_>) -> Outcome {
        let body = match with_model(req.body, req.model) {
            Ok(b) => b,
            Err(e) => {
                return Outcome::NoAnswer {
                    code: "invalid_body",
                    message: e.to_string(),
                };
            }
        };
        match self {
            ProviderClient::Http {
                base_url,
                api_key,
                client,
            } => send_http(client, base_url, api_key, req.endpoint, body).await,
            ProviderClient::Simulated {
                name,
                latency,
                ms_per_output_token,
                failure_rate,
                calls,
            } => {
                let call = calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let roll = stable_hash(&[name, req.custom_id, &call.to_string()]) % 1_000_000;
                if (roll as f64) < failure_rate * 1_000_000.0 {
                    tokio::time::sleep(*latency).await;
                    return Outcome::HttpError {
                        status: 500,
                        request_id: Some(format!("sim-fail-{call}")),
                        body: json!({"error": {
                            "message": "The server had an error while processing your request (simulated).",
                            "type": "server_error", "param": null, "code": null}})
                        .to_string(),
                        signals: Signals::default(),
                    };
                }
                simulate(name, *latency, *ms_per_output_token, req, &body).await
            }
        }
    }
}

fn with_model(body: &str, model: &str) -> serde_json::Result<Map<String, Value>> {
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
}

/// Reads `usage` from an OpenAI-format response body. Counts above
/// [`bounds::MAX_REPORTED_TOKENS`] are capped (and logged): what a provider
/// reports is summed into the accounting, which must not overflow.
pub fn parse_usage(body: &str) -> Option<Usage> {
    let u: UsageBody = serde_json::from_str(body).ok()?;
    let cap = |n: u64, field: &str| {
        if n > bounds::MAX_REPORTED_TOKENS {
            tracing::warn!(
                reported = n,
                limit = bounds::MAX_REPORTED_TOKENS,
                "provider reported an implausible usage.{field}; capped"
            );
        }
        n.min(bounds::MAX_REPORTED_TOKENS)
    };
    Some(Usage {
        input_tokens: cap(u.usage.prompt_tokens, "prompt_tokens"),
        output_tokens: cap(u.usage.completion_tokens, "completion_tokens"),
    })
}

async fn send_http(
    client: &reqwest::Client,
    base_url: &str,
    api_key: &Secret,
    endpoint: Endpoint,
    body: Map<String, Value>,
) -> Outcome {
    // base_url ends in /v1, as with the official SDKs.
    let path = endpoint.as_url().trim_start_matches("/v1");
    let url = format!("{base_url}{path}");
    let response = client
        .post(&url)
        .bearer_auth(api_key.expose())
        .json(&body)
        .send()
        .await;
    let mut response = match response {
        Ok(r) => r,
        Err(e) => {
            let code = if e.is_timeout() {
                "timeout"
            } else {
                "connection_failed"
            };
            return Outcome::NoAnswer {
                code,
                message: format!("{url}: {}", error_chain(&e)),
            };
        }
    };
    let status = response.status().as_u16();
    let headers = response.headers();
    let signals = parse_signals(
        |name| headers.get(name).and_then(|v| v.to_str().ok()),
        chrono::Utc::now(),
    );
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut bytes = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Outcome::NoAnswer {
                        code: "response_too_large",
                        message: format!("{url}: response body exceeds {MAX_RESPONSE_BYTES} bytes"),
                    };
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                let code = if e.is_timeout() {
                    "timeout"
                } else {
                    "truncated_response"
                };
                return Outcome::NoAnswer {
                    code,
                    message: format!("{url}: {}", error_chain(&e)),
                };
            }
        }
    }
    let body = String::from_utf8_lossy(&bytes).into_owned();
    if !(200..300).contains(&status) {
        return Outcome::HttpError {
            status,
            request_id,
            body,
            signals,
        };
    }
    match parse_usage(&body) {
        Some(usage) => Outcome::Success {
            status,
            request_id,
            body,
            usage,
            signals,
        },
        None => Outcome::NoAnswer {
            code: "malformed_response",
            message: format!("{url}: HTTP {status} without a JSON body carrying usage"),
        },
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
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
fn stable_hash(parts: &[&str]) -> u64 {
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
                output_tokens: 0,
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

async fn simulate(
    provider: &str,
    latency: Duration,
    ms_per_output_token: f64,
    req: Request<'_>,
    body: &Map<String, Value>,
) -> Outcome {
    let (response, usage) = simulated_response(provider, req, body);
    let extra =
        Duration::try_from_secs_f64(ms_per_output_token * usage.output_tokens as f64 / 1000.0)
            .unwrap_or(bounds::MAX_CONFIG_DURATION);
    tokio::time::sleep(latency.saturating_add(extra)).await;
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
                output_tokens: 9
            })
        );
        let body = r#"{"object":"list","usage":{"prompt_tokens":5,"total_tokens":5}}"#;
        assert_eq!(
            parse_usage(body),
            Some(Usage {
                input_tokens: 5,
                output_tokens: 0
            })
        );
        assert_eq!(parse_usage("{\"choices\":[]}"), None);
        // A hostile count is capped; one beyond u64 is no usage at all.
        let body = r#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":5}}"#;
        assert_eq!(
            parse_usage(body),
            Some(Usage {
                input_tokens: bounds::MAX_REPORTED_TOKENS,
                output_tokens: 5
            })
        );
        assert_eq!(parse_usage(r#"{"usage":{"prompt_tokens":1e400}}"#), None);
    }
}
