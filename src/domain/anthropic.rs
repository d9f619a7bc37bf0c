//! Anthropic's Messages API, translated from and to OpenAI chat completions.
//!
//! Jobs stay OpenAI batch lines. A job sent to a provider of
//! `kind = "anthropic"` has its body translated by [`request`] (system
//! messages to the top-level `system`, `stop` to `stop_sequences`, function
//! tools to `{name, description, input_schema}`, tool calls and results to
//! `tool_use` / `tool_result` blocks, image parts to image blocks), and the
//! answer translated back by [`response`] into an OpenAI `chat.completion`
//! body, so result lines look the same whichever provider answered.
//!
//! A field that has no Anthropic equivalent is an [`Untranslatable`] naming
//! it (`body.logprobs`), never silently dropped: ingest refuses the line if
//! every eligible model is Anthropic's, and keeps the job off Anthropic's
//! models otherwise. A field whose value is `null`, or the value OpenAI
//! treats as absent (`n: 1`, `logprobs: false`, a zero penalty, ...), is
//! accepted and not sent.
//!
//! Pure: no IO, no clock (the `created` time of the answer is a parameter).

use serde_json::{Map, Value, json};

/// The `anthropic-version` header sent with every request.
pub const API_VERSION: &str = "2023-06-01";

/// `max_tokens` is required by the Messages API; a job that sets neither
/// `max_tokens` nor `max_completion_tokens` gets this many.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Anthropic's `temperature` is 0 to 1 (OpenAI's 0 to 2).
const MAX_TEMPERATURE: f64 = 1.0;

/// A field of an OpenAI chat request that Anthropic's Messages API cannot
/// express.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untranslatable {
    /// Dotted path from the job line (`body.messages[2].content[0].type`).
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Untranslatable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn unsupported(field: impl Into<String>) -> Untranslatable {
    Untranslatable {
        field: field.into(),
        message: "not supported by Anthropic's Messages API".into(),
    }
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> Untranslatable {
    Untranslatable {
        field: field.into(),
        message: message.into(),
    }
}

/// Whether `v` is the value OpenAI treats as "not set" for a field with no
/// Anthropic equivalent.
fn is_inert(key: &str, v: &Value) -> bool {
    match (key, v) {
        (_, Value::Null) => true,
        ("n", v) => v.as_u64() == Some(1),
        ("logprobs" | "stream" | "store", Value::Bool(false)) => true,
        ("frequency_penalty" | "presence_penalty", v) => v.as_f64() == Some(0.0),
        ("metadata" | "logit_bias", Value::Object(m)) => m.is_empty(),
        ("response_format", v) => v["type"].as_str() == Some("text"),
        ("parallel_tool_calls", Value::Bool(true)) => true,
        ("service_tier", v) => matches!(v.as_str(), Some("auto" | "default")),
        _ => false,
    }
}

/// The Messages API request for an OpenAI chat completions `body`, with
/// `model` as the model.
pub fn request(
    body: &Map<String, Value>,
    model: &str,
) -> Result<Map<String, Value>, Untranslatable> {
    let mut out = Map::new();
    out.insert("model".into(), Value::String(model.to_string()));
    let mut max_tokens = None;
    let mut tool_choice: Option<Value> = None;
    let mut parallel = true;
    for (key, v) in body {
        let field = format!("body.{key}");
        match key.as_str() {
            "model" => {}
            "messages" => {
                let (system, messages) = messages(v)?;
                if let Some(system) = system {
                    out.insert("system".into(), Value::String(system));
                }
                out.insert("messages".into(), Value::Array(messages));
            }
            "max_tokens" | "max_completion_tokens" => {
                if !v.is_null() {
                    let n = v
                        .as_u64()
                        .filter(|&n| n >= 1)
                        .ok_or_else(|| bad(&field, "must be a positive integer"))?;
                    // max_completion_tokens wins, as with OpenAI.
                    if key == "max_completion_tokens" || max_tokens.is_none() {
                        max_tokens = Some(n);
                    }
                }
            }
            "stop" => match v {
                Value::Null => {}
                Value::String(s) => {
                    out.insert("stop_sequences".into(), json!([s]));
                }
                Value::Array(a) if a.iter().all(Value::is_string) => {
                    if !a.is_empty() {
                        out.insert("stop_sequences".into(), v.clone());
                    }
                }
                _ => return Err(bad(field, "must be a string or an array of strings")),
            },
            "temperature" => {
                if !v.is_null() {
                    let t = v.as_f64().ok_or_else(|| bad(&field, "must be a number"))?;
                    if !(0.0..=MAX_TEMPERATURE).contains(&t) {
                        return Err(bad(
                            field,
                            format!(
                                "{t} is outside Anthropic's range of 0 to {MAX_TEMPERATURE} \
                                 (OpenAI's is 0 to 2)"
                            ),
                        ));
                    }
                    out.insert("temperature".into(), v.clone());
                }
            }
            "top_p" => {
                if !v.is_null() {
                    out.insert("top_p".into(), v.clone());
                }
            }
            "user" => match v {
                Value::Null => {}
                Value::String(s) => {
                    out.insert("metadata".into(), json!({"user_id": s}));
                }
                _ => return Err(bad(field, "must be a string")),
            },
            "tools" => {
                if let Some(tools) = tools(v)? {
                    out.insert("tools".into(), Value::Array(tools));
                }
            }
            "tool_choice" => tool_choice = translate_tool_choice(v)?,
            "parallel_tool_calls" => match v {
                Value::Null | Value::Bool(true) => {}
                Value::Bool(false) => parallel = false,
                _ => return Err(bad(field, "must be a boolean")),
            },
            _ if is_inert(key, v) => {}
            _ => return Err(unsupported(field)),
        }
    }
    if !out.contains_key("messages") {
        return Err(bad("body.messages", "required"));
    }
    out.insert(
        "max_tokens".into(),
        json!(max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
    );
    if !parallel {
        let mut choice = tool_choice
            .take()
            .unwrap_or_else(|| json!({"type": "auto"}));
        if choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = Value::Bool(true);
        }
        tool_choice = Some(choice);
    }
    if let Some(choice) = tool_choice {
        out.insert("tool_choice".into(), choice);
    }
    Ok(out)
}

fn tools(v: &Value) -> Result<Option<Vec<Value>>, Untranslatable> {
    let list = match v {
        Value::Null => return Ok(None),
        Value::Array(a) => a,
        _ => return Err(bad("body.tools", "must be an array")),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let field = |f: &str| format!("body.tools[{i}].{f}");
        if t["type"] != "function" {
            return Err(bad(
                field("type"),
                "only function tools are supported by Anthropic's Messages API",
            ));
        }
        let f = &t["function"];
        let name = f["name"]
            .as_str()
            .ok_or_else(|| bad(field("function.name"), "required"))?;
        let mut tool = Map::new();
        tool.insert("name".into(), Value::String(name.to_string()));
        if let Some(d) = f["description"].as_str() {
            tool.insert("description".into(), Value::String(d.to_string()));
        }
        let schema = match &f["parameters"] {
            Value::Null => json!({"type": "object", "properties": {}}),
            p @ Value::Object(_) => p.clone(),
            _ => return Err(bad(field("function.parameters"), "must be an object")),
        };
        tool.insert("input_schema".into(), schema);
        if let Some(obj) = f.as_object() {
            for (k, v) in obj {
                match k.as_str() {
                    "name" | "description" | "parameters" => {}
                    "strict" if matches!(v, Value::Null | Value::Bool(false)) => {}
                    _ => return Err(unsupported(field(&format!("function.{k}")))),
                }
            }
        }
        out.push(Value::Object(tool));
    }
    Ok(Some(out))
}

fn translate_tool_choice(v: &Value) -> Result<Option<Value>, Untranslatable> {
    Ok(Some(match v {
        Value::Null => return Ok(None),
        Value::String(s) => match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "required" => json!({"type": "any"}),
            "none" => json!({"type": "none"}),
            other => {
                return Err(bad(
                    "body.tool_choice",
                    format!("'{other}' is not one of auto, required, none"),
                ));
            }
        },
        Value::Object(_) if v["type"] == "function" => match v["function"]["name"].as_str() {
            Some(name) => json!({"type": "tool", "name": name}),
            None => return Err(bad("body.tool_choice.function.name", "required")),
        },
        _ => return Err(unsupported("body.tool_choice")),
    }))
}

/// The text of a system (or developer) message: a string, or text parts.
fn system_text(content: &Value, field: &str) -> Result<String, Untranslatable> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => {
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(t);
                    }
                    _ => {
                        return Err(bad(
                            format!("{field}[{j}]"),
                            "a system message may hold only text with Anthropic's Messages API",
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(bad(field, "must be a string or an array of text parts")),
    }
}

/// An OpenAI content part as an Anthropic content block.
fn part(p: &Value, field: &str) -> Result<Value, Untranslatable> {
    match p["type"].as_str() {
        Some("text") => match p["text"].as_str() {
            Some(t) => Ok(json!({"type": "text", "text": t})),
            None => Err(bad(format!("{field}.text"), "required")),
        },
        Some("image_url") => {
            let url = p["image_url"]["url"]
                .as_str()
                .ok_or_else(|| bad(format!("{field}.image_url.url"), "required"))?;
            if let Some(rest) = url.strip_prefix("data:") {
                // data:<media type>;base64,<data>
                let (meta, data) = rest
                    .split_once(',')
                    .ok_or_else(|| bad(format!("{field}.image_url.url"), "a malformed data URL"))?;
                let media_type = meta.strip_suffix(";base64").ok_or_else(|| {
                    bad(
                        format!("{field}.image_url.url"),
                        "a data URL must be base64 for Anthropic's Messages API",
                    )
                })?;
                Ok(json!({"type": "image", "source":
                    {"type": "base64", "media_type": media_type, "data": data}}))
            } else if url.starts_with("https://") || url.starts_with("http://") {
                Ok(json!({"type": "image", "source": {"type": "url", "url": url}}))
            } else {
                Err(bad(
                    format!("{field}.image_url.url"),
                    "must be an http(s) or data: URL",
                ))
            }
        }
        Some(_) => Err(unsupported(format!("{field}.type"))),
        None => Err(bad(format!("{field}.type"), "required")),
    }
}

/// The content of a user or assistant message as Anthropic content: a
/// string stays a string, parts become blocks.
fn content(content: &Value, field: &str) -> Result<Value, Untranslatable> {
    match content {
        Value::String(s) => Ok(Value::String(s.clone())),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| part(p, &format!("{field}[{j}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        _ => Err(bad(field, "must be a string or an array of content parts")),
    }
}

/// Content as a list of blocks.
fn blocks(c: Value) -> Vec<Value> {
    match c {
        Value::String(s) if s.is_empty() => Vec::new(),
        Value::String(s) => vec![json!({"type": "text", "text": s})],
        Value::Array(a) => a,
        _ => Vec::new(),
    }
}

/// `(system, messages)` of a Messages request from OpenAI `messages`.
fn messages(v: &Value) -> Result<(Option<String>, Vec<Value>), Untranslatable> {
    let list = v
        .as_array()
        .ok_or_else(|| bad("body.messages", "must be an array"))?;
    let mut system: Option<String> = None;
    let mut out: Vec<Value> = Vec::new();
    // Whether the last translated message holds tool results (the next
    // tool message joins it: Anthropic wants every result of one turn in
    // the user message after it).
    let mut last_is_results = false;
    for (i, m) in list.iter().enumerate() {
        let field = |f: &str| format!("body.messages[{i}].{f}");
        let obj = m
            .as_object()
            .ok_or_else(|| bad(format!("body.messages[{i}]"), "must be an object"))?;
        let role = m["role"]
            .as_str()
            .ok_or_else(|| bad(field("role"), "required"))?;
        let allowed: &[&str] = match role {
            "system" | "developer" => &["role", "content"],
            "user" => &["role", "content"],
            "assistant" => &["role", "content", "tool_calls", "refusal"],
            "tool" => &["role", "content", "tool_call_id"],
            other => {
                return Err(bad(
                    field("role"),
                    format!("'{other}' is not supported by Anthropic's Messages API"),
                ));
            }
        };
        for (k, v) in obj {
            if !allowed.contains(&k.as_str()) && !v.is_null() {
                return Err(unsupported(field(k)));
            }
        }
        match role {
            "system" | "developer" => {
                if !out.is_empty() {
                    return Err(bad(
                        field("role"),
                        "a system message after the conversation began: Anthropic's Messages \
                         API takes the system prompt only before it",
                    ));
                }
                let text = system_text(&m["content"], &field("content"))?;
                system = Some(match system {
                    Some(s) => format!("{s}\n\n{text}"),
                    None => text,
                });
                last_is_results = false;
            }
            "user" => {
                let c = content(&m["content"], &field("content"))?;
                out.push(json!({"role": "user", "content": c}));
                last_is_results = false;
            }
            "assistant" => {
                let mut bl = match &m["content"] {
                    Value::Null => Vec::new(),
                    c => blocks(content(c, &field("content"))?),
                };
                if let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) {
                    let calls = calls
                        .as_array()
                        .ok_or_else(|| bad(field("tool_calls"), "must be an array"))?;
                    for (j, call) in calls.iter().enumerate() {
                        let cf = |f: &str| field(&format!("tool_calls[{j}].{f}"));
                        if call["type"] != "function" {
                            return Err(unsupported(cf("type")));
                        }
                        let id = call["id"]
                            .as_str()
                            .ok_or_else(|| bad(cf("id"), "required"))?;
                        let name = call["function"]["name"]
                            .as_str()
                            .ok_or_else(|| bad(cf("function.name"), "required"))?;
                        let input: Value = match &call["function"]["arguments"] {
                            Value::String(s) if s.trim().is_empty() => json!({}),
                            Value::String(s) => serde_json::from_str(s)
                                .ok()
                                .filter(Value::is_object)
                                .ok_or_else(|| {
                                    bad(cf("function.arguments"), "must be a JSON object as text")
                                })?,
                            _ => return Err(bad(cf("function.arguments"), "required")),
                        };
                        bl.push(
                            json!({"type": "tool_use", "id": id, "name": name, "input": input}),
                        );
                    }
                }
                if bl.is_empty() {
                    return Err(bad(
                        field("content"),
                        "an assistant message needs content or tool_calls",
                    ));
                }
                out.push(json!({"role": "assistant", "content": bl}));
                last_is_results = false;
            }
            "tool" => {
                let id = m["tool_call_id"]
                    .as_str()
                    .ok_or_else(|| bad(field("tool_call_id"), "required"))?;
                let c = match &m["content"] {
                    Value::String(s) => Value::String(s.clone()),
                    c @ Value::Array(_) => content(c, &field("content"))?,
                    _ => return Err(bad(field("content"), "required")),
                };
                let block = json!({"type": "tool_result", "tool_use_id": id, "content": c});
                match out.last_mut() {
                    Some(last) if last_is_results => {
                        if let Some(a) = last["content"].as_array_mut() {
                            a.push(block);
                        }
                    }
                    _ => out.push(json!({"role": "user", "content": [block]})),
                }
                last_is_results = true;
            }
            _ => unreachable!("roles are checked above"),
        }
    }
    if out.is_empty() {
        return Err(bad(
            "body.messages",
            "needs at least one user or assistant message besides the system prompt",
        ));
    }
    Ok((system, out))
}

/// Tokens of an Anthropic answer. `input` excludes cached tokens, as
/// Anthropic reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MessagesUsage {
    pub input: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub output: u64,
}

impl MessagesUsage {
    /// All input tokens: uncached, read from the cache and written to it.
    pub fn prompt_tokens(&self) -> u64 {
        self.input
            .saturating_add(self.cache_read)
            .saturating_add(self.cache_write)
    }
}

/// OpenAI's `finish_reason` for an Anthropic `stop_reason`.
pub fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens") | Some("model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        // end_turn, stop_sequence, pause_turn
        _ => "stop",
    }
}

/// The OpenAI `chat.completion` body for a Messages API answer, and its
/// usage; `None` if the answer is not a message with usage. `created` is
/// the Unix time stamped on it (Anthropic's answer has none).
pub fn response(body: &str, created: i64) -> Option<(Value, MessagesUsage)> {
    let v: Value = serde_json::from_str(body).ok()?;
    let u = v.get("usage")?;
    let count = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let usage = MessagesUsage {
        input: u.get("input_tokens")?.as_u64()?,
        cache_read: count("cache_read_input_tokens"),
        cache_write: count("cache_creation_input_tokens"),
        output: count("output_tokens"),
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in v["content"].as_array().map_or(&[][..], Vec::as_slice) {
        match block["type"].as_str() {
            Some("text") => text.push_str(block["text"].as_str().unwrap_or_default()),
            Some("tool_use") => calls.push(json!({
                "id": block["id"],
                "type": "function",
                "function": {"name": block["name"], "arguments": block["input"].to_string()}
            })),
            // thinking, redacted_thinking, server tool blocks: not content.
            _ => {}
        }
    }
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) },
        "refusal": null,
    });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let prompt = usage.prompt_tokens();
    let out = json!({
        "id": v["id"],
        "object": "chat.completion",
        "created": created,
        "model": v["model"],
        "choices": [{"index": 0, "message": message, "logprobs": null,
                     "finish_reason": finish_reason(v["stop_reason"].as_str())}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": usage.output,
            "total_tokens": prompt.saturating_add(usage.output),
            "prompt_tokens_details": {"cached_tokens": usage.cache_read},
        }
    });
    Some((out, usage))
}

/// Whether an Anthropic error message tells of a spend limit (the monthly
/// cap reached, the credit balance used up) rather than a rate limit or a
/// bad request. Anthropic answers these with a 429 without `retry-after`, or
/// a 400: retrying cannot succeed until someone pays.
pub fn is_spend_limit(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "spend limit",
        "spending limit",
        "credit balance",
        "usage limit",
        "billing",
    ]
    .iter()
    .any(|w| m.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_chat_request_translates_with_system_stop_and_max_tokens() {
        let body = map(json!({
            "model": "cheap", "temperature": 0.2, "top_p": 0.9, "stop": "END", "n": 1,
            "max_tokens": 64, "user": "u-1", "logprobs": false,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "No lists."}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]},
            ]
        }));
        let r = Value::Object(request(&body, "claude-haiku-4-5").unwrap());
        assert_eq!(
            r,
            json!({
                "model": "claude-haiku-4-5", "system": "Be brief.\n\nNo lists.",
                "max_tokens": 64, "stop_sequences": ["END"], "temperature": 0.2, "top_p": 0.9,
                "metadata": {"user_id": "u-1"},
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}]}]
            })
        );
        // max_completion_tokens wins; neither gives the default.
        let body = map(json!({"messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 9, "max_tokens": 99}));
        assert_eq!(request(&body, "m").unwrap()["max_tokens"], 9);
        let body =
            map(json!({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b"]}));
        let r = request(&body, "m").unwrap();
        assert_eq!(r["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(r["stop_sequences"], json!(["a", "b"]));
        assert!(r.get("system").is_none());
    }

    #[test]
    fn tools_tool_calls_and_tool_results_translate() {
        let body = map(json!({
            "messages": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12C"},
                {"role": "tool", "tool_call_id": "call_2", "content": "18C"},
            ],
            "tools": [{"type": "function", "function": {"name": "weather", "description": "Current weather",
                       "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
            "parallel_tool_calls": false,
        }));
        let r = request(&body, "m").unwrap();
        assert_eq!(
            r["tools"],
            json!([{"name": "weather", "description": "Current weather",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}])
        );
        assert_eq!(
            r["tool_choice"],
            json!({"type": "tool", "name": "weather", "disable_parallel_tool_use": true})
        );
        assert_eq!(
            r["messages"],
            json!([
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "12C"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "18C"}]}
            ])
        );
        for (choice, want) in [
            ("auto", json!({"type": "auto"})),
            ("required", json!({"type": "any"})),
            ("none", json!({"type": "none"})),
        ] {
            let body =
                map(json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": choice}));
            assert_eq!(request(&body, "m").unwrap()["tool_choice"], want);
        }
    }

    #[test]
    fn untranslatable_fields_are_named() {
        let base = || json!({"messages": [{"role": "user", "content": "hi"}]});
        for (key, value, field) in [
            ("logprobs", json!(true), "body.logprobs"),
            ("top_logprobs", json!(2), "body.top_logprobs"),
            ("n", json!(2), "body.n"),
            ("seed", json!(7), "body.seed"),
            ("frequency_penalty", json!(0.5), "body.frequency_penalty"),
            ("logit_bias", json!({"50256": -100}), "body.logit_bias"),
            (
                "response_format",
                json!({"type": "json_object"}),
                "body.response_format",
            ),
            ("stream", json!(true), "body.stream"),
            ("temperature", json!(1.5), "body.temperature"),
            (
                "tools",
                json!([{"type": "custom", "custom": {"name": "x"}}]),
                "body.tools[0].type",
            ),
        ] {
            let mut b = base();
            b[key] = value;
            let e = request(&map(b), "m").unwrap_err();
            assert_eq!(e.field, field, "{key}: {e}");
        }
        let e = request(&map(base()), "m").map(|_| ());
        assert!(e.is_ok());
        let e = request(&map(json!({"logprobs": true, "messages": []})), "m").unwrap_err();
        assert_eq!(
            e.to_string(),
            "body.logprobs: not supported by Anthropic's Messages API"
        );
        let late_system = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]});
        assert_eq!(
            request(&map(late_system), "m").unwrap_err().field,
            "body.messages[1].role"
        );
        let audio = json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]});
        assert_eq!(
            request(&map(audio), "m").unwrap_err().field,
            "body.messages[0].content[0].type"
        );
        let named = json!({"messages": [{"role": "user", "content": "hi", "name": "bob"}]});
        assert_eq!(
            request(&map(named), "m").unwrap_err().field,
            "body.messages[0].name"
        );
    }

    #[test]
    fn answers_translate_back_to_chat_completions() {
        let answer = json!({
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there."}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 20, "output_tokens": 7,
                      "cache_read_input_tokens": 100, "cache_creation_input_tokens": 30}
        });
        let (v, u) = response(&answer.to_string(), 1_795_000_000).unwrap();
        assert_eq!(
            u,
            MessagesUsage {
                input: 20,
                cache_read: 100,
                cache_write: 30,
                output: 7
            }
        );
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["id"], "msg_01");
        assert_eq!(v["created"], 1_795_000_000);
        assert_eq!(v["choices"][0]["message"]["content"], "Hello there.");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 150, "completion_tokens": 7, "total_tokens": 157,
                   "prompt_tokens_details": {"cached_tokens": 100}})
        );
        let tool = json!({
            "id": "msg_02", "type": "message", "role": "assistant", "model": "m",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 5, "output_tokens": 3}
        });
        let (v, u) = response(&tool.to_string(), 0).unwrap();
        assert_eq!(u.prompt_tokens(), 5);
        let m = &v["choices"][0]["message"];
        assert_eq!(m["content"], Value::Null);
        assert_eq!(
            m["tool_calls"],
            json!([{"id": "toolu_1", "type": "function",
                    "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}])
        );
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        for (stop, want) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
        ] {
            assert_eq!(finish_reason(Some(stop)), want);
        }
        assert_eq!(response("{\"type\":\"message\"}", 0), None);
        assert_eq!(response("not json", 0), None);
    }

    #[test]
    fn spend_limits_are_told_from_rate_limits() {
        assert!(is_spend_limit(
            "You have reached your specified API usage limits. You will regain access on 2026-12-01."
        ));
        assert!(is_spend_limit(
            "Your credit balance is too low to access the Anthropic API."
        ));
        assert!(!is_spend_limit(
            "Number of request tokens has exceeded your per-minute rate limit"
        ));
        assert!(!is_spend_limit("max_tokens: Field required"));
    }
}
