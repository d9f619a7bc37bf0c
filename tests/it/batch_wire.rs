//! The Batch API clients (`dispatch::batch_api`) against the loopback batch
//! servers: OpenAI's upload + create + poll + results, Anthropic's inline
//! create with the Messages translation both ways, line fates (failed,
//! expired, cancelled), rate limits, refusals, lost batches found again,
//! and the simulated provider's in-memory batches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use nightshift::config::{KeyRef, KeySource, Secret, Transport};
use nightshift::dispatch::batch_api::{
    BatchError, BatchLine, LineResult, RemoteBatch, RemoteState,
};
use nightshift::dispatch::provider::{ProviderClient, Request};
use nightshift::dispatch::reliability::Outcome;
use nightshift::domain::pricing::{Endpoint, Wire};
use serde_json::{Value, json};

use crate::batch_server::{BatchBehaviour, LineFate, LoopbackBatchProvider};
use crate::common::{KEY_ENV, TEST_KEY, wait_until_async};

const T: Duration = Duration::from_secs(20);

/// An HTTP client for `wire` at `base_url` with `key`, built from a
/// transport as the configuration builds it.
fn http_client_with_key(wire: Wire, base_url: String, key: &str) -> ProviderClient {
    let transport = Transport::OpenAi {
        wire,
        base_url,
        api_key: Some(Secret::new(key)),
        key: KeyRef {
            source: KeySource::Env(KEY_ENV.into()),
            file: "batch_wire.toml".into(),
            line: None,
            field: "providers[0].api_key_env".into(),
        },
        key_source: format!("env {KEY_ENV}"),
        timeout: None,
        connect_timeout: None,
    };
    ProviderClient::new("loop", &transport, Duration::from_secs(10)).unwrap()
}

fn http_client(server: &LoopbackBatchProvider, wire: Wire) -> ProviderClient {
    http_client_with_key(wire, server.base_url(), TEST_KEY)
}

fn simulated_client(failure_rate: f64) -> ProviderClient {
    let transport = Transport::Simulated {
        latency: Duration::from_millis(1),
        ms_per_output_token: 0.0,
        failure_rate,
    };
    ProviderClient::new("sim", &transport, Duration::from_secs(10)).unwrap()
}

/// `n` chat lines `ns1_j{i}` asking for `hello {i}`.
fn lines(n: usize) -> Vec<BatchLine> {
    (1..=n)
        .map(|i| BatchLine {
            custom_id: format!("ns1_j{i}"),
            body: json!({"model": "job-model", "max_tokens": 20,
                         "messages": [{"role": "user", "content": format!("hello {i}")}]})
            .to_string(),
        })
        .collect()
}

fn line(custom_id: &str, body: Value) -> BatchLine {
    BatchLine {
        custom_id: custom_id.into(),
        body: body.to_string(),
    }
}

/// Polls the batch until it has ended (or failed).
async fn wait_ended(client: &ProviderClient, id: &str) -> RemoteBatch {
    let mut last = None;
    wait_until_async(&format!("batch {id} to end"), T, async || {
        let b = client.batch_get(id).await.unwrap();
        let done = matches!(
            b.state,
            RemoteState::Ended { .. } | RemoteState::Failed { .. }
        );
        last = Some(b);
        done
    })
    .await;
    last.unwrap()
}

/// Uploads (where the wire needs it) and creates a batch of `lines`.
async fn submit(client: &ProviderClient, tag: &str, lines: &[BatchLine]) -> RemoteBatch {
    let file = if client.batch_uploads() {
        Some(
            client
                .batch_upload(tag, Endpoint::ChatCompletions, "wire-model", lines)
                .await
                .unwrap(),
        )
    } else {
        None
    };
    client
        .batch_create(
            tag,
            file.as_deref(),
            Endpoint::ChatCompletions,
            "wire-model",
            lines,
            "24h",
        )
        .await
        .unwrap()
}

fn by_id(results: Vec<LineResult>) -> HashMap<String, Option<Outcome>> {
    results
        .into_iter()
        .map(|r| (r.custom_id, r.outcome))
        .collect()
}

fn body_of(o: &Outcome) -> Value {
    match o {
        Outcome::Success { body, .. } | Outcome::HttpError { body, .. } => {
            serde_json::from_str(body).unwrap()
        }
        Outcome::NoAnswer { .. } => panic!("no answer: {o:?}"),
    }
}

// ---- OpenAI -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_batch_is_uploaded_created_polled_and_joined_on_custom_id() {
    let server = LoopbackBatchProvider::openai(BatchBehaviour::default()).await;
    let client = http_client(&server, Wire::OpenAi);
    assert!(client.batch_uploads());
    let lines = lines(3);
    let file = client
        .batch_upload("ns1", Endpoint::ChatCompletions, "wire-model", &lines)
        .await
        .unwrap();
    assert_eq!(server.uploads(), 1);
    // Each line as the Batch API wants it, with the wire model.
    let seen = server.lines_seen();
    assert_eq!(seen.len(), 3);
    for (s, l) in seen.iter().zip(&lines) {
        assert_eq!(s["custom_id"], l.custom_id.as_str());
        assert_eq!(s["method"], "POST");
        assert_eq!(s["url"], "/v1/chat/completions");
        assert_eq!(s["body"]["model"], "wire-model");
        assert_eq!(s["body"]["max_tokens"], 20);
    }

    let created = client
        .batch_create(
            "ns1",
            Some(&file),
            Endpoint::ChatCompletions,
            "wire-model",
            &lines,
            "24h",
        )
        .await
        .unwrap();
    assert_eq!(created.state, RemoteState::Running);
    assert_eq!(created.status, "validating");
    assert_eq!((created.total, created.finished), (3, 0));
    assert_eq!(server.creates(), 1);

    let ended = wait_ended(&client, &created.id).await;
    assert_eq!(ended.status, "completed");
    assert!(
        matches!(
            &ended.state,
            RemoteState::Ended {
                output: Some(_),
                errors: None
            }
        ),
        "{ended:?}"
    );
    assert_eq!((ended.total, ended.finished), (3, 3));

    let results = by_id(client.batch_results(&ended).await.unwrap());
    assert_eq!(results.len(), 3);
    for (i, l) in lines.iter().enumerate() {
        let outcome = results[&l.custom_id].as_ref().expect("the line ran");
        let Outcome::Success {
            status,
            request_id,
            usage,
            ..
        } = outcome
        else {
            panic!("{outcome:?}")
        };
        assert_eq!(*status, 200);
        assert!(request_id.as_deref().is_some_and(|r| r.starts_with("req_")));
        assert_eq!((usage.input_tokens, usage.output_tokens), (100, 10));
        assert_eq!(usage.cached_input_tokens, 0);
        let body = body_of(outcome);
        assert_eq!(body["model"], "wire-model");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            format!("batch echo: hello {}", i + 1)
        );
    }
    assert_eq!(server.sync_calls(), 0);

    // The same provider still answers synchronously (the fallback).
    let outcome = client
        .send(Request {
            endpoint: Endpoint::ChatCompletions,
            model: "wire-model",
            body: &lines[0].body,
            custom_id: "sync1",
            flex_timeout: None,
        })
        .await;
    assert!(matches!(outcome, Outcome::Success { .. }), "{outcome:?}");
    assert_eq!(server.sync_calls(), 1);
    assert_eq!(server.batches()[0].status, "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_batch_reports_cached_tokens() {
    let server = LoopbackBatchProvider::openai(BatchBehaviour {
        prompt_tokens: 2000,
        cached_tokens: 1536,
        ..BatchBehaviour::default()
    })
    .await;
    let client = http_client(&server, Wire::OpenAi);
    let batch = submit(&client, "ns2", &lines(1)).await;
    let ended = wait_ended(&client, &batch.id).await;
    let results = client.batch_results(&ended).await.unwrap();
    let Some(Outcome::Success { usage, .. }) = &results[0].outcome else {
        panic!("{results:?}")
    };
    assert_eq!(
        (usage.input_tokens, usage.cached_input_tokens),
        (2000, 1536)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_failed_lines_are_http_errors_and_expired_ones_not_run() {
    let server = LoopbackBatchProvider::openai(BatchBehaviour {
        fate: Arc::new(|id, _| match id {
            "ns3_fail" => LineFate::Fail(500),
            "ns3_bad" => LineFate::Fail(400),
            "ns3_late" => LineFate::Expire,
            _ => LineFate::Succeed,
        }),
        ..BatchBehaviour::default()
    })
    .await;
    let client = http_client(&server, Wire::OpenAi);
    let body = json!({"messages": [{"role": "user", "content": "x"}]});
    let batch_lines: Vec<BatchLine> = ["ns3_ok", "ns3_fail", "ns3_bad", "ns3_late"]
        .iter()
        .map(|id| line(id, body.clone()))
        .collect();
    let batch = submit(&client, "ns3", &batch_lines).await;
    let ended = wait_ended(&client, &batch.id).await;
    assert_eq!(ended.status, "expired");
    assert!(
        matches!(
            &ended.state,
            RemoteState::Ended {
                output: Some(_),
                errors: Some(_)
            }
        ),
        "{ended:?}"
    );
    let results = by_id(client.batch_results(&ended).await.unwrap());
    assert_eq!(results.len(), 4);
    assert!(matches!(results["ns3_ok"], Some(Outcome::Success { .. })));
    let failed = results["ns3_fail"].as_ref().unwrap();
    assert!(
        matches!(failed, Outcome::HttpError { status: 500, .. }),
        "{failed:?}"
    );
    assert_eq!(body_of(failed)["error"]["type"], "server_error");
    let bad = results["ns3_bad"].as_ref().unwrap();
    assert!(
        matches!(bad, Outcome::HttpError { status: 400, .. }),
        "{bad:?}"
    );
    assert_eq!(body_of(bad)["error"]["type"], "invalid_request_error");
    assert_eq!(results["ns3_late"], None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_create_429_is_a_rate_limit_with_retry_after() {
    let server = LoopbackBatchProvider::openai(BatchBehaviour {
        create_429s: 1,
        ..BatchBehaviour::default()
    })
    .await;
    let client = http_client(&server, Wire::OpenAi);
    let lines = lines(1);
    let file = client
        .batch_upload("ns4", Endpoint::ChatCompletions, "wire-model", &lines)
        .await
        .unwrap();
    let create = || {
        client.batch_create(
            "ns4",
            Some(&file),
            Endpoint::ChatCompletions,
            "m",
            &lines,
            "24h",
        )
    };
    assert_eq!(
        create().await,
        Err(BatchError::RateLimited {
            retry_after: Some(Duration::from_secs(1))
        })
    );
    assert_eq!(server.creates(), 0);
    let batch = create().await.unwrap();
    assert_eq!(batch.state, RemoteState::Running);
    assert_eq!((server.create_attempts(), server.creates()), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_unknown_batches_and_files_are_not_found_and_bad_requests_refused() {
    let server = LoopbackBatchProvider::openai(BatchBehaviour::default()).await;
    let client = http_client(&server, Wire::OpenAi);
    assert_eq!(
        client.batch_get("batch_nope").await,
        Err(BatchError::NotFound)
    );
    assert_eq!(
        client.batch_cancel("batch_nope").await,
        Err(BatchError::NotFound)
    );
    let gone = RemoteBatch {
        id: "batch_nope".into(),
        state: RemoteState::Ended {
            output: Some("file-nope".into()),
            errors: None,
        },
        status: "completed".into(),
        total: 1,
        finished: 1,
    };
    assert_eq!(client.batch_results(&gone).await, Err(BatchError::NotFound));
    // A path-like id stays one path segment.
    assert_eq!(
        client.batch_get("../files").await,
        Err(BatchError::NotFound)
    );

    // 400 from the provider: an unknown input file.
    let err = client
        .batch_create(
            "ns5",
            Some("file-missing"),
            Endpoint::ChatCompletions,
            "m",
            &lines(1),
            "24h",
        )
        .await
        .unwrap_err();
    let BatchError::Refused { status, message } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*status, 400);
    assert!(message.contains("input_file_id"), "{message}");

    // A body that is not JSON is refused before anything is sent.
    let err = client
        .batch_upload(
            "ns5",
            Endpoint::ChatCompletions,
            "m",
            &[line("ns5_x", json!(1))],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, BatchError::Refused { status: 400, .. }),
        "{err:?}"
    );
    assert_eq!(server.uploads(), 0);

    // A wrong key: refused for good (401), the message is the provider's.
    let wrong = http_client_with_key(Wire::OpenAi, server.base_url(), "sk-wrong");
    let err = wrong.batch_get("batch_x").await.unwrap_err();
    assert_eq!(
        err,
        BatchError::Refused {
            status: 401,
            message: "Incorrect API key provided.".into()
        }
    );

    // No server at all: transient.
    let nowhere = http_client_with_key(Wire::OpenAi, "http://127.0.0.1:9/v1".into(), TEST_KEY);
    assert!(matches!(
        nowhere.batch_get("batch_x").await,
        Err(BatchError::Transient(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_batch_whose_lines_do_not_match_its_endpoint_fails_as_a_whole() {
    let server = LoopbackBatchProvider::openai(BatchBehaviour::default()).await;
    let client = http_client(&server, Wire::OpenAi);
    let lines = lines(2);
    let file = client
        .batch_upload("ns6", Endpoint::Embeddings, "wire-model", &lines)
        .await
        .unwrap();
    // The lines say /v1/embeddings, the batch /v1/chat/completions.
    let batch = client
        .batch_create(
            "ns6",
            Some(&file),
            Endpoint::ChatCompletions,
            "wire-model",
            &lines,
            "24h",
        )
        .await
        .unwrap();
    let RemoteState::Failed { message } = &batch.state else {
        panic!("{batch:?}")
    };
    assert!(message.starts_with("line 1: "), "{message}");
    assert_eq!(batch.status, "failed");
    assert_eq!(client.batch_results(&batch).await, Ok(Vec::new()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_cancel_of_a_never_ending_batch_ends_it_with_unfinished_lines_not_run() {
    let server = LoopbackBatchProvider::openai(BatchBehaviour {
        never_end: true,
        cancel_delay: Duration::from_millis(200),
        ..BatchBehaviour::default()
    })
    .await;
    let client = http_client(&server, Wire::OpenAi);
    let batch = submit(&client, "ns7", &lines(2)).await;
    assert_eq!(
        client.batch_get(&batch.id).await.unwrap().status,
        "in_progress"
    );
    // Not ended: no results yet.
    assert!(matches!(
        client.batch_results(&batch).await,
        Err(BatchError::Transient(_))
    ));
    let cancelling = client.batch_cancel(&batch.id).await.unwrap();
    assert_eq!(cancelling.state, RemoteState::Cancelling);
    assert_eq!(cancelling.status, "cancelling");
    let ended = wait_ended(&client, &batch.id).await;
    assert_eq!(ended.status, "cancelled");
    // Neither line ran: both are absent from the (empty) results.
    let results = client.batch_results(&ended).await.unwrap();
    assert!(results.iter().all(|r| r.outcome.is_none()), "{results:?}");
    // Cancelling an ended batch (the provider answers 400) returns it.
    let again = client.batch_cancel(&batch.id).await.unwrap();
    assert_eq!(again, ended);
    assert_eq!(server.cancels(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_batch_find_matches_the_tag_across_pages() {
    let server = LoopbackBatchProvider::openai(BatchBehaviour {
        list_page_cap: 2,
        ..BatchBehaviour::default()
    })
    .await;
    let client = http_client(&server, Wire::OpenAi);
    let since = Utc::now();
    let mut ids = Vec::new();
    for tag in ["ns10", "ns11", "ns12", "ns13", "ns14"] {
        ids.push(submit(&client, tag, &lines(1)).await.id);
    }
    // The oldest is on the third page of two.
    let found = client.batch_find("ns10", since, 1, &[]).await.unwrap();
    assert_eq!(found.map(|b| b.id), Some(ids[0].clone()));
    let found = client.batch_find("ns13", since, 1, &[]).await.unwrap();
    assert_eq!(found.map(|b| b.id), Some(ids[3].clone()));
    assert_eq!(client.batch_find("ns99", since, 1, &[]).await, Ok(None));
    // Batches created before `since` are not looked at.
    let later = Utc::now() + chrono::Duration::seconds(5);
    assert_eq!(client.batch_find("ns10", later, 1, &[]).await, Ok(None));
}

// ---- Anthropic --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_batch_translates_requests_and_answers_with_the_cache_in_usage() {
    let server = LoopbackBatchProvider::anthropic(BatchBehaviour {
        prompt_tokens: 20,
        cached_tokens: 100,
        cache_write_tokens: 30,
        completion_tokens: 7,
        ..BatchBehaviour::default()
    })
    .await;
    let client = http_client(&server, Wire::Anthropic);
    assert!(!client.batch_uploads());
    let body = |q: &str| {
        json!({"model": "chat", "max_tokens": 20, "stop": ["END"], "temperature": 0.3,
               "messages": [{"role": "system", "content": "Answer in one word."},
                            {"role": "user", "content": q}]})
    };
    let batch_lines = vec![
        line("ns20_a", body("Capital of France?")),
        line("ns20_b", body("Capital of Italy?")),
    ];
    let batch = client
        .batch_create(
            "ns20",
            None,
            Endpoint::ChatCompletions,
            "claude-haiku-4-5",
            &batch_lines,
            "24h",
        )
        .await
        .unwrap();
    assert_eq!(batch.state, RemoteState::Running);
    assert_eq!((batch.status.as_str(), batch.total), ("in_progress", 2));

    // What the server got: Messages params, inline.
    let seen = server.lines_seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0]["custom_id"], "ns20_a");
    let p = &seen[0]["params"];
    assert_eq!(p["model"], "claude-haiku-4-5");
    assert_eq!(p["system"], "Answer in one word.");
    assert_eq!(p["stop_sequences"], json!(["END"]));
    assert_eq!(p["max_tokens"], 20);
    assert_eq!(
        p["messages"],
        json!([{"role": "user", "content": "Capital of France?"}])
    );
    assert!(p.get("stop").is_none());

    let ended = wait_ended(&client, &batch.id).await;
    assert_eq!(ended.status, "ended");
    let RemoteState::Ended {
        output: Some(url),
        errors: None,
    } = &ended.state
    else {
        panic!("{ended:?}")
    };
    assert!(url.starts_with(&format!("{}/v1/messages/batches/", server.base_url())));
    assert_eq!((ended.total, ended.finished), (2, 2));

    let results = by_id(client.batch_results(&ended).await.unwrap());
    let outcome = results["ns20_a"].as_ref().unwrap();
    let Outcome::Success { usage, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(
        usage.input_tokens, 150,
        "input + cache read + cache creation"
    );
    assert_eq!(
        (
            usage.cached_input_tokens,
            usage.cache_write_tokens,
            usage.output_tokens
        ),
        (100, 30, 7)
    );
    let body = body_of(outcome);
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "claude-haiku-4-5");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "batch echo: Capital of France?"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 150);
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 100);
    assert!(matches!(results["ns20_b"], Some(Outcome::Success { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_errored_lines_carry_their_status_and_expired_ones_are_not_run() {
    let server = LoopbackBatchProvider::anthropic(BatchBehaviour {
        fate: Arc::new(|id, _| match id {
            "ns21_busy" => LineFate::Fail(529),
            "ns21_bad" => LineFate::Fail(400),
            "ns21_late" => LineFate::Expire,
            _ => LineFate::Succeed,
        }),
        ..BatchBehaviour::default()
    })
    .await;
    let client = http_client(&server, Wire::Anthropic);
    let body = json!({"messages": [{"role": "user", "content": "x"}]});
    let batch_lines: Vec<BatchLine> = ["ns21_ok", "ns21_busy", "ns21_bad", "ns21_late"]
        .iter()
        .map(|id| line(id, body.clone()))
        .collect();
    let batch = submit(&client, "ns21", &batch_lines).await;
    let ended = wait_ended(&client, &batch.id).await;
    let results = by_id(client.batch_results(&ended).await.unwrap());
    assert_eq!(results.len(), 4);
    assert!(matches!(results["ns21_ok"], Some(Outcome::Success { .. })));
    let busy = results["ns21_busy"].as_ref().unwrap();
    assert!(
        matches!(busy, Outcome::HttpError { status: 529, .. }),
        "{busy:?}"
    );
    assert_eq!(
        body_of(busy),
        json!({"type": "error", "error": {"type": "overloaded_error",
                                          "message": "The line failed (loopback)."}})
    );
    let bad = results["ns21_bad"].as_ref().unwrap();
    assert!(
        matches!(bad, Outcome::HttpError { status: 400, .. }),
        "{bad:?}"
    );
    assert_eq!(results["ns21_late"], None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_rate_limits_unknown_batches_and_invalid_requests() {
    let server = LoopbackBatchProvider::anthropic(BatchBehaviour {
        create_429s: 1,
        ..BatchBehaviour::default()
    })
    .await;
    let client = http_client(&server, Wire::Anthropic);
    let c = &client;
    let create = |lines: Vec<BatchLine>| async move {
        c.batch_create(
            "ns22",
            None,
            Endpoint::ChatCompletions,
            "claude",
            &lines,
            "24h",
        )
        .await
    };
    assert_eq!(
        create(lines(1)).await,
        Err(BatchError::RateLimited {
            retry_after: Some(Duration::from_secs(1))
        })
    );
    assert_eq!(
        client.batch_get("msgbatch_nope").await,
        Err(BatchError::NotFound)
    );

    // The provider's 400: a custom_id outside [A-Za-z0-9_-]{1,64}.
    let body = json!({"messages": [{"role": "user", "content": "x"}]});
    let err = create(vec![line("bad id!", body)]).await.unwrap_err();
    let BatchError::Refused { status, message } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*status, 400);
    assert!(message.contains("custom_id"), "{message}");

    // Refused before sending: an untranslatable body, an endpoint Anthropic
    // does not serve.
    let attempts = server.create_attempts();
    let body = json!({"logprobs": true, "messages": [{"role": "user", "content": "x"}]});
    let err = create(vec![line("ns22_x", body)]).await.unwrap_err();
    let BatchError::Refused {
        status: 400,
        message,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert!(message.contains("body.logprobs"), "{message}");
    let err = client
        .batch_create(
            "ns22",
            None,
            Endpoint::Embeddings,
            "claude",
            &lines(1),
            "24h",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, BatchError::Refused { status: 400, .. }),
        "{err:?}"
    );
    assert_eq!(server.create_attempts(), attempts);
    assert_eq!(server.creates(), 0);

    // The headers are required.
    let wrong = http_client_with_key(Wire::Anthropic, server.base_url(), "sk-wrong");
    assert!(matches!(
        wrong.batch_get("msgbatch_x").await,
        Err(BatchError::Refused { status: 401, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_cancel_ends_a_batch_with_its_lines_canceled() {
    let server = LoopbackBatchProvider::anthropic(BatchBehaviour {
        never_end: true,
        ..BatchBehaviour::default()
    })
    .await;
    let client = http_client(&server, Wire::Anthropic);
    let batch = submit(&client, "ns23", &lines(2)).await;
    let cancelling = client.batch_cancel(&batch.id).await.unwrap();
    assert_eq!(
        (cancelling.state, cancelling.status.as_str()),
        (RemoteState::Cancelling, "canceling")
    );
    let ended = wait_ended(&client, &batch.id).await;
    let results = client.batch_results(&ended).await.unwrap();
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| r.outcome.is_none()), "{results:?}");
    let batches = server.batches();
    assert_eq!(
        (
            batches[0].id.as_str(),
            batches[0].status.as_str(),
            batches[0].requests
        ),
        (batch.id.as_str(), "ended", 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_batch_find_goes_by_time_and_request_count_skipping_taken_ids() {
    let server = LoopbackBatchProvider::anthropic(BatchBehaviour {
        list_page_cap: 1,
        ..BatchBehaviour::default()
    })
    .await;
    let client = http_client(&server, Wire::Anthropic);
    let before = submit(&client, "ns30", &lines(2)).await.id;
    // After `before` was created (the server's times carry microseconds).
    let since = Utc::now();
    let x = submit(&client, "ns31", &lines(2)).await.id;
    let y = submit(&client, "ns32", &lines(3)).await.id;
    let z = submit(&client, "ns33", &lines(2)).await.id;
    let find = async |requests: u64, taken: &[String]| {
        client
            .batch_find("ignored", since, requests, taken)
            .await
            .unwrap()
            .map(|b| b.id)
    };
    // The earliest match at or after `since`, across pages of one.
    assert_eq!(find(2, &[]).await, Some(x.clone()));
    assert_eq!(find(2, std::slice::from_ref(&x)).await, Some(z.clone()));
    assert_eq!(find(3, &[]).await, Some(y.clone()));
    assert_eq!(find(2, &[x.clone(), z.clone()]).await, None);
    assert_ne!(find(2, &[]).await, Some(before));
    let later = Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(client.batch_find("ignored", later, 2, &[]).await, Ok(None));
}

// ---- simulated --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_batch_runs_then_ends_after_its_turnaround_with_the_sync_answers() {
    let client = simulated_client(0.0).with_batch_turnaround(Duration::from_millis(200));
    assert!(!client.batch_uploads());
    let lines = lines(3);
    let start = Instant::now();
    let batch = submit(&client, "ns40", &lines).await;
    assert_eq!(batch.state, RemoteState::Running);
    assert!(batch.id.starts_with("sim_batch_"), "{}", batch.id);
    assert_eq!(batch.total, 3);
    assert!(matches!(
        client.batch_results(&batch).await,
        Err(BatchError::Transient(_))
    ));
    let ended = wait_ended(&client, &batch.id).await;
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!((ended.status.as_str(), ended.finished), ("completed", 3));
    let results = by_id(client.batch_results(&ended).await.unwrap());
    for l in &lines {
        let batch_answer = results[&l.custom_id].as_ref().unwrap();
        let sync_answer = client
            .send(Request {
                endpoint: Endpoint::ChatCompletions,
                model: "wire-model",
                body: &l.body,
                custom_id: &l.custom_id,
                flex_timeout: None,
            })
            .await;
        let (
            Outcome::Success {
                usage: batch_usage, ..
            },
            Outcome::Success {
                usage: sync_usage, ..
            },
        ) = (batch_answer, &sync_answer)
        else {
            panic!("{batch_answer:?} / {sync_answer:?}")
        };
        assert_eq!(batch_usage, sync_usage);
        assert_eq!(
            body_of(batch_answer)["choices"],
            body_of(&sync_answer)["choices"]
        );
    }
    assert_eq!(
        client.batch_find("ns40", Utc::now(), 3, &[]).await,
        Ok(None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_expired_batches_and_flex_refusals() {
    // Every batch expired when it ends: the first lines answered, at least
    // one not run (the daemon puts those back in the queue).
    let client = simulated_client(0.0)
        .with_simulated_channels(1.0, 1.0)
        .with_batch_turnaround(Duration::from_millis(100));
    let lines = lines(4);
    let batch = submit(&client, "ns43", &lines).await;
    let ended = wait_ended(&client, &batch.id).await;
    assert_eq!(ended.status, "expired", "{ended:?}");
    assert!(ended.finished < 4, "{ended:?}");
    let results = by_id(client.batch_results(&ended).await.unwrap());
    let run: Vec<bool> = lines
        .iter()
        .map(|l| results[&l.custom_id].is_some())
        .collect();
    assert_eq!(run.iter().filter(|&&r| r).count() as u64, ended.finished);
    assert!(run.windows(2).all(|w| w[0] >= w[1]), "{run:?}");
    // Every flex request refused (429 resource_unavailable); standard
    // requests answered.
    let send = |flex: Option<Duration>| {
        client.send(Request {
            endpoint: Endpoint::ChatCompletions,
            model: "wire-model",
            body: &lines[0].body,
            custom_id: &lines[0].custom_id,
            flex_timeout: flex,
        })
    };
    let refused = send(Some(Duration::from_secs(5))).await;
    assert!(
        nightshift::dispatch::reliability::is_flex_refusal(&refused),
        "{refused:?}"
    );
    assert!(matches!(send(None).await, Outcome::Success { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_batch_cancel_and_failures_and_restart() {
    // A cancel ends it at once; lines not finished are not run.
    let client = simulated_client(0.0).with_batch_turnaround(Duration::from_secs(600));
    let batch = submit(&client, "ns41", &lines(2)).await;
    let cancelled = client.batch_cancel(&batch.id).await.unwrap();
    assert!(
        matches!(cancelled.state, RemoteState::Ended { .. }),
        "{cancelled:?}"
    );
    assert_eq!(cancelled.status, "cancelled");
    let results = client.batch_results(&cancelled).await.unwrap();
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| r.outcome.is_none()));

    // A provider failing every request fails every line with a 500.
    let failing = simulated_client(1.0).with_batch_turnaround(Duration::ZERO);
    let batch = submit(&failing, "ns42", &lines(2)).await;
    let ended = wait_ended(&failing, &batch.id).await;
    let results = failing.batch_results(&ended).await.unwrap();
    assert!(
        results
            .iter()
            .all(|r| matches!(r.outcome, Some(Outcome::HttpError { status: 500, .. }))),
        "{results:?}"
    );

    // A new client (a restart) knows none of them.
    let restarted = simulated_client(0.0);
    assert_eq!(
        restarted.batch_get(&batch.id).await,
        Err(BatchError::NotFound)
    );
    assert_eq!(
        restarted.batch_cancel(&batch.id).await,
        Err(BatchError::NotFound)
    );
    assert_eq!(
        restarted.batch_results(&ended).await,
        Err(BatchError::NotFound)
    );
    // Its own ids differ from the old client's.
    let fresh = submit(&restarted, "ns43", &lines(1)).await;
    assert_ne!(fresh.id, batch.id);
}
