//! SIGHUP reloads providers, prices and classes while jobs are queued and in
//! flight — no job dropped, none sent twice — and refuses an invalid file,
//! keeping the running configuration. A provider removed while one of its
//! batches is open takes the batch with it: cancelled, abandoned, its jobs
//! run on the providers that remain.

use std::collections::HashMap;
use std::fs;
use std::time::Duration;

use serde_json::json;

use crate::batch_server::{BatchBehaviour, LoopbackBatchProvider};
use crate::common::*;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_providers_without_dropping_or_duplicating_jobs_and_refuses_bad_files() {
    let slow = LoopbackProvider::with(|s| Reply {
        delay: Duration::from_millis(300),
        ..default_reply(s)
    })
    .await;
    let cheap = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let a = ProviderSpec {
        name: "a",
        base_url: slow.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: "concurrency = 1",
    };
    let b = ProviderSpec {
        name: "b",
        base_url: cheap.base_url(),
        model: "m",
        input_per_mtok: 0.1,
        output_per_mtok: 0.1,
        extra: "",
    };
    let mut daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &[a]));
    let n = 10;
    let content: Vec<String> = (0..n)
        .map(|i| chat_line(&format!("j{i}"), "chat", &format!("job {i}"), None))
        .collect();
    drop_file(&daemon.jobs(), "reload.jsonl", &content.join("\n"));
    wait_until("two jobs sent to a", T, || slow.count() >= 2).await;

    // Add a cheaper provider to the class while jobs are queued and one is in flight.
    let a = ProviderSpec {
        name: "a",
        base_url: slow.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: "concurrency = 1",
    };
    fs::write(
        dir.path().join("nightshift.toml"),
        config_toml(dir.path(), &[a, b]),
    )
    .unwrap();
    daemon.hup();
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "reload", T).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(output.len(), n, "no job dropped");
    let on_b = output
        .iter()
        .filter(|l| l["nightshift"]["provider"] == "b")
        .count();
    assert!(
        on_b >= 1 && on_b <= n - 2,
        "the rest moved to the new, cheaper provider: {on_b}"
    );
    let mut sent: HashMap<String, usize> = HashMap::new();
    for s in slow.seen().iter().chain(cheap.seen().iter()) {
        *sent.entry(s.text()).or_default() += 1;
    }
    assert_eq!(sent.len(), n);
    assert!(
        sent.values().all(|&c| c == 1),
        "no job sent twice: {sent:?}"
    );
    assert!(daemon.log_text().contains("configuration reloaded"));

    // An invalid file is refused with file, line and field; the daemon carries on.
    fs::write(
        dir.path().join("nightshift.toml"),
        "[[providers]]\nname = \"x\"\nkind = \"carrier-pigeon\"\n",
    )
    .unwrap();
    daemon.hup();
    wait_until("the refusal is logged", T, || {
        daemon.log_text().contains("configuration refused")
    })
    .await;
    let log = daemon.log_text();
    assert!(
        log.contains("nightshift.toml:3: providers[0].kind"),
        "{log}"
    );
    drop_file(
        &daemon.jobs(),
        "after.jsonl",
        &chat_line("after", "chat", "after the bad reload", None),
    );
    let (output, _) = wait_for_outbox(&daemon.jobs(), "after", T).await;
    assert_eq!(
        output[0]["nightshift"]["provider"], "b",
        "the running configuration stayed"
    );
    let status = daemon.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_removing_a_provider_with_an_open_batch_abandons_it_and_its_jobs_run_elsewhere() {
    // A batch at "a" that never ends on its own (its deadline guard, and the
    // instant it would count as overdue, are hours away).
    let a = LoopbackBatchProvider::openai(BatchBehaviour {
        never_end: true,
        ..BatchBehaviour::default()
    })
    .await;
    let b = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let with_batch = ProviderSpec {
        name: "a",
        base_url: a.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: "[providers.batch]\ndiscount = 0.5\nexpected_turnaround = \"1h\"\npoll_every = \"200ms\"",
    };
    let mut daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &[with_batch]));
    let api = daemon.unix_client().await;
    let n = 6;
    let content: Vec<String> = (0..n)
        .map(|i| {
            chat_line(
                &format!("j{i}"),
                "chat",
                &format!("job {i}"),
                Some(json!({"deadline": "6h"})),
            )
        })
        .collect();
    drop_file(&daemon.jobs(), "open.jsonl", &content.join("\n"));
    wait_until_async("a's batch submitted", T, async || {
        let p = api.get("/v1/providers").await.unwrap();
        p["data"][0]["batch"]["recent"][0]["state"] == "submitted"
    })
    .await;
    assert_eq!(a.creates(), 1);

    // The reloaded file has only "b" (no batch channel).
    let only_b = ProviderSpec {
        name: "b",
        base_url: b.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: "",
    };
    fs::write(
        dir.path().join("nightshift.toml"),
        config_toml(dir.path(), &[only_b]),
    )
    .unwrap();
    daemon.hup();
    let (output, errors) = wait_for_outbox(&daemon.jobs(), "open", T).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(output.len(), n, "one result per job");
    let ids: std::collections::BTreeSet<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), n, "one result per job: {ids:?}");
    for line in &output {
        let ns = &line["nightshift"];
        assert_eq!(ns["state"], "succeeded", "{line}");
        assert_eq!(ns["provider"], "b", "{line}");
        assert_eq!(ns["channel"], "sync", "{line}");
        assert_eq!(
            ns["attempts"], 1,
            "the abandoned batch used no attempt: {line}"
        );
    }
    let mut sent: HashMap<String, usize> = HashMap::new();
    for s in b.seen() {
        *sent.entry(s.text()).or_default() += 1;
    }
    assert_eq!(sent.len(), n);
    assert!(
        sent.values().all(|&c| c == 1),
        "no job sent twice: {sent:?}"
    );
    assert_eq!(a.sync_calls(), 0);
    assert_eq!(a.creates(), 1, "no second batch at the removed provider");
    assert_eq!(
        a.cancels(),
        1,
        "the removed provider's batch is cancelled there"
    );
    let log = daemon.log_text();
    assert!(log.contains("provider batch abandoned"), "{log}");
    // Nothing else is left open, and the daemon goes on.
    let stats = api.get("/v1/stats").await.unwrap();
    assert_eq!(stats["jobs"]["running"], 0, "{stats}");
    assert_eq!(stats["jobs"]["queued"], 0, "{stats}");
    let status = daemon.terminate().await;
    assert!(status.success());
}
