//! Several daemons on one PostgreSQL queue: they share one provider key
//! without exceeding its rate limit (summed over every daemon) while still
//! using nearly all of it, and when the daemon that plans is SIGKILLed
//! mid-run another takes over the planning, its running jobs are recovered
//! once its heartbeat goes stale, and no job is lost (duplicate provider
//! calls are at most what it had in flight).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nightshift::api::client::Client;
use serde_json::Value;

use crate::common::*;

/// The most requests in any window of `window` over sorted instants.
fn max_in_any_window(at: &[Instant], window: Duration) -> usize {
    let mut max = 0;
    let mut from = 0;
    for (to, &t) in at.iter().enumerate() {
        while t.duration_since(at[from]) >= window {
            from += 1;
        }
        max = max.max(to + 1 - from);
    }
    max
}

/// A fresh database on the throwaway server (its client blocks: off the
/// runtime's threads).
async fn fresh_database() -> String {
    tokio::task::spawn_blocking(nightshift::store::pg::testing::fresh_database)
        .await
        .unwrap()
}

/// Runs one query returning rows of `i64`s, off the runtime's threads.
async fn query_i64(url: &str, sql: &str) -> Vec<Vec<i64>> {
    let (url, sql) = (url.to_string(), sql.to_string());
    tokio::task::spawn_blocking(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.query(sql.as_str(), &[])
            .unwrap()
            .iter()
            .map(|row| (0..row.len()).map(|i| row.get::<_, i64>(i)).collect())
            .collect()
    })
    .await
    .unwrap()
}

/// The one text value `sql` returns (with `node` as $1, if it takes one).
async fn query_text(url: &str, sql: &str, node: Option<&str>) -> String {
    let (url, sql, node) = (url.to_string(), sql.to_string(), node.map(str::to_string));
    tokio::task::spawn_blocking(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let row = match &node {
            Some(n) => c.query_one(sql.as_str(), &[n]),
            None => c.query_one(sql.as_str(), &[]),
        };
        row.unwrap().get(0)
    })
    .await
    .unwrap()
}

/// The owner (lease holder) of the daemon named `node`.
async fn query_owner(url: &str, node: &str) -> String {
    query_text(url, "SELECT owner FROM daemons WHERE node = $1", Some(node)).await
}

/// `n` daemons `node0..` on `database`, each in its own directory.
fn start_daemons(dirs: &[tempfile::TempDir], spec: &[ProviderSpec], database: &str) -> Vec<Daemon> {
    dirs.iter()
        .enumerate()
        .map(|(d, dir)| {
            let config = shared_config(dir.path(), spec, database, &format!("node{d}"));
            Daemon::start(dir.path(), &config)
        })
        .collect()
}

/// `config_toml` for a daemon named `node` on the shared `database`.
fn shared_config(dir: &Path, providers: &[ProviderSpec], database: &str, node: &str) -> String {
    config_toml(dir, providers).replacen(
        "[daemon]\n",
        &format!("[daemon]\ndatabase = \"{database}\"\nnode = \"{node}\"\n"),
        1,
    )
}

/// A provider behaviour that answers `then`'s way unless `rpm` requests
/// already arrived in the last 60 s: then 429 (and counts it).
fn enforcing_rpm(
    rpm: usize,
    refused: Arc<Mutex<usize>>,
    then: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
) -> impl Fn(&Seen) -> Reply + Send + Sync + 'static {
    let answered: Arc<Mutex<Vec<Instant>>> = Default::default();
    move |s: &Seen| {
        {
            let mut at = answered.lock().unwrap();
            at.retain(|t| s.at.duration_since(*t) < Duration::from_secs(60));
            if at.len() >= rpm {
                *refused.lock().unwrap() += 1;
                return Reply {
                    headers: vec![("retry-after-ms", "1000".into())],
                    ..Reply::json(
                        429,
                        openai_error(
                            "Rate limit reached for requests.",
                            "requests",
                            Some("rate_limit_exceeded"),
                        ),
                    )
                };
            }
            at.push(s.at);
        }
        then(s)
    }
}

/// How many times the provider saw each job (its text: `job <custom_id>`).
fn calls_per_job(provider: &LoopbackProvider) -> HashMap<String, usize> {
    let mut per_job: HashMap<String, usize> = HashMap::new();
    for s in provider.seen() {
        *per_job.entry(s.text()).or_default() += 1;
    }
    per_job
}

/// The jobs of daemon `d`'s file `f`: `n` chat lines `d<d>f<f>j<i>`.
fn job_file(d: usize, f: usize, n: usize) -> (String, Vec<String>) {
    let ids: Vec<String> = (0..n).map(|i| format!("d{d}f{f}j{i:03}")).collect();
    let lines: Vec<String> = ids
        .iter()
        .map(|id| chat_line(id, "chat", &format!("job {id}"), None))
        .collect();
    (lines.join("\n"), ids)
}

/// `/v1/stats`'s `database` section.
async fn stats_database(client: &Client) -> Value {
    client.get("/v1/stats").await.unwrap()["database"].clone()
}

/// The nodes `/v1/stats` lists alive, and those among them that plan.
fn alive_and_planners(database: &Value) -> (Vec<String>, Vec<String>) {
    let daemons = database["daemons"].as_array().cloned().unwrap_or_default();
    let name = |d: &Value| d["node"].as_str().unwrap_or_default().to_string();
    let alive = daemons
        .iter()
        .filter(|d| d["alive"] == true)
        .map(name)
        .collect();
    let planners = daemons
        .iter()
        .filter(|d| d["alive"] == true && d["planner"] == true)
        .map(name)
        .collect();
    (alive, planners)
}

const RPM: usize = 60;

async fn n_daemons_share_one_key(n: usize) {
    // ~150 jobs at 60 rpm: about two and a half minutes, past the first
    // window's end so that a window opening is measured too.
    const JOBS: usize = 150;
    let refused = Arc::new(Mutex::new(0));
    let provider = LoopbackProvider::with(enforcing_rpm(RPM, refused.clone(), default_reply)).await;
    let database = fresh_database().await;
    let rpm_line = format!("rpm = {RPM}");
    let spec = vec![ProviderSpec {
        name: "p",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: &rpm_line,
    }];
    let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let daemons = start_daemons(&dirs, &spec, &database);
    let mut clients = Vec::new();
    for d in &daemons {
        clients.push(d.unix_client().await);
    }
    // Every daemon sees every other alive before the jobs arrive.
    wait_until_async(
        &format!("{n} daemons alive, one planning"),
        Duration::from_secs(30),
        async || {
            let (alive, planners) = alive_and_planners(&stats_database(&clients[0]).await);
            alive.len() == n && planners.len() == 1
        },
    )
    .await;

    // Three files in all, split across the inboxes (the first daemon gets
    // two when there are two daemons).
    let mut files: Vec<(usize, String, Vec<String>)> = Vec::new();
    for f in 0..3 {
        let d = f % n;
        let (content, ids) = job_file(d, f, JOBS / 3);
        files.push((d, format!("shared-{f}"), ids));
        drop_file(&daemons[d].jobs(), &format!("shared-{f}.jsonl"), &content);
    }

    // Each daemon writes the outbox of the files its inbox received.
    for (d, stem, ids) in &files {
        let (output, errors) =
            wait_for_outbox(&daemons[*d].jobs(), stem, Duration::from_secs(240)).await;
        assert!(
            errors.is_empty(),
            "{stem}: {:?}",
            &errors[..errors.len().min(3)]
        );
        let mut got: Vec<&str> = output
            .iter()
            .map(|l| l["custom_id"].as_str().unwrap())
            .collect();
        got.sort();
        assert_eq!(got, *ids, "{stem}: one output line per job");
        for l in &output {
            assert_eq!(l["response"]["status_code"], 200, "{l}");
            assert_eq!(l["nightshift"]["state"], "succeeded", "{l}");
        }
    }

    // The provider saw each job exactly once, and refused none.
    let per_job = calls_per_job(&provider);
    assert_eq!(per_job.len(), JOBS, "every job reached the provider");
    let twice: Vec<_> = per_job.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "jobs sent more than once: {twice:?}");
    assert_eq!(*refused.lock().unwrap(), 0, "the provider answered 429");

    // Every sliding minute holds the limit, summed over the daemons; and
    // the limit, not the daemons, held the throughput back.
    let mut at: Vec<Instant> = provider.seen().iter().map(|s| s.at).collect();
    at.sort();
    let max = max_in_any_window(&at, Duration::from_secs(60));
    let elapsed = at.last().unwrap().duration_since(at[0]).as_secs_f64();
    let per_minute = (at.len() - 1) as f64 / elapsed * 60.0;
    eprintln!(
        "{n} daemons: {} requests over {elapsed:.1} s, most in any 60 s: {max} (rpm {RPM}), \
         {per_minute:.1} per minute ({:.1}% of rpm)",
        at.len(),
        per_minute / RPM as f64 * 100.0
    );
    assert!(max <= RPM, "{max} requests within 60 s, rpm {RPM}");
    assert!(
        max as f64 >= 0.95 * RPM as f64,
        "{max} requests in the busiest 60 s: the daemons did not saturate rpm {RPM}"
    );
    assert!(
        per_minute >= 0.95 * RPM as f64,
        "{per_minute:.1} requests per minute, below 95% of rpm {RPM}"
    );

    // The API shows the shared database, the daemons and one planner.
    let health = clients[n - 1].get("/healthz").await.unwrap();
    assert_eq!(health["database"]["backend"], "postgresql", "{health}");
    assert_eq!(health["database"]["ok"], true, "{health}");
    assert_eq!(health["daemons"], n, "{health}");
    let db = stats_database(&clients[n - 1]).await;
    assert_eq!(db["backend"], "postgresql", "{db}");
    assert_eq!(db["node"], format!("node{}", n - 1), "{db}");
    let (alive, planners) = alive_and_planners(&db);
    assert_eq!(alive.len(), n, "{db}");
    assert_eq!(planners.len(), 1, "{db}");
    let mut planning = 0;
    for c in &clients {
        if stats_database(c).await["planner"] == true {
            planning += 1;
        }
    }
    assert_eq!(planning, 1, "exactly one daemon says it plans");
    drop(daemons);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_share_one_key_without_exceeding_it() {
    n_daemons_share_one_key(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_share_one_key_without_exceeding_it() {
    n_daemons_share_one_key(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_planning_daemon_mid_run_loses_no_job() {
    const N: usize = 3;
    const PER_FILE: usize = 40;
    const CONCURRENCY: usize = 6;
    let provider = LoopbackProvider::with(|seen| Reply {
        delay: Duration::from_millis(1500),
        ..default_reply(seen)
    })
    .await;
    let database = fresh_database().await;
    let concurrency_line = format!("concurrency = {CONCURRENCY}");
    let spec = vec![ProviderSpec {
        name: "p",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: &concurrency_line,
    }];
    let dirs: Vec<tempfile::TempDir> = (0..N).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut daemons = start_daemons(&dirs, &spec, &database);
    let mut clients = Vec::new();
    for d in &daemons {
        clients.push(d.unix_client().await);
    }
    wait_until_async(
        &format!("{N} daemons alive, one planning"),
        Duration::from_secs(30),
        async || {
            let (alive, planners) = alive_and_planners(&stats_database(&clients[0]).await);
            alive.len() == N && planners.len() == 1
        },
    )
    .await;
    let db = stats_database(&clients[0]).await;
    let planner_node = alive_and_planners(&db).1[0].clone();
    let planner: usize = planner_node.trim_start_matches("node").parse().unwrap();
    assert_eq!(stats_database(&clients[planner]).await["planner"], true);

    let mut all_ids = Vec::new();
    for (d, daemon) in daemons.iter().enumerate() {
        let (content, ids) = job_file(d, d, PER_FILE);
        all_ids.extend(ids);
        drop_file(&daemon.jobs(), &format!("slow-{d}.jsonl"), &content);
    }
    let jobs = all_ids.len();

    // Kill the planner while it has requests in flight (its running jobs,
    // by lease), a little way into the run.
    let in_flight_sql = format!(
        "SELECT count(*)::bigint FROM jobs j JOIN daemons d ON j.lease_owner = d.owner \
         WHERE d.node = '{planner_node}' AND j.state = 'running'"
    );
    wait_until("a dozen requests", Duration::from_secs(60), || {
        provider.count() >= 12
    })
    .await;
    let mut in_flight = 0;
    wait_until_async(
        "the planner to have requests in flight",
        Duration::from_secs(60),
        async || {
            in_flight = query_i64(&database, &in_flight_sql).await[0][0];
            in_flight > 0
        },
    )
    .await;
    let killed_owner = query_owner(&database, &planner_node).await;
    let sent_before_kill = provider.count();
    daemons[planner].kill();
    let killed_at = Instant::now();
    eprintln!(
        "killed {planner_node} with {in_flight} running jobs, after {sent_before_kill} requests"
    );

    // Its running jobs go back to the queue once its heartbeat is stale
    // (10 s, checked every 2 s from each survivor's start), long before
    // their lease (request_timeout + 60 s) would expire.
    let running_sql = format!(
        "SELECT count(*)::bigint FROM jobs WHERE state = 'running' AND lease_owner = '{killed_owner}'"
    );
    let recovery = {
        let database = database.clone();
        tokio::spawn(async move {
            loop {
                if query_i64(&database, &running_sql).await[0][0] == 0 {
                    return killed_at.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Another daemon takes over the planning.
    let survivors: Vec<usize> = (0..N).filter(|&d| d != planner).collect();
    let mut new_planner = None;
    wait_until_async(
        "a survivor to become planner",
        Duration::from_secs(20),
        async || {
            for &d in &survivors {
                let health = clients[d].get("/healthz").await.unwrap();
                if health["planner"] == true {
                    new_planner = Some(d);
                    return true;
                }
            }
            false
        },
    )
    .await;
    let takeover = killed_at.elapsed();
    eprintln!(
        "node{} plans {:.1} s after the kill",
        new_planner.unwrap(),
        takeover.as_secs_f64()
    );
    assert!(
        takeover <= Duration::from_secs(15),
        "took over after {takeover:?}"
    );

    // Every job ends succeeded in the database, the killed daemon's too.
    let by_state = "SELECT count(*) FILTER (WHERE state = 'succeeded')::bigint, \
                    count(*)::bigint FROM jobs";
    wait_until_async(
        "every job to succeed",
        Duration::from_secs(180),
        async || {
            let row = &query_i64(&database, by_state).await[0];
            row[0] == jobs as i64
        },
    )
    .await;
    let row = &query_i64(&database, by_state).await[0];
    assert_eq!(row[1], jobs as i64, "no job lost, none added");
    let recovered_after = killed_at.elapsed();
    let requeued_after = recovery.await.unwrap();
    eprintln!(
        "the killed daemon's running jobs were re-queued {:.1} s after the kill",
        requeued_after.as_secs_f64()
    );
    assert!(
        requeued_after <= Duration::from_secs(20),
        "its jobs came back after {requeued_after:?}: not by its stale heartbeat"
    );

    // The survivors' outboxes hold their files' results.
    for &d in &survivors {
        let (output, errors) = wait_for_outbox(
            &daemons[d].jobs(),
            &format!("slow-{d}"),
            Duration::from_secs(30),
        )
        .await;
        assert!(errors.is_empty(), "{:?}", &errors[..errors.len().min(3)]);
        assert_eq!(output.len(), PER_FILE);
        assert!(
            output
                .iter()
                .all(|l| l["nightshift"]["state"] == "succeeded")
        );
    }

    // Duplicates: at most what the killed daemon had in flight.
    let per_job = calls_per_job(&provider);
    assert_eq!(per_job.len(), jobs, "every job reached the provider");
    let duplicates: usize = per_job.values().map(|n| n - 1).sum();
    eprintln!(
        "{duplicates} duplicate calls ({in_flight} running on the killed daemon, concurrency \
         {CONCURRENCY}); all {jobs} succeeded {:.1} s after the kill",
        recovered_after.as_secs_f64()
    );
    assert!(
        duplicates <= CONCURRENCY,
        "{duplicates} duplicate calls, more than the killed daemon could have in flight"
    );

    // Restarted with its node name and state, the killed daemon writes its
    // file's outbox.
    let dir = dirs[planner].path();
    let config = shared_config(dir, &spec, &database, &planner_node);
    daemons[planner] = Daemon::start(dir, &config);
    let (output, errors) = wait_for_outbox(
        &daemons[planner].jobs(),
        &format!("slow-{planner}"),
        Duration::from_secs(30),
    )
    .await;
    assert!(errors.is_empty(), "{:?}", &errors[..errors.len().min(3)]);
    let mut got: Vec<String> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    let (_, mut expected) = job_file(planner, planner, PER_FILE);
    expected.sort();
    assert_eq!(got, expected);
    assert!(
        output
            .iter()
            .all(|l| l["nightshift"]["state"] == "succeeded")
    );
}

/// The database stops mid-run (PostgreSQL's fast shutdown: every session
/// terminated) and comes back: the answers that arrive meanwhile are
/// recorded once it is back, nothing is sent twice, nothing is lost, and
/// `/healthz` says the database is down while it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_no_answer_and_sends_nothing_twice() {
    use nightshift::store::pg::testing::PrivateServer;
    const JOBS: usize = 30;
    let provider = LoopbackProvider::with(|seen| Reply {
        delay: Duration::from_millis(1500),
        ..default_reply(seen)
    })
    .await;
    let mut server = tokio::task::spawn_blocking(PrivateServer::start)
        .await
        .unwrap();
    let database = server.url("nightshift");
    let spec = vec![ProviderSpec {
        name: "p",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra: "concurrency = 5",
    }];
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &shared_config(dir.path(), &spec, &database, "solo"),
    );
    let client = daemon.unix_client().await;
    let (content, ids) = job_file(0, 0, JOBS);
    drop_file(&daemon.jobs(), "outage.jsonl", &content);

    // Requests in flight, then the database goes away under them.
    wait_until("requests in flight", Duration::from_secs(60), || {
        provider.count() >= 5
    })
    .await;
    let mut server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .unwrap();
    wait_until_async(
        "/healthz to report the database down",
        Duration::from_secs(30),
        async || match client.get("/healthz").await {
            Ok(h) => h["database"]["ok"] == false,
            // 503 with the same body: a client error here is the answer.
            Err(_) => true,
        },
    )
    .await;
    // Every request sent before the stop has been answered (1.5 s each)
    // while the database was down; no new one left meanwhile.
    let sent_while_down = provider.count();
    wait_until(
        "the in-flight answers to arrive",
        Duration::from_secs(30),
        || {
            provider
                .seen()
                .last()
                .is_some_and(|s| s.at.elapsed() > Duration::from_millis(2500))
        },
    )
    .await;
    assert_eq!(
        provider.count(),
        sent_while_down,
        "nothing is claimed while the database is down"
    );
    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();

    // Back: the answers held meanwhile are recorded, the rest run.
    let (output, errors) =
        wait_for_outbox(&daemon.jobs(), "outage", Duration::from_secs(120)).await;
    assert!(errors.is_empty(), "{:?}", &errors[..errors.len().min(3)]);
    assert_eq!(output.len(), JOBS);
    assert!(
        output
            .iter()
            .all(|l| l["nightshift"]["state"] == "succeeded"),
        "every job succeeded"
    );
    let per_job = calls_per_job(&provider);
    assert_eq!(per_job.len(), ids.len(), "every job reached the provider");
    assert!(
        per_job.values().all(|&n| n == 1),
        "a job was sent twice: {:?}",
        per_job.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    let late = query_i64(
        &database,
        "SELECT COALESCE(SUM(late_answers), 0)::bigint FROM jobs",
    )
    .await;
    assert_eq!(late[0][0], 0, "no answer was recorded as late");
    let health = client.get("/healthz").await.unwrap();
    assert_eq!(health["database"]["ok"], true);
    drop(daemon);
    drop(server);
}

/// A provider batch whose daemon is SIGKILLed while it runs is followed by
/// another daemon of the queue: one batch at the provider, its results
/// applied, no synchronous re-run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_daemons_provider_batch_is_adopted_by_another() {
    use crate::batch_server::{BatchBehaviour, LoopbackBatchProvider};
    const JOBS: usize = 20;
    let provider = LoopbackBatchProvider::openai(BatchBehaviour {
        turnaround: Duration::from_secs(15),
        ..BatchBehaviour::default()
    })
    .await;
    let database = fresh_database().await;
    let extra =
        "[providers.batch]\ndiscount = 0.5\nexpected_turnaround = \"5s\"\npoll_every = \"200ms\"";
    let spec = vec![ProviderSpec {
        name: "openai",
        base_url: provider.base_url(),
        model: "m",
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        extra,
    }];
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut daemons = start_daemons(&dirs, &spec, &database);
    let lines: Vec<String> = (0..JOBS)
        .map(|i| {
            chat_line(
                &format!("b{i}"),
                "chat",
                &format!("job {i}"),
                Some(serde_json::json!({"deadline": "6h"})),
            )
        })
        .collect();
    for d in &daemons {
        d.unix_client().await; // answering: the schema is there
    }
    drop_file(&daemons[0].jobs(), "backlog.jsonl", &lines.join("\n"));
    // Every job in a batch (each daemon batches its share of the plan).
    wait_until_async(
        "every job in a provider batch",
        Duration::from_secs(60),
        async || {
            query_i64(
                &database,
                "SELECT COALESCE(SUM(requests), 0)::bigint FROM provider_batches WHERE remote_id IS NOT NULL",
            )
            .await[0][0]
                == JOBS as i64
        },
    )
    .await;
    // Kill the daemon that made the first.
    let owner_of_first = "SELECT owner FROM provider_batches ORDER BY id LIMIT 1";
    let owner = query_text(&database, owner_of_first, None).await;
    let killed: usize = owner.trim_start_matches("node").parse().unwrap();
    daemons[killed].kill();
    let survivor = 1 - killed;
    let by_state = "SELECT count(*) FILTER (WHERE state = 'succeeded' AND provider_channel = 'batch')::bigint, \
                    count(*)::bigint FROM jobs";
    wait_until_async(
        "every job to succeed through the batch",
        Duration::from_secs(90),
        async || query_i64(&database, by_state).await[0][0] == JOBS as i64,
    )
    .await;
    assert_eq!(query_i64(&database, by_state).await[0][1], JOBS as i64);
    let batches = query_i64(&database, "SELECT count(*)::bigint FROM provider_batches").await[0][0];
    assert_eq!(
        provider.creates() as i64,
        batches,
        "each batch created once at the provider"
    );
    assert_eq!(provider.sync_calls(), 0, "no synchronous re-run");
    let adopted_by = query_text(&database, owner_of_first, None).await;
    assert_eq!(adopted_by, format!("node{survivor}"));
}
