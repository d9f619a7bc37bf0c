//! SIGHUP reloads providers, prices and classes while jobs are queued and in
//! flight — no job dropped, none sent twice — and refuses an invalid file,
//! keeping the running configuration.

use std::collections::HashMap;
use std::fs;
use std::time::Duration;

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
