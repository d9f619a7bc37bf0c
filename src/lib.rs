//! nightshift: a cost-aware batch scheduler for LLM inference jobs.
//!
//! Jobs (OpenAI batch request lines) enter a durable SQLite queue and are sent
//! to whichever provider has the cheapest effective price for them at that
//! hour, before their deadline, within every provider's rate limits.
//!
//! The modules follow the data:
//!
//! | stage    | module        | what it does                                              | IO? |
//! |----------|---------------|-----------------------------------------------------------|-----|
//! | config   | [`config`]    | TOML → validated [`config::Config`] (file:line: field errors) | reads the file |
//! |          | [`live`]      | the part of the config a SIGHUP reload replaces           | — |
//! | ingest   | [`job`]       | one JSONL line → [`job::NewJob`] or a [`job::LineError`]  | pure |
//! |          | [`ingest`]    | the watched folder: inbox → queue → processed/rejected    | files |
//! | queue    | [`queue`]     | the SQLite store; every state change one transaction      | SQLite |
//! | plan     | [`pricing`]   | prices and price windows as functions of time             | pure |
//! |          | [`estimate`]  | token estimates before a request is sent                  | pure |
//! |          | [`plan`]      | where and when each job goes (LP over job groups)         | pure |
//! |          | [`limits`]    | rate-limit accounting (rpm, tpm, rpd, concurrency)        | pure |
//! |          | [`budget`]    | daily / monthly spending caps                             | pure |
//! |          | [`reliability`] | retry vs fail, backoff, pauses, circuit breaker         | pure |
//! | dispatch | [`provider`]  | OpenAI-compatible HTTP client, and the simulator          | network |
//! |          | [`dispatch`]  | the loop: plan, lease, send, record                       | async |
//! | results  | [`results`]   | result lines and atomic outbox files                      | files |
//! | api      | [`http`], [`cli_client`] | HTTP API (native + OpenAI Batch) on a Unix socket / TCP, and the CLI over it | sockets |
//! |          | [`telemetry`] | Prometheus metrics and live provider health               | — |
//! | daemon   | [`daemon`]    | wiring, inotify, SIGHUP, shutdown                         | all |
//! |          | [`systemd`]   | READY / WATCHDOG / STOPPING notifications                 | socket |
//! |          | [`maintenance`] | retention, WAL checkpoints, budget roll-over nudge (cron) | SQLite |
//! | offline  | [`simulate`]  | virtual-time runs of the same planner; the lower bound    | pure |
//! |          | [`commands`], [`views`] | `plan`, `simulate`, `report`, `prices`, `check-config` output | files |
//!
//! Pure modules take `now` as an argument and never read the clock, so the
//! same code runs in real time in the daemon and in virtual time in tests.

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dispatch;
pub mod domain;
pub mod ingest;
pub mod plan;
pub mod results;
pub mod simulate;
pub mod store;
pub mod telemetry;
