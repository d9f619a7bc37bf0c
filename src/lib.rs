//! nightshift: a cost-aware batch scheduler for LLM inference jobs.
//!
//! Jobs (OpenAI batch request lines) enter a durable queue (SQLite, or
//! PostgreSQL shared by several daemons) and are sent
//! to whichever provider has the cheapest effective price for them at that
//! hour, before their deadline, within every provider's rate limits.
//!
//! The folders follow the data, and each imports only from the rows above it
//! (no import cycles). *Pure* code takes `now` as an argument and never reads
//! the clock, touches a file or a socket, so the daemon (real time) and the
//! simulator (virtual time) run the same decisions.
//!
//! | stage    | module | what it holds | IO |
//! |----------|--------|---------------|----|
//! | vocabulary | [`domain`] | catalog and prices ([`domain::pricing`]), job lines ([`domain::job`]), token estimates, budgets and retry policy ([`domain::policy`]), units | pure |
//! | config   | [`config`] | TOML → validated [`config::Config`] (`file:line: field` errors); [`config::live`]: what SIGHUP replaces | reads the file |
//! | ingest   | [`ingest`] | the watched folder: inbox → queue → processed/ or rejected/ | files |
//! | queue    | [`store`]  | one interface ([`store::Store`]) over two backends: SQLite ([`store::Sqlite`]) and PostgreSQL ([`store::pg`]), every state change one transaction; retention; what daemons sharing a queue tell each other ([`store::coord`]; admission against shared limits in [`store::pg::coord`]) | SQLite, PostgreSQL |
//! | plan     | [`plan`]   | where and when each job goes (an LP over job groups) | pure |
//! | dispatch | [`dispatch`] | the step that decides what starts now ([`dispatch::decide`]) with rate limits ([`dispatch::limits`]), budgets ([`dispatch::budget`]) and retry/health ([`dispatch::reliability`]); each provider's live view ([`dispatch::live`]) and why a job waits ([`dispatch::explain`]); provider clients ([`dispatch::provider`]) and the Batch API wire clients, OpenAI files/batches and Anthropic Message Batches ([`dispatch::batch_api`]); the batch runner, upload → create → poll → guard → apply ([`dispatch::batches`]; its pure rules in [`dispatch::batches::rules`]); the loop that applies it, and on a shared queue follows the planner and the other daemons (`dispatch::fleet`) | pure step, async shell |
//! | results  | [`results`] | result lines and atomic outbox files | files |
//! | api      | [`api`]    | HTTP API (native + OpenAI Batch) on a Unix socket and loopback TCP; the dashboard ([`api::ui`]) | sockets |
//! |          | [`telemetry`] | Prometheus metrics and the dispatcher's live view | — |
//! |          | [`shared`] | the one cloneable handle components hold: store, live config, telemetry, wake-ups | — |
//! | daemon   | [`daemon`] | supervised components, inotify, SIGHUP; [`daemon::cron`] maintenance, [`daemon::systemd`] notifications, [`daemon::heartbeat`] on a shared queue | all |
//! | offline  | [`simulate`] | virtual-time runs of the same planner and dispatch step; the lower bound | pure |
//! | cli      | [`cli`]    | offline commands (`plan`, `simulate`, `report`, `prices`), tables, the client over the socket | files, socket |

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dispatch;
pub mod domain;
pub mod faults;
#[cfg(test)]
mod fuzz_tests;
pub mod ingest;
pub mod plan;
pub mod results;
pub mod shared;
pub mod simulate;
pub mod store;
pub mod telemetry;
