//! The `nightshift` command: argument parsing and wiring only.

use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use nightshift::config::{Config, EMBEDDED_DEFAULT};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "nightshift",
    version,
    about = "Cost-aware LLM batch scheduler: queue jobs durably, run each on the cheapest provider at that hour, before its deadline"
)]
struct Cli {
    /// Log format: compact (for journald and terminals) or json.
    #[arg(long, value_enum, default_value_t = LogFormat::Compact, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportBy {
    Provider,
    Class,
    Day,
    /// The channel that answered (sync, flex).
    Channel,
}

/// The shells `nightshift completions` writes a script for.
#[derive(Clone, Copy, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Compact,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon. Without --config it uses the embedded default:
    /// simulated providers, state in ./state, the watched folder ./jobs.
    Serve {
        /// Configuration file (TOML). Replaces the embedded default.
        /// Configuration file (TOML); the embedded default if omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file (or the embedded default) and print the
    /// effective configuration (defaults filled in, API keys redacted).
    CheckConfig {
        /// The file to check; the embedded default if omitted.
        file: Option<PathBuf>,
    },
    /// Print the embedded default configuration, to start a config file from.
    DefaultConfig,
    /// Show each model class's effective prices hour by hour (cheapest marked).
    Prices {
        /// Configuration file (TOML); the embedded default if omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Start of the table (RFC 3339); now if omitted.
        #[arg(long)]
        at: Option<String>,
        /// How many hours to show.
        #[arg(long, default_value_t = 48)]
        hours: u32,
    },
    /// Spend and savings of finished jobs: actual cost against list cost,
    /// from the daemon's database.
    Report {
        /// Configuration file (TOML); the embedded default if omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only jobs finished since then: RFC 3339, or a duration such as 7d.
        #[arg(long)]
        since: Option<String>,
        /// Group by provider, class, day or channel (sync, flex).
        #[arg(long, value_enum, default_value_t = ReportBy::Provider)]
        by: ReportBy,
    },
    /// Show what the daemon intends to do with its queue: jobs and expected
    /// cost per provider and hour, against dispatching everything now.
    ///
    /// While the daemon runs, this is the plan its dispatcher follows (with
    /// the latencies, success rates and availability it has observed), read
    /// over its socket. Otherwise, or with --offline, the queue is planned
    /// from the database with the configured limits.
    Plan {
        /// Configuration file (TOML); the embedded default if omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Plan from the database even if the daemon is running.
        #[arg(long)]
        offline: bool,
        /// The daemon's plan as JSON (GET /v1/plan); not with --offline.
        #[arg(long, conflicts_with = "offline")]
        json: bool,
    },
    /// Run a workload in virtual time against simulated providers and compare
    /// policies on cost and deadline misses.
    Simulate {
        /// Configuration file (TOML); the embedded default if omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Job lines with "submit_at" (RFC 3339 or "+2h30m") and optional "sim": {"output_tokens": N}.
        #[arg(long, short)]
        workload: PathBuf,
        /// Virtual start time (RFC 3339); relative submit_at offsets count from here.
        #[arg(long)]
        start: String,
        /// planner, cheapest-now or fixed:<provider>; repeat to compare.
        #[arg(long = "policy", default_value = "planner")]
        policies: Vec<String>,
        /// Also compute the offline lower bound: an LP relaxation no feasible
        /// schedule can undercut (jobs known in advance and divisible, no safety
        /// margin; keeps per-job sizes in token bins, failures as extra attempts,
        /// rpm/tpm per slot, rpd over rolling days, concurrency as service-seconds).
        #[arg(long)]
        lower_bound: bool,
        /// Write one JSON line per job and policy here.
        #[arg(long)]
        trace: Option<PathBuf>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the bearer token for the TCP listener (created if missing; mode 0600).
    Token {
        /// Configuration file (TOML); the embedded default if omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Submit job files to the running daemon (each file all or nothing).
    Submit {
        /// Configuration file (TOML); the embedded default if omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// JSONL job files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Deadline of jobs that name none: a duration (12h) or RFC 3339.
        #[arg(long)]
        deadline: Option<String>,
        /// Wait until every job is final, then write <stem>.output.jsonl and
        /// <stem>.errors.jsonl into --out.
        #[arg(long)]
        wait: bool,
        /// Where --wait writes the results.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// List jobs of the running daemon (one page, in id order), or show
    /// one: `nightshift jobs show job_N`.
    #[command(disable_help_subcommand = true)]
    Jobs {
        #[command(subcommand)]
        command: Option<JobsCommand>,
        #[command(flatten)]
        list: JobsList,
    },
    /// The running daemon's queue by state and provider, spend, savings, next price change.
    Status {
        /// Configuration file (TOML); the embedded default if omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Run retention (daemon.retention) and a WAL checkpoint once on the
    /// database, and print what was done. Safe while the daemon runs.
    Maintenance {
        /// Configuration file (TOML); the embedded default if omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print a one-time link to the running daemon's dashboard (its TCP
    /// listener). The link logs in once, within 5 minutes; the session
    /// lasts 12 hours.
    Ui {
        /// Configuration file (TOML); the embedded default if omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued job (job_N) or a batch (batch_N).
    Cancel {
        /// Configuration file (TOML); the embedded default if omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script for bash, zsh or fish.
    ///
    /// Write it where the shell looks for completions. bash:
    /// `nightshift completions bash > ~/.local/share/bash-completion/completions/nightshift`.
    ///
    /// zsh: `nightshift completions zsh > ~/.zfunc/_nightshift` (a directory on $fpath).
    ///
    /// fish: `nightshift completions fish > ~/.config/fish/completions/nightshift.fish`.
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

/// `nightshift jobs` without a subcommand: one page of the list.
#[derive(clap::Args)]
struct JobsList {
    /// Configuration file (TOML); the embedded default if omitted.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// queued, running, succeeded, failed, expired or cancelled.
    #[arg(long)]
    state: Option<String>,
    /// Start after this job id (the previous page's last).
    #[arg(long)]
    after: Option<String>,
    /// How many jobs, 1 to 1000 (default 50).
    #[arg(long)]
    limit: Option<u32>,
    /// Only jobs from here: file (the watched folder), submission (POST
    /// /v1/jobs), batch (the Batch API), or one of them: sub_N, batch_N.
    #[arg(long)]
    source: Option<String>,
    /// Only jobs with exactly this custom_id.
    #[arg(long)]
    custom_id: Option<String>,
    /// Print the API's JSON.
    #[arg(long)]
    json: bool,
}

impl JobsList {
    /// The first list option given, if any: they have no meaning for
    /// `jobs show` (whose own --json comes after it).
    fn list_option(&self) -> Option<&'static str> {
        [
            (self.state.is_some(), "--state"),
            (self.after.is_some(), "--after"),
            (self.limit.is_some(), "--limit"),
            (self.source.is_some(), "--source"),
            (self.custom_id.is_some(), "--custom-id"),
            (self.json, "--json"),
        ]
        .into_iter()
        .find_map(|(given, name)| given.then_some(name))
    }
}

#[derive(Subcommand)]
enum JobsCommand {
    /// One job: its state, where and when it ran, what it cost, the plan for
    /// it while queued, its error once failed, and why it is where it is.
    Show {
        /// The job's id (job_N).
        id: String,
        /// Print the API's JSON object (GET /v1/jobs/{id}).
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader has what it wanted (`nightshift jobs | head -1`).
        Err(e) if e.is::<StdoutClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: it panics if stderr is closed too.
            let _ = writeln!(std::io::stderr(), "nightshift: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Stdout is a pipe whose reader has gone (EPIPE): not a failure.
#[derive(Debug, thiserror::Error)]
#[error("stdout is closed")]
struct StdoutClosed;

/// Writes a command's output to stdout: the one writer of every command
/// (`print!` panics on a closed pipe). A closed pipe is [`StdoutClosed`],
/// which `main` turns into a clean exit, as `cat` and `rg` do.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Compact => builder.compact().init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::embedded_default(),
    })
}

/// Runs a client command against the daemon's socket and prints its output.
fn client_command<F>(config: Option<&PathBuf>, f: F) -> anyhow::Result<()>
where
    F: AsyncFnOnce(&nightshift::api::client::Client) -> anyhow::Result<String>,
{
    let http = load(config)?.http;
    let client = nightshift::cli::client::client(&http);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let out = runtime.block_on(f(&client))?;
    emit(&out)
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Token { config } => {
            let http = load(config.as_ref())?.http;
            emit(&format!("{}\n", nightshift::cli::client::token(&http)?))
        }
        Command::Submit {
            config,
            files,
            deadline,
            wait,
            out,
            json,
        } => {
            let args = nightshift::cli::client::SubmitArgs {
                files,
                deadline,
                wait,
                out_dir: out,
                json,
            };
            client_command(config.as_ref(), async |c| {
                nightshift::cli::client::submit(c, &args).await
            })
        }
        Command::Jobs {
            command: Some(JobsCommand::Show { id, json }),
            list,
        } => {
            if let Some(option) = list.list_option() {
                anyhow::bail!(
                    "{option} lists jobs and does not go with `jobs show`; \
                     `nightshift jobs show {id} --json` prints the job's JSON"
                );
            }
            client_command(list.config.as_ref(), async |c| {
                nightshift::cli::client::job_show(c, &id, json).await
            })
        }
        Command::Jobs {
            command: None,
            list,
        } => {
            let args = nightshift::cli::client::JobsArgs {
                state: list.state.as_deref(),
                after: list.after.as_deref(),
                limit: list.limit.unwrap_or(50),
                source: list.source.as_deref(),
                custom_id: list.custom_id.as_deref(),
                json: list.json,
            };
            client_command(list.config.as_ref(), async |c| {
                nightshift::cli::client::jobs(c, &args).await
            })
        }
        Command::Status { config, json } => client_command(config.as_ref(), async |c| {
            nightshift::cli::client::status(c, json).await
        }),
        Command::Cancel { config, id, json } => client_command(config.as_ref(), async |c| {
            nightshift::cli::client::cancel(c, &id, json).await
        }),
        Command::Ui { config, json } => client_command(config.as_ref(), async |c| {
            nightshift::cli::client::ui_link(c, json).await
        }),
        Command::DefaultConfig => emit(EMBEDDED_DEFAULT),
        Command::Completions { shell } => emit(&completions(shell)),
        Command::CheckConfig { file } => {
            let config = load(file.as_ref())?;
            let mut out = nightshift::cli::tables::effective_config(&config);
            for w in config.warnings() {
                out.push_str(&format!("\n# warning: {w}"));
            }
            out.push_str(&format!(
                "\n# {}: OK ({} providers, {} models, {} classes)\n",
                config.origin,
                config.catalog.providers.len(),
                config.catalog.models.len(),
                config.catalog.classes.len()
            ));
            emit(&out)
        }
        Command::Prices { config, at, hours } => {
            let config = load(config.as_ref())?;
            let at = match at {
                Some(s) => chrono::DateTime::parse_from_rfc3339(&s)
                    .with_context(|| format!("--at '{s}' is not an RFC 3339 timestamp"))?
                    .with_timezone(&chrono::Utc),
                None => chrono::Utc::now(),
            };
            emit(&nightshift::cli::tables::prices_table(
                &config.catalog,
                at,
                hours,
            ))
        }
        Command::Report { config, since, by } => {
            let config = load(config.as_ref())?;
            let by = match by {
                ReportBy::Provider => nightshift::store::SpendBy::Provider,
                ReportBy::Class => nightshift::store::SpendBy::Class,
                ReportBy::Day => nightshift::store::SpendBy::Day,
                ReportBy::Channel => nightshift::store::SpendBy::Channel,
            };
            emit(&nightshift::cli::report(&config, since.as_deref(), by)?)
        }
        Command::Maintenance { config } => {
            let config = load(config.as_ref())?;
            emit(&nightshift::daemon::cron::command(&config)?)
        }
        Command::Plan {
            config,
            offline,
            json,
        } => {
            let config = load(config.as_ref())?;
            if !offline {
                let client = nightshift::cli::client::client(&config.http);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the async runtime")?;
                if let Some(out) =
                    runtime.block_on(nightshift::cli::client::daemon_plan(&client, json))?
                {
                    return emit(&out);
                }
                if json {
                    anyhow::bail!(
                        "no daemon answers on {}; --json shows the daemon's plan (use --offline for one from the database)",
                        config.http.socket.display()
                    );
                }
            }
            let note = if offline {
                "(offline: planned from the database with the configured limits)\n"
            } else {
                "(the daemon is not running: planned from the database with the configured limits)\n"
            };
            emit(&format!("{note}{}", nightshift::cli::plan(&config)?))
        }
        Command::Simulate {
            config,
            workload,
            start,
            policies,
            lower_bound,
            trace,
            json,
        } => {
            let config = load(config.as_ref())?;
            let args = nightshift::cli::SimulateArgs {
                workload,
                start,
                policies,
                lower_bound,
                trace,
                json,
            };
            emit(&nightshift::cli::simulate(&config, &args)?)
        }
        Command::Serve { config: path } => {
            let config = load(path.as_ref())?;
            if config.all_simulated() {
                warn!(
                    config = %config.origin,
                    "all providers are SIMULATED: jobs are answered in-process with deterministic \
                     completions and no real API is called. Pass --config FILE to use real providers."
                );
            }
            info!(config = %config.origin, jobs_dir = %config.daemon.jobs_dir.display(),
                  state_dir = %config.daemon.state_dir.display(), "starting");
            // All SQLite work funnels through one connection, so more than a
            // few blocking threads only add per-thread allocator arenas (RSS).
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(8)
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(nightshift::daemon::run(config, path, shutdown_signal()))
        }
    }
}

/// The completion script for `shell`, generated from the clap definitions.
fn completions(shell: CompletionShell) -> String {
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "nightshift", &mut script);
    // clap writes the names and help texts it was given, which are UTF-8.
    String::from_utf8_lossy(&script).into_owned()
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::{CommandFactory, Parser};

    /// What `nightshift <args>` prints for --help (the binary itself is run
    /// in tests/epipe.rs).
    fn help(args: &[&str]) -> String {
        let e = Cli::try_parse_from(std::iter::once("nightshift").chain(args.iter().copied()))
            .err()
            .expect("--help stops parsing");
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp, "{e}");
        e.render().to_string()
    }

    #[test]
    fn plan_and_report_help_each_describe_their_own_command() {
        let plan = help(&["plan", "--help"]);
        assert!(
            plan.contains("what the daemon intends to do with its queue"),
            "{plan}"
        );
        assert!(!plan.contains("Spend and savings"), "{plan}");
        let report = help(&["report", "--help"]);
        assert!(
            report.contains("Spend and savings of finished jobs"),
            "{report}"
        );
        assert!(!report.contains("intends to do"), "{report}");
    }

    /// Every man page, as clap_mangen renders it from the CLI: (file name,
    /// content) of `nightshift.1` and one page per subcommand, nested ones
    /// too (`nightshift-serve.1`, `nightshift-jobs-show.1`).
    fn man_pages() -> Vec<(String, Vec<u8>)> {
        fn walk(cmd: clap::Command, out: &mut Vec<(String, Vec<u8>)>) {
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                walk(sub.clone(), out);
            }
            let man = clap_mangen::Man::new(cmd);
            let mut page = Vec::new();
            man.render(&mut page).expect("rendering into memory");
            out.push((man.get_filename(), page));
        }
        let mut cli = Cli::command().disable_help_subcommand(true);
        cli.build();
        let mut pages = Vec::new();
        walk(cli, &mut pages);
        pages.sort();
        pages
    }

    /// docs/man holds exactly the pages the CLI generates. With
    /// NIGHTSHIFT_BLESS=1 the test rewrites them instead.
    #[test]
    fn the_committed_man_pages_match_the_cli() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/man");
        let pages = man_pages();
        assert!(
            pages.iter().any(|p| p.0 == "nightshift.1")
                && pages.iter().any(|p| p.0 == "nightshift-serve.1"),
            "{:?}",
            pages.iter().map(|p| &p.0).collect::<Vec<_>>()
        );
        let committed = |dir: &std::path::Path| -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".1"))
                .collect();
            names.sort();
            names
        };
        if std::env::var_os("NIGHTSHIFT_BLESS").is_some_and(|v| v == "1") {
            std::fs::create_dir_all(&dir).unwrap();
            for name in committed(&dir) {
                if !pages.iter().any(|p| p.0 == name) {
                    std::fs::remove_file(dir.join(name)).unwrap();
                }
            }
            for (name, page) in &pages {
                std::fs::write(dir.join(name), page).unwrap();
            }
            return;
        }
        let mut wrong: Vec<String> = Vec::new();
        for (name, page) in &pages {
            match std::fs::read(dir.join(name)) {
                Ok(file) if file == *page => {}
                Ok(_) => wrong.push(format!("{name} differs")),
                Err(_) => wrong.push(format!("{name} is missing")),
            }
        }
        for name in committed(&dir) {
            if !pages.iter().any(|p| p.0 == name) {
                wrong.push(format!("{name} is not a page of the CLI"));
            }
        }
        assert!(
            wrong.is_empty(),
            "docs/man is out of step with the CLI ({}): run \
             `NIGHTSHIFT_BLESS=1 cargo test --bin nightshift man_pages` to rewrite it, \
             and commit the result",
            wrong.join(", ")
        );
    }

    #[test]
    fn every_subcommand_has_help() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        for sub in cli.get_subcommands() {
            assert!(
                sub.get_about()
                    .is_some_and(|a| !a.to_string().trim().is_empty()),
                "`nightshift {}` has no help text",
                sub.get_name()
            );
        }
    }
}
