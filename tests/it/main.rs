//! nightshift's integration tests, in one binary: the real `nightshift`
//! binary against a loopback provider, one module per area, sharing the
//! harness in [`common`].

mod batch_server;
mod common;

mod anthropic;
mod batch;
mod batch_wire;
mod budget;
mod cli;
mod connections;
mod dashboard;
mod epipe;
mod explain;
mod faults;
mod flex;
mod folder;
mod grafana;
mod hostile_files;
mod hostile_values;
mod http;
mod http_openai;
mod http_openapi;
mod kill;
mod limits;
mod maintenance;
mod metrics;
mod planner;
mod reload;
mod shared_queue;
mod simulate_agrees;
mod supervision;
mod systemd;
