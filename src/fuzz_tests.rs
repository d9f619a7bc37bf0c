//! Bounded property tests ("fuzzing") of the two parsers that take text
//! from outside: job lines and the configuration. Random and mutated JSON
//! lines and TOML documents, with huge numbers, deep nesting and odd
//! unicode, must never panic; every error names its field (and, for the
//! configuration, its line); and whatever is accepted stays within the
//! limits of [`crate::domain::bounds`] and runs (a job's body is one the
//! dispatcher can send; a configuration's values survive the arithmetic the
//! daemon does with them).
//!
//! Case counts are set so the whole module runs in seconds in a debug build.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use proptest::test_runner::Config as Runner;

use crate::config::Config;
use crate::domain::bounds;
use crate::domain::job::{JobContext, LineError, NewJob, Options, parse_line};

fn runner(cases: u32) -> Runner {
    Runner {
        cases,
        failure_persistence: None,
        ..Runner::default()
    }
}

/// Runs `test` on `cases` values of `strategy`, from a fixed seed: CI sees
/// the same cases every run (`PROPTEST_CASES` does not apply).
fn check<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(
        runner(cases),
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

// ---- JSON pieces ------------------------------------------------------------

/// Numbers as JSON text, many of them out of every range.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        (0u64..2_000_000).prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            "0",
            "-1",
            "1",
            "128",
            "129",
            "1000000",
            "1000001",
            "18446744073709551615",
            "18446744073709551616",
            "9223372036854775807",
            "-9223372036854775809",
            "1e400",
            "-1e400",
            "1e308",
            "5e-324",
            "1e-400",
            "64.0",
            "64.5",
            "-0",
            "1E+2",
        ])
        .prop_map(str::to_string),
        (1usize..400).prop_map(|n| "9".repeat(n)),
    ]
}

/// Strings as JSON text: odd unicode (escaped or raw) and invalid escapes.
fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        "[a-z0-9 ]{0,12}".prop_map(|s| format!("\"{s}\"")),
        prop::sample::select(vec![
            r#""\ud800""#,
            r#""\udc00\ud800""#,
            r#""\ud83d\ude00""#,
            r#""\u0000""#,
            "\"\u{0}\"",
            "\"\u{1}\"",
            "\"\u{feff}\u{202e}\u{fffd}\"",
            "\"\u{10ffff}\"",
            r#""\x""#,
            r#""\u12""#,
            "\"é\u{301}\"",
            "\"\"",
        ])
        .prop_map(str::to_string),
    ]
}

/// Any JSON value as text (possibly not valid JSON: numbers and strings
/// from the pools above), nested a little.
fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        number(),
        string(),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((string(), inner), 0..4).prop_map(|kv| {
                let fields: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

/// A value wrapped in `depth` arrays or objects (deep nesting).
fn nested() -> impl Strategy<Value = String> {
    (value(), 0usize..160, any::<bool>()).prop_map(|(v, depth, arrays)| {
        if arrays {
            format!("{}{v}{}", "[".repeat(depth), "]".repeat(depth))
        } else {
            format!("{}{v}{}", "{\"a\":".repeat(depth), "}".repeat(depth))
        }
    })
}

/// `"key": value` or nothing.
fn field(key: &'static str, v: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    field_p(key, 0.5, v)
}

/// `"key": value` with probability `p`, or nothing.
fn field_p(
    key: &'static str,
    p: f64,
    v: impl Strategy<Value = String>,
) -> impl Strategy<Value = String> {
    prop::option::weighted(p, v)
        .prop_map(move |v| v.map_or(String::new(), |v| format!(",\"{key}\":{v}")))
}

fn durations() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "\"12h\"",
            "\"365d\"",
            "\"366d\"",
            "\"99999999d\"",
            "\"100000000y\"",
            "\"99999999999999999999999y\"",
            "\"0s\"",
            "\"-5m\"",
            "\"2026-11-25T00:00:00Z\"",
            "\"9999-12-31T23:59:59Z\"",
            "\"2020-01-01T00:00:00Z\"",
            "\"+275760-09-13T00:00:00Z\"",
        ])
        .prop_map(str::to_string),
        string(),
        number(),
    ]
}

/// A chat or embeddings job line whose fields come from the hostile pools,
/// each present or not.
fn job_line() -> impl Strategy<Value = String> {
    let custom_id = prop_oneof![
        16 => "[a-z0-9-]{1,10}".prop_map(|s| format!("\"{s}\"")),
        1 => (500usize..700).prop_map(|n| format!("\"{}\"", "i".repeat(n))),
        1 => string(),
        1 => number(),
    ];
    let url = prop::sample::select(vec![
        "\"/v1/chat/completions\"",
        "\"/v1/chat/completions\"",
        "\"/v1/chat/completions\"",
        "\"/v1/chat/completions\"",
        "\"/v1/chat/completions\"",
        "\"/v1/chat/completions\"",
        "\"/v1/chat/completions\"",
        "\"/v1/chat/completions\"",
        "\"/v1/chat/completions\"",
        "\"/v1/chat/completions\"",
        "\"/v1/embeddings\"",
        "\"/v1/images\"",
        "7",
    ])
    .prop_map(str::to_string);
    let model = prop_oneof![
        6 => Just("\"cheap-chat\"".to_string()),
        1 => Just("\"embed\"".to_string()),
        1 => string(),
    ];
    let messages = prop_oneof![
        2 => Just(r#"[{"role":"user","content":"hi"}]"#.to_string()),
        4 => string().prop_map(|s| format!(r#"[{{"role":"user","content":{s}}}]"#)),
        1 => value().prop_map(|v| format!(r#"[{{"role":"user","content":{v}}}]"#)),
        1 => nested().prop_map(|v| format!(r#"[{{"role":"user","content":{v}}}]"#)),
        1 => value(),
    ];
    let body = (
        field_p("model", 0.95, model),
        field_p("messages", 0.95, messages),
        field_p("input", 0.1, prop_oneof![string(), value()]),
        field(
            "max_tokens",
            prop_oneof![4 => (1u64..4096).prop_map(|n| n.to_string()), 2 => number(), 1 => value()],
        ),
        field_p("max_completion_tokens", 0.2, number()),
        field_p(
            "n",
            0.3,
            prop_oneof![3 => (1u64..4).prop_map(|n| n.to_string()), 1 => number()],
        ),
        field(
            "temperature",
            prop_oneof![3 => Just("0.7".to_string()), 1 => number()],
        ),
        field_p("extra", 0.3, nested()),
    )
        .prop_map(|(a, b, c, d, e, f, g, h)| format!("{{\"z\":0{a}{b}{c}{d}{e}{f}{g}{h}}}"));
    let nightshift = (
        field(
            "deadline",
            prop_oneof![3 => "\"[1-9][0-9]?[mhd]\"".boxed(), 2 => durations().boxed()],
        ),
        field(
            "priority",
            prop_oneof![3 => (-100i64..100).prop_map(|n| n.to_string()), 1 => number()],
        ),
        field(
            "max_cost_usd",
            prop_oneof![3 => Just("0.5".to_string()), 1 => number()],
        ),
        field_p("providers", 0.1, value()),
        field_p("colour", 0.05, value()),
    )
        .prop_map(|(a, b, c, d, e)| format!("{{\"regions\":null{a}{b}{c}{d}{e}}}"));
    (
        field_p("custom_id", 0.95, custom_id),
        field_p(
            "method",
            0.95,
            prop::sample::select(
                vec!["\"POST\""; 18]
                    .into_iter()
                    .chain(["\"GET\"", "null"])
                    .collect::<Vec<_>>(),
            )
            .prop_map(str::to_string),
        ),
        field_p("url", 0.95, url),
        field_p("body", 0.95, prop_oneof![6 => body, 1 => value()]),
        field("nightshift", nightshift),
    )
        .prop_map(|(a, b, c, d, e)| {
            format!("{{\"custom_id\":null{a}{b}{c}{d}{e}}}").replacen("\"custom_id\":null,", "", 1)
        })
}

/// Byte-level mutations of a line: a slice cut out, a string put in, a
/// piece repeated.
fn mutated(line: String) -> impl Strategy<Value = String> {
    let len = line.len();
    (0..=len, 0..=len, string(), 0usize..3).prop_map(move |(a, b, insert, how)| {
        let (a, b) = (a.min(b), a.max(b));
        let floor = |i: usize| {
            (0..=i)
                .rev()
                .find(|&i| line.is_char_boundary(i))
                .unwrap_or(0)
        };
        let (a, b) = (floor(a), floor(b));
        match how {
            0 => format!("{}{}", &line[..a], &line[b..]),
            1 => format!("{}{insert}{}", &line[..a], &line[a..]),
            _ => format!("{}{}{}", &line[..b], &line[a..b], &line[b..]),
        }
    })
}

const GOOD: &str = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"cheap-chat","messages":[{"role":"user","content":"Hello"}],"max_tokens":64,"n":2},"nightshift":{"deadline":"12h","priority":2,"max_cost_usd":0.5}}"#;

/// What must hold of one line's outcome, accepted or not.
fn check_line(line: &str, outcome: &Result<NewJob, LineError>) -> Result<(), TestCaseError> {
    match outcome {
        Ok(j) => {
            let now = now();
            prop_assert!(j.estimate.input <= bounds::MAX_INPUT_TOKENS, "{line}");
            prop_assert!(
                j.estimate.output <= bounds::MAX_OUTPUT_TOKENS / 2 * bounds::MAX_CHOICES,
                "{line}"
            );
            prop_assert!(j.deadline > now, "{line}");
            prop_assert!(
                j.deadline <= bounds::add(now, bounds::MAX_DEADLINE),
                "{line}"
            );
            prop_assert!(
                j.priority.unsigned_abs() <= bounds::MAX_PRIORITY as u64,
                "{line}"
            );
            prop_assert!(
                !j.custom_id.is_empty() && j.custom_id.len() <= bounds::MAX_CUSTOM_ID_BYTES
            );
            // The dispatcher parses the body like this before sending it.
            let sent = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&j.body);
            prop_assert!(sent.is_ok(), "accepted but unsendable: {line}: {sent:?}");
            if let Some(o) = &j.options {
                prop_assert!(Options::parse(o).is_ok(), "{line}");
            }
        }
        Err(e) => {
            prop_assert!(!e.message.is_empty(), "{line}");
            // A field, or (for a line that is not JSON at all) a column.
            prop_assert!(
                e.field.as_deref().is_some_and(|f| !f.is_empty()) || e.message.contains("(column "),
                "an error that names no field: {line}: {e}"
            );
        }
    }
    Ok(())
}

fn parse(line: &str) -> Result<NewJob, LineError> {
    let c = Config::embedded_default();
    parse_line(
        line,
        &JobContext {
            catalog: &c.catalog,
            now: now(),
            default_deadline: Duration::from_secs(86_400),
        },
    )
}

#[test]
fn job_lines_from_the_hostile_pools_never_panic_and_errors_name_their_field() {
    let c = Config::embedded_default();
    let ctx = JobContext {
        catalog: &c.catalog,
        now: now(),
        default_deadline: Duration::from_secs(86_400),
    };
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    check(600, job_line(), |line| {
        let outcome = parse_line(&line, &ctx);
        if outcome.is_ok() {
            accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        check_line(&line, &outcome)?;
        Ok(())
    });
    let accepted = accepted.into_inner();
    assert!(accepted >= 50, "only {accepted} of 600 lines were accepted");
}

#[test]
fn mutated_good_lines_never_panic_and_errors_name_their_field() {
    assert!(parse(GOOD).is_ok());
    check(600, mutated(GOOD.to_string()), |line| {
        let outcome = parse(&line);
        check_line(&line, &outcome)?;
        Ok(())
    });
}

#[test]
fn arbitrary_text_never_panics() {
    check(300, any::<String>(), |line| {
        let outcome = parse(&line);
        check_line(&line, &outcome)?;
        Ok(())
    });
}

#[test]
fn every_error_of_a_file_names_its_line() {
    // Generated lines, then blank and good ones among them (a union of the
    // line strategy itself needs more stack than a test thread has).
    let lines = (
        prop::collection::vec(job_line(), 1..5),
        prop::collection::vec(0usize..3, 4),
    )
        .prop_map(|(generated, extra)| {
            let mut lines = generated;
            for (i, kind) in extra.into_iter().enumerate() {
                let at = i.min(lines.len());
                match kind {
                    0 => lines.insert(at, String::new()),
                    1 => lines.insert(at, GOOD.to_string()),
                    _ => {}
                }
            }
            lines
        });
    check(100, lines, |lines| {
        let text = lines.join("\n");
        let total = text.split('\n').count() as u64;
        for (n, line) in crate::ingest::jsonl::lines(&text) {
            prop_assert!((1..=total).contains(&n));
            prop_assert_eq!(line, lines[n as usize - 1].as_str());
            check_line(line, &parse(line))?;
        }
        Ok(())
    });
}

// ---- TOML ---------------------------------------------------------------------

/// Values for a TOML key, most of them out of range or of the wrong type.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["1", "2", "100", "0.5", "\"10s\"", "\"1h\"", "\"10MB\""])
            .prop_map(str::to_string),
        4 => prop::sample::select(vec![
            "inf",
            "-inf",
            "nan",
            "1e400",
            "1e308",
            "-1",
            "0",
            "1",
            "0.5",
            "1.5",
            "4294967295",
            "4294967296",
            "9223372036854775807",
            "9223372036854775808",
            "1e-320",
            "\"1s\"",
            "\"24h\"",
            "\"365d\"",
            "\"366d\"",
            "\"3650d\"",
            "\"100000000y\"",
            "\"99999999999999999999999y\"",
            "\"0s\"",
            "\"-5s\"",
            "\"off\"",
            "\"1e3s\"",
            "\"10MB\"",
            "\"512MiB\"",
            "\"1000GB\"",
            "\"99999999999999999999\"",
            "\"\"",
            "[]",
            "{}",
            "true",
        ])
        .prop_map(str::to_string),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        1 => any::<String>().prop_map(|s| toml::Value::String(s).to_string()),
    ]
}

/// Every numeric and duration key of the configuration, each set from
/// [`toml_value`] or left out.
const KEYS: &[(&str, &str)] = &[
    ("daemon", "default_deadline"),
    ("daemon", "rescan_interval"),
    ("daemon", "request_timeout"),
    ("daemon", "shutdown_grace"),
    ("daemon", "safety_margin"),
    ("daemon", "max_attempts"),
    ("daemon", "retry_base"),
    ("daemon", "retry_max"),
    ("daemon", "retention"),
    ("daemon", "checkpoint_every"),
    ("http", "max_body"),
    ("http", "max_upload"),
    ("budget", "daily_usd"),
    ("budget", "monthly_usd"),
    ("provider", "latency"),
    ("provider", "ms_per_output_token"),
    ("provider", "failure_rate"),
    ("provider", "markup"),
    ("provider", "reserve"),
    ("provider", "rpm"),
    ("provider", "tpm"),
    ("provider", "rpd"),
    ("provider", "concurrency"),
    ("provider", "daily_budget_usd"),
    ("provider", "monthly_budget_usd"),
    ("window", "multiplier"),
    ("model", "input_per_mtok"),
    ("model", "output_per_mtok"),
    ("model", "tpm"),
    ("model", "concurrency"),
];

/// A value that fits `key` (a duration for a duration key, a small number
/// otherwise), so that some documents are accepted.
fn fitting(key: &str) -> BoxedStrategy<String> {
    let durations = [
        "default_deadline",
        "rescan_interval",
        "request_timeout",
        "shutdown_grace",
        "safety_margin",
        "retry_base",
        "retry_max",
        "retention",
        "checkpoint_every",
        "latency",
    ];
    if durations.contains(&key) {
        prop::sample::select(vec!["\"10s\"", "\"1h\"", "\"365d\"", "\"2d\""])
            .prop_map(str::to_string)
            .boxed()
    } else if key.starts_with("max_") && key != "max_attempts" {
        Just("\"1MB\"".to_string()).boxed()
    } else {
        prop::sample::select(vec!["1", "2", "100"])
            .prop_map(str::to_string)
            .boxed()
    }
}

fn toml_document() -> impl Strategy<Value = String> {
    let keys: Vec<_> = KEYS
        .iter()
        .map(|(_, key)| {
            prop::option::weighted(
                0.2,
                prop_oneof![2 => fitting(key), 1 => toml_value().boxed()],
            )
        })
        .collect();
    keys.prop_map(|values| {
        let mut tables: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for ((table, key), v) in KEYS.iter().zip(values) {
            if let Some(v) = v {
                tables
                    .entry(table)
                    .or_default()
                    .push(format!("{key} = {v}"));
            }
        }
        let lines = |t: &str| tables.get(t).map(|v| v.join("\n")).unwrap_or_default();
        let has = |t: &str, k: &str| {
            tables
                .get(t)
                .is_some_and(|v| v.iter().any(|l| l.starts_with(&format!("{k} ="))))
        };
        let model_price = |k: &str| {
            if has("model", k) {
                String::new()
            } else {
                format!("{k} = 1.0\n")
            }
        };
        let window = if has("window", "multiplier") {
            lines("window")
        } else {
            "multiplier = 0.5".into()
        };
        format!(
            "[daemon]\n{}\n[http]\n{}\n[budget]\n{}\n\
             [[providers]]\nname = \"p\"\nkind = \"simulated\"\n{}\n\
             [[providers.price_windows]]\nname = \"w\"\nhours = [\"01:00-02:00\"]\n{window}\n\
             [[providers.models]]\nname = \"m\"\n{}{}{}\n\
             [classes]\nc = [\"p/m\"]\n",
            lines("daemon"),
            lines("http"),
            lines("budget"),
            lines("provider"),
            model_price("input_per_mtok"),
            model_price("output_per_mtok"),
            lines("model"),
        )
    })
}

/// What must hold of a configuration's outcome: errors located; an
/// accepted configuration within the limits and usable by the daemon.
fn check_config(
    text: &str,
    outcome: &Result<Config, crate::config::ConfigError>,
) -> Result<(), TestCaseError> {
    match outcome {
        Err(e) => {
            prop_assert_eq!(e.file.as_str(), "f.toml");
            prop_assert!(!e.field.is_empty() && !e.message.is_empty(), "{text}\n{e}");
            prop_assert!(!e.field.contains('$'), "an internal name in the field: {e}");
            // Only "no provider at all" has no line to point at.
            prop_assert!(
                e.line.is_some() || e.field == "providers",
                "no line: {text}\n{e}"
            );
        }
        Ok(c) => {
            let d = &c.daemon;
            for t in [
                d.rescan_interval,
                d.request_timeout,
                d.shutdown_grace,
                d.safety_margin,
                d.retry.base,
                d.retry.cap,
            ] {
                prop_assert!(t <= bounds::MAX_CONFIG_DURATION, "{text}");
            }
            prop_assert!(
                !d.default_deadline.is_zero() && d.default_deadline <= bounds::MAX_DEADLINE
            );
            prop_assert!(d.retention.is_none_or(|r| r <= bounds::MAX_RETENTION));
            prop_assert!(
                c.http.max_body <= bounds::MAX_HTTP_BODY
                    && c.http.max_upload <= bounds::MAX_HTTP_BODY
            );
            // What the daemon does with the values at start and per job.
            let now = now();
            let _ = c
                .transports
                .iter()
                .map(crate::config::Transport::typical_latency)
                .count();
            let caps = crate::plan::configured_capacities(&c.catalog, &c.transports);
            let Some((mi, m)) = c.catalog.models.iter().enumerate().find(|(_, m)| {
                m.endpoints
                    .contains(&crate::domain::pricing::Endpoint::ChatCompletions)
            }) else {
                return Ok(());
            };
            let mut limits = crate::dispatch::limits::RateLimits::for_catalog(&c.catalog, 0);
            prop_assert!(limits.try_acquire(m.provider, mi, 1_000, 0));
            let pinned = format!("{}/{}", c.catalog.providers[m.provider].name, m.name);
            let job = parse_line(
                &format!(
                    r#"{{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{{"model":{},"messages":[{{"content":"hi"}}]}}}}"#,
                    serde_json::to_string(&pinned).unwrap()
                ),
                &JobContext {
                    catalog: &c.catalog,
                    now,
                    default_deadline: d.default_deadline,
                },
            );
            // Accepted, unless the model's tpm cannot take even this small
            // request (then it is refused at ingest, never left to stall).
            let too_large = |e: &crate::domain::job::LineError| {
                e.message.contains("tpm limit") && c.catalog.max_request_tokens(mi).is_some()
            };
            prop_assert!(
                job.as_ref().map_or_else(too_large, |_| true),
                "{text}\n{job:?}"
            );
            let Ok(job) = job else {
                return Ok(());
            };
            let group = crate::plan::JobGroup {
                candidates: vec![mi],
                jobs: 10,
                input_tokens: job.estimate.input * 10,
                output_tokens: job.estimate.output * 10,
                release: now,
                deadline: job.deadline,
            };
            let settings = crate::plan::PlanSettings {
                safety_margin: d.safety_margin,
                time_limit: Duration::from_secs(1),
                ..Default::default()
            };
            let _ = crate::plan::plan(&[group], &c.catalog, &caps, now, &settings);
            let backoff = d.retry.backoff(d.retry.max_attempts, 0.99);
            prop_assert!(backoff <= d.retry.cap.max(Duration::from_millis(10)));
            let _ = crate::dispatch::reliability::next_attempt(
                &crate::dispatch::reliability::Verdict::Retry { pause: None },
                1,
                &d.retry,
                job.deadline,
                now,
                0.5,
            );
        }
    }
    Ok(())
}

#[test]
fn configurations_from_the_hostile_pools_never_panic_and_run_if_accepted() {
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    check(400, toml_document(), |text| {
        let outcome = Config::parse(&text, "f.toml", Path::new("."));
        if outcome.is_ok() {
            accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        check_config(&text, &outcome)?;
        Ok(())
    });
    // Enough documents get through for the "accepted ones run" half to matter.
    let accepted = accepted.into_inner();
    assert!(
        accepted >= 40,
        "only {accepted} of 400 documents were accepted"
    );
}

#[test]
fn mutated_and_arbitrary_toml_never_panics() {
    let base = crate::config::EMBEDDED_DEFAULT.to_string();
    assert!(Config::parse(&base, "f.toml", Path::new(".")).is_ok());
    let docs = prop_oneof![mutated(base), any::<String>()];
    check(300, docs, |text| {
        let outcome = Config::parse(&text, "f.toml", Path::new("."));
        check_config(&text, &outcome)?;
        Ok(())
    });
}
