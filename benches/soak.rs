//! Soak benchmark: resident memory of the daemon over a long run of jobs.
//! The daemon runs a simulated provider (answers in-process, ~1 ms) while
//! 100,000 jobs go through it in ten files; RSS is sampled every second.
//! Jobs live in SQLite, so memory must stay flat as they pass.
//!
//!     cargo bench --bench soak
//!
//! NIGHTSHIFT_BENCH_JOBS (default 100000) sets the number of jobs.

mod support;

use std::time::{Duration, Instant};

fn main() {
    let jobs: usize = std::env::var("NIGHTSHIFT_BENCH_JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let files = 10;
    let per_file = jobs / files;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"[daemon]
state_dir = "{state}"
jobs_dir = "{jobs}"
rescan_interval = "1s"

[[providers]]
name = "sim"
kind = "simulated"
latency = "1ms"
ms_per_output_token = 0.0
concurrency = 256

[[providers.models]]
name = "m"
input_per_mtok = 0.1
output_per_mtok = 0.4

[classes]
chat = ["sim/m"]
"#,
        state = dir.path().join("state").display(),
        jobs = dir.path().join("jobs").display(),
    );
    let mut child = support::spawn_daemon(dir.path(), &config, &[]);
    let pid = child.id();
    let inbox = dir.path().join("jobs/inbox");
    let outbox = dir.path().join("jobs/outbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let start = Instant::now();
    println!("## Soak ({jobs} jobs in {files} files of {per_file}, simulated provider)\n");
    println!("| files done | jobs done | elapsed | daemon RSS |");
    println!("|---|---|---|---|");
    println!(
        "| 0 | 0 | 0 s | {} KiB |",
        support::rss_kb(pid).unwrap_or(0)
    );
    let mut samples = Vec::new();
    for f in 0..files {
        let lines: Vec<String> = (0..per_file)
            .map(|i| {
                format!(
                    r#"{{"custom_id":"s{f}-{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"chat","messages":[{{"role":"user","content":"Summarise ticket {f}-{i} in five words please."}}],"max_tokens":32}}}}"#
                )
            })
            .collect();
        let part = dir.path().join(format!("jobs/f{f}.part"));
        std::fs::write(&part, lines.join("\n")).unwrap();
        std::fs::rename(&part, inbox.join(format!("f{f}.jsonl"))).unwrap();
        let out = outbox.join(format!("f{f}.output.jsonl"));
        while !out.exists() {
            std::thread::sleep(Duration::from_millis(250));
            samples.push(support::rss_kb(pid).unwrap_or(0));
            assert!(
                start.elapsed() < Duration::from_secs(1800),
                "soak did not finish"
            );
        }
        println!(
            "| {} | {} | {:.0} s | {} KiB |",
            f + 1,
            (f + 1) * per_file,
            start.elapsed().as_secs_f64(),
            support::rss_kb(pid).unwrap_or(0)
        );
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    let (min, max) = (
        samples.iter().min().copied().unwrap_or(0),
        samples.iter().max().copied().unwrap_or(0),
    );
    let half = samples.len() / 2;
    let first_half = samples[..half].iter().max().copied().unwrap_or(0);
    let second_half = samples[half..].iter().max().copied().unwrap_or(0);
    println!();
    println!(
        "{jobs} jobs in {elapsed:.0} s ({:.0} jobs/s); RSS min {min} KiB, max {max} KiB; max in the first half {first_half} KiB, in the second half {second_half} KiB",
        jobs as f64 / elapsed
    );
    println!();
}
