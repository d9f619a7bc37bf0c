//! The batch channel end to end: the daemon against loopback servers that
//! speak OpenAI's files + batches API and Anthropic's Message Batches, with
//! their status lifecycles. A backlog whose deadline leaves room goes
//! through one batch at the batch price; a batch that never ends is
//! cancelled at its fallback instant and its jobs run synchronously before
//! their deadline; errored and expired lines are re-queued; a daemon killed
//! at each step of a batch leaves one batch at the provider and one result
//! per job.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::batch_server::*;
use crate::common::*;

const T: Duration = Duration::from_secs(90);
/// 100 prompt + 10 completion tokens at $1/M, on the standard channel.
const SYNC_COST: f64 = 0.000_11;

fn jobs(prefix: &str, n: usize, nightshift: Option<Value>) -> String {
    (0..n)
        .map(|i| {
            chat_line(
                &format!("{prefix}{i}"),
                "chat",
                &format!("job {i}"),
                nightshift.clone(),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One OpenAI-style provider with a batch channel at half price, batches
/// expected within `turnaround`, polled every 200 ms; `daemon_extra` goes
/// into `[daemon]`.
fn config(dir: &std::path::Path, base_url: String, turnaround: &str, daemon_extra: &str) -> String {
    let extra = format!(
        "[providers.batch]\ndiscount = 0.5\nexpected_turnaround = \"{turnaround}\"\npoll_every = \"200ms\""
    );
    let spec = vec![ProviderSpec {
        name: "openai",
        base_url,
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: &extra,
    }];
    config_toml(dir, &spec).replace("[daemon]\n", &format!("[daemon]\n{daemon_extra}\n"))
}

fn by_custom_id(lines: &[Value]) -> BTreeMap<String, Value> {
    lines
        .iter()
        .map(|l| (l["custom_id"].as_str().unwrap().to_string(), l.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_with_a_6h_deadline_goes_through_one_batch_at_the_batch_price() {
    let provider = LoopbackBatchProvider::openai(BatchBehaviour {
        turnaround: Duration::from_millis(600),
        ..BatchBehaviour::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), provider.base_url(), "5s", ""),
    );
    drop_file(
        &daemon.jobs(),
        "backlog.jsonl",
        &jobs("b", 30, Some(json!({"deadline": "6h"}))),
    );
    let (out, err) = wait_for_outbox(&daemon.jobs(), "backlog", T).await;
    daemon.terminate().await;
    assert!(err.is_empty(), "{err:?}");
    assert_eq!(out.len(), 30);
    assert_eq!(provider.sync_calls(), 0, "zero synchronous calls");
    assert_eq!(provider.uploads(), 1, "one input file");
    assert_eq!(provider.creates(), 1, "one batch");
    let batch_ids: std::collections::BTreeSet<&str> = out
        .iter()
        .map(|l| l["nightshift"]["batch_id"].as_str().unwrap())
        .collect();
    assert_eq!(batch_ids.len(), 1, "{batch_ids:?}");
    for line in &out {
        let n = &line["nightshift"];
        assert_eq!(n["channel"], "batch", "{line}");
        assert_eq!(n["state"], "succeeded", "{line}");
        assert_eq!(n["attempts"], 1, "{line}");
        let cost = n["cost_usd"].as_f64().unwrap();
        assert!((cost - SYNC_COST / 2.0).abs() < 1e-12, "half price: {line}");
        assert_eq!(line["response"]["status_code"], 200, "{line}");
        // The answer is the job's own, joined on its custom_id.
        let text = line["response"]["body"]["choices"][0]["message"]["content"]
            .as_str()
            .unwrap();
        let i: usize = line["custom_id"].as_str().unwrap()[1..].parse().unwrap();
        assert!(text.contains(&format!("job {i}")), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_never_ends_is_cancelled_at_its_fallback_instant_and_its_jobs_run_synchronously()
 {
    let provider = LoopbackBatchProvider::openai(BatchBehaviour {
        never_end: true,
        ..BatchBehaviour::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    // Deadline 40 s, margin 5 s, turnaround prior 20 s: a batch fits; its
    // guard fires about 35 s after creation (overdue at 40 s would leave
    // no time for another batch, so it is not made again).
    let mut daemon = Daemon::start(
        dir.path(),
        &config(
            dir.path(),
            provider.base_url(),
            "20s",
            "safety_margin = \"5s\"",
        ),
    );
    let started = std::time::Instant::now();
    drop_file(
        &daemon.jobs(),
        "late.jsonl",
        &jobs("l", 10, Some(json!({"deadline": "40s"}))),
    );
    let (out, err) = wait_for_outbox(&daemon.jobs(), "late", T).await;
    let took = started.elapsed();
    daemon.terminate().await;
    assert!(err.is_empty(), "{err:?}");
    assert_eq!(provider.creates(), 1, "one batch was tried");
    assert_eq!(provider.cancels(), 1, "and cancelled by the deadline guard");
    assert_eq!(out.len(), 10);
    for line in &out {
        let n = &line["nightshift"];
        assert_eq!(n["state"], "succeeded", "{line}");
        assert_eq!(n["channel"], "sync", "re-run synchronously: {line}");
        assert!((n["cost_usd"].as_f64().unwrap() - SYNC_COST).abs() < 1e-12);
    }
    assert_eq!(provider.sync_calls(), 10);
    assert!(
        took < Duration::from_secs(40),
        "every job answered before its deadline ({took:?})"
    );
    let log = daemon.log_text();
    assert!(log.contains("not ended by its guard instant"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overdue_batch_is_cancelled_and_its_jobs_go_into_a_new_batch_at_the_batch_price() {
    // The first batch never ends; later ones end in 300 ms. Prior 2 s,
    // deadline 6 h: the first batch is overdue at 4 s, long before its
    // fallback instant, and a new batch still fits.
    let provider = LoopbackBatchProvider::openai(BatchBehaviour {
        never_end_first: 1,
        ..BatchBehaviour::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), provider.base_url(), "2s", ""),
    );
    let started = std::time::Instant::now();
    drop_file(
        &daemon.jobs(),
        "stuck.jsonl",
        &jobs("s", 10, Some(json!({"deadline": "6h"}))),
    );
    let (out, err) = wait_for_outbox(&daemon.jobs(), "stuck", T).await;
    let took = started.elapsed();
    daemon.terminate().await;
    assert!(err.is_empty(), "{err:?}");
    assert_eq!(provider.cancels(), 1, "the overdue batch was cancelled");
    assert_eq!(provider.creates(), 2, "and its jobs put in a new one");
    assert_eq!(provider.sync_calls(), 0, "none ran synchronously");
    assert_eq!(out.len(), 10);
    let second = &provider.batches()[1].id;
    for line in &out {
        let n = &line["nightshift"];
        assert_eq!(n["state"], "succeeded", "{line}");
        assert_eq!(n["channel"], "batch", "{line}");
        assert_eq!(&n["batch_id"], second, "{line}");
        assert!((n["cost_usd"].as_f64().unwrap() - SYNC_COST * 0.5).abs() < 1e-12);
    }
    assert!(
        took >= Duration::from_secs(4),
        "cancelled once overdue, not before ({took:?})"
    );
    let log = daemon.log_text();
    assert!(log.contains("not ended by its guard instant"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errored_and_expired_lines_are_requeued_and_only_those() {
    let fate = std::sync::Arc::new(|custom_id: &str, _body: &Value| {
        // Lines carry nightshift's own ids (`ns<batch>_<job>`); the first
        // batch fails job 3 with a 500 and lets job 5 expire.
        match custom_id
            .split_once('_')
            .map(|(b, j)| (b, j.parse::<i64>().unwrap()))
        {
            Some(("ns1", 3)) => LineFate::Fail(500),
            Some(("ns1", 5)) => LineFate::Expire,
            _ => LineFate::Succeed,
        }
    });
    let provider = LoopbackBatchProvider::openai(BatchBehaviour {
        turnaround: Duration::from_millis(300),
        fate,
        ..BatchBehaviour::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), provider.base_url(), "5s", ""),
    );
    drop_file(
        &daemon.jobs(),
        "mixed.jsonl",
        &jobs("m", 8, Some(json!({"deadline": "6h"}))),
    );
    let (out, err) = wait_for_outbox(&daemon.jobs(), "mixed", T).await;
    daemon.terminate().await;
    assert!(err.is_empty(), "{err:?}");
    let out = by_custom_id(&out);
    assert_eq!(out.len(), 8);
    for (id, line) in &out {
        let n = &line["nightshift"];
        assert_eq!(n["state"], "succeeded", "{line}");
        // Job ids follow the lines: m2 is job 3, m4 is job 5.
        let expected_attempts = match id.as_str() {
            "m2" => 2, // failed once (a retryable 500), then answered
            _ => 1,    // the expired line's attempt is not counted
        };
        assert_eq!(n["attempts"], expected_attempts, "{line}");
    }
    // Exactly the two lines ran again, in a second batch (or synchronously).
    let second: usize = provider
        .batches()
        .iter()
        .skip(1)
        .map(|b| b.requests)
        .sum::<usize>()
        + provider.sync_calls();
    assert_eq!(second, 2, "{:?}", provider.batches());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_at_each_step_of_a_batch_leaves_one_batch_and_one_result_per_job() {
    for point in [
        "batch.die_after_upload",
        "batch.die_after_create",
        "batch.die_after_download",
    ] {
        let provider = LoopbackBatchProvider::openai(BatchBehaviour {
            turnaround: Duration::from_millis(300),
            ..BatchBehaviour::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let text = config(dir.path(), provider.base_url(), "5s", "");
        let mut daemon = Daemon::start_with_env(dir.path(), &text, &[("NIGHTSHIFT_FAULTS", point)]);
        drop_file(
            &daemon.jobs(),
            "kill.jsonl",
            &jobs("k", 12, Some(json!({"deadline": "6h"}))),
        );
        let status = daemon.wait_exit(T).await;
        assert!(!status.success(), "{point}: the daemon died ({status:?})");
        assert!(
            daemon
                .log_text()
                .contains(&format!("injected fault: {point}")),
            "{point}"
        );
        let mut daemon = Daemon::start(dir.path(), &text);
        let (out, err) = wait_for_outbox(&daemon.jobs(), "kill", T).await;
        daemon.terminate().await;
        assert!(err.is_empty(), "{point}: {err:?}");
        let out = by_custom_id(&out);
        assert_eq!(out.len(), 12, "{point}: one result per job");
        assert_eq!(provider.creates(), 1, "{point}: one batch at the provider");
        assert_eq!(provider.uploads(), 1, "{point}: one input file");
        assert_eq!(provider.sync_calls(), 0, "{point}");
        for line in out.values() {
            assert_eq!(line["nightshift"]["state"], "succeeded", "{point}: {line}");
            assert_eq!(line["nightshift"]["channel"], "batch", "{point}: {line}");
            assert_eq!(line["nightshift"]["attempts"], 1, "{point}: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_create_pauses_batches_not_the_synchronous_channel() {
    let provider = LoopbackBatchProvider::openai(BatchBehaviour {
        turnaround: Duration::from_millis(300),
        create_429s: 1,
        ..BatchBehaviour::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), provider.base_url(), "5s", ""),
    );
    // A backlog that may wait (it goes to a batch once creation resumes)
    // and urgent jobs that run now on the synchronous channel.
    drop_file(
        &daemon.jobs(),
        "backlog.jsonl",
        &jobs("b", 5, Some(json!({"deadline": "6h"}))),
    );
    let (out, err) = wait_for_outbox(&daemon.jobs(), "backlog", T).await;
    drop_file(
        &daemon.jobs(),
        "urgent.jsonl",
        &jobs("u", 3, Some(json!({"deadline": "2m"}))),
    );
    let (urgent, uerr) = wait_for_outbox(&daemon.jobs(), "urgent", T).await;
    daemon.terminate().await;
    assert!(err.is_empty() && uerr.is_empty(), "{err:?} {uerr:?}");
    assert_eq!(out.len(), 5);
    assert_eq!(urgent.len(), 3);
    for line in urgent {
        assert_eq!(line["nightshift"]["channel"], "sync", "{line}");
    }
    let log = daemon.log_text();
    assert!(log.contains("batch creation refused"), "{log}");
    assert_eq!(
        provider.create_attempts(),
        2,
        "refused once, created again after the pause"
    );
    assert_eq!(provider.creates(), 1);
    for line in out {
        assert_eq!(line["nightshift"]["channel"], "batch", "{line}");
        assert_eq!(
            line["nightshift"]["attempts"], 1,
            "the refusal used no attempt: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_backlog_goes_through_message_batches_translated_both_ways() {
    let provider = LoopbackBatchProvider::anthropic(BatchBehaviour {
        turnaround: Duration::from_millis(300),
        ..BatchBehaviour::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[daemon]\nstate_dir = \"{s}\"\njobs_dir = \"{j}\"\nrescan_interval = \"1s\"\n\n\
         [[providers]]\nname = \"anthropic\"\nkind = \"anthropic\"\nbase_url = \"{b}\"\napi_key_env = \"{KEY_ENV}\"\n\
         [providers.batch]\ndiscount = 0.5\nexpected_turnaround = \"5s\"\npoll_every = \"200ms\"\n\
         [[providers.models]]\nname = \"claude-haiku-4-5\"\ninput_per_mtok = 1.0\noutput_per_mtok = 5.0\n\
         cached_input_per_mtok = 0.1\ncache_write_per_mtok = 1.25\n\n\
         [classes]\nchat = [\"anthropic/claude-haiku-4-5\"]\n",
        s = dir.path().join("state").display(),
        j = dir.path().join("jobs").display(),
        b = provider.base_url(),
    );
    let mut daemon = Daemon::start(dir.path(), &text);
    let line = json!({
        "custom_id": "a1", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "chat", "max_tokens": 50, "stop": ["END"],
                 "messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "hello"}]},
        "nightshift": {"deadline": "6h"}
    });
    drop_file(&daemon.jobs(), "anth.jsonl", &line.to_string());
    let (out, err) = wait_for_outbox(&daemon.jobs(), "anth", T).await;
    daemon.terminate().await;
    assert!(err.is_empty(), "{err:?}");
    assert_eq!(out.len(), 1);
    let l = &out[0];
    assert_eq!(l["nightshift"]["channel"], "batch", "{l}");
    assert_eq!(l["response"]["body"]["object"], "chat.completion", "{l}");
    assert_eq!(
        l["response"]["body"]["choices"][0]["finish_reason"], "stop",
        "{l}"
    );
    // The request reached the provider translated: system on top, stop
    // sequences, the batch's custom_id.
    let seen = provider.lines_seen();
    assert_eq!(seen.len(), 1);
    let params = &seen[0]["params"];
    assert_eq!(params["system"], "Be brief.", "{params}");
    assert_eq!(params["stop_sequences"], json!(["END"]), "{params}");
    assert_eq!(params["messages"].as_array().unwrap().len(), 1, "{params}");
}
