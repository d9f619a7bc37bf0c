//! The daemon: wires the queue, the watched folder, the dispatcher and the
//! outbox writer together, and stops them in order on shutdown.

pub mod cron;
pub mod fds;
pub mod heartbeat;
pub mod systemd;

use std::fs::{self, File};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use chrono::Utc;
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::config::{Config, Transport};
use crate::dispatch::provider::ProviderClient;
use crate::dispatch::{Dispatcher, blocking};
use crate::domain::units::{escaped, escaped_os};
use crate::ingest::{self, CompletedWrites, FileOutcome, Folders};
use crate::results;
use crate::shared::Shared;
use crate::store::Store;

/// Holds the state directory's instance lock for the daemon's lifetime:
/// two daemons on one database would both believe they own its leases.
struct InstanceLock(#[allow(dead_code)] File);

fn lock_state_dir(state_dir: &Path) -> anyhow::Result<InstanceLock> {
    let path = state_dir.join("nightshift.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(InstanceLock(file)),
        Err(fs::TryLockError::WouldBlock) => {
            bail!(
                "another nightshift is already running with state directory {}",
                state_dir.display()
            )
        }
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Creates the state directory (database, instance lock, API token, the
/// default socket) owner-only, 0700, whatever the umask. One that exists
/// keeps its mode (it may be shared on purpose), with a warning if others
/// may enter it; the database in it is 0600 either way ([`Store::open`]).
fn create_state_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        // The umask can only take bits away; set them all the same.
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o700)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {
            let mode = fs::metadata(dir)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                warn!(state_dir = %escaped_os(dir.as_os_str()), "the state directory has mode {mode:03o}: others may enter it (the database in it is 0600); chmod 700 it unless it is shared on purpose");
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Runs the daemon until `shutdown` resolves, then stops gracefully.
/// `config_path` is where SIGHUP reloads the configuration from (`None`:
/// the embedded default, which a reload leaves as it is).
pub async fn run(
    mut config: Config,
    config_path: Option<std::path::PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // Poll the shutdown future once now: one that installs signal handlers
    // on its first poll (the binary's does) has them before the API answers.
    let mut shutdown = std::pin::pin!(shutdown);
    let stopped_early = futures_util::FutureExt::now_or_never(&mut shutdown).is_some();
    // Parsing reads no API key; the daemon needs them all before it starts.
    config.resolve_keys()?;
    fds::raise_nofile_limit();
    let d = &config.daemon;
    create_state_dir(&d.state_dir)
        .with_context(|| format!("creating state directory {}", d.state_dir.display()))?;
    let _lock = lock_state_dir(&d.state_dir)?;
    let folders = Folders::new(&d.jobs_dir);
    folders
        .create()
        .with_context(|| format!("creating job folders under {}", d.jobs_dir.display()))?;

    let (db, node) = (d.database.clone(), d.node.clone());
    let store = Arc::new(
        tokio::task::spawn_blocking(move || Store::open_database(&db, &node))
            .await?
            .with_context(|| format!("opening database {}", d.database))?,
    );
    let started_at = Utc::now().timestamp_millis();
    let owner = format!("{}-{}", std::process::id(), started_at);
    let beat = heartbeat::beat(&owner, &d.node, started_at);
    let now_ms = Utc::now().timestamp_millis();
    let o = owner.clone();
    let recovered = blocking(&store, move |s| s.recover_leases(now_ms, &o)).await?;
    if recovered > 0 {
        warn!(
            recovered,
            "re-queued jobs that were running when the previous instance stopped"
        );
    }
    let counts = blocking(&store, |s| s.counts()).await?;
    info!(
        database = %d.database,
        backend = store.kind(),
        queued = counts[&crate::store::JobState::Queued],
        running_recovered = recovered,
        "queue open"
    );

    let mut clients = Vec::new();
    for (p, t) in config.catalog.providers.iter().zip(&config.transports) {
        match t {
            Transport::OpenAi { base_url, wire, .. } => {
                let api = match wire {
                    crate::domain::pricing::Wire::OpenAi => "provider (OpenAI-compatible)",
                    crate::domain::pricing::Wire::Anthropic => "provider (Anthropic Messages API)",
                };
                info!(provider = %p.name, %base_url, models = config.catalog.models.iter().filter(|m| config.catalog.providers[m.provider].name == p.name).count(), "{api}")
            }
            Transport::Simulated { .. } => {
                info!(provider = %p.name, "provider (SIMULATED: answers in-process, no network, no cost)")
            }
        }
        clients.push(Arc::new(crate::dispatch::client_for(
            p,
            ProviderClient::new(&p.name, t, d.request_timeout).context("building HTTP client")?,
        )));
    }

    let catalog = Arc::new(config.catalog.clone());

    let initial_latency = config
        .transports
        .iter()
        .map(crate::config::Transport::typical_latency)
        .collect();
    let (live_tx, live_rx) = crate::config::live::channel(&config);
    let shared = Shared::new(store.clone(), live_rx);
    if store.is_shared() {
        // Alive (and maybe the planner) before the first claim: the others
        // must not take this daemon's jobs for a dead one's.
        heartbeat::beat_once(&shared, beat.clone()).await;
        let c = *shared.coordination.borrow();
        info!(node = %d.node, daemons = c.live, planner = c.planner, "joined the shared queue");
    }
    let dispatcher = Dispatcher {
        shared: shared.clone(),
        catalog: catalog.clone(),
        clients,
        initial_latency,
        owner,
        lease: d.request_timeout + Duration::from_secs(60),
        run_after_deadline: d.run_after_deadline,
        retry: d.retry,
        budgets: config.budgets.clone(),
        request_timeout: d.request_timeout,
        max_in_flight: d.max_in_flight,
        plan_settings: crate::plan::PlanSettings {
            safety_margin: d.safety_margin,
            ..Default::default()
        },
    };

    // Components start in data-flow order and stop in reverse: the API and
    // the inbox stop taking work, the dispatcher drains, the outbox writes
    // what finished.
    let mut components = Components::new();
    // First to start, last to stop: the dispatcher releases its jobs
    // before this daemon leaves the live ones.
    components.start("heartbeat", {
        let shared = shared.clone();
        move |stop| heartbeat::run(shared, beat, stop)
    });
    components.start("outbox", {
        let (shared, folders) = (shared.clone(), folders.clone());
        move |stop| outbox_loop(shared, folders, stop)
    });
    let grace = d.shutdown_grace;
    components.start("dispatcher", move |stop| dispatcher.run(stop, grace));
    components.start("ingest", {
        let (shared, folders) = (shared.clone(), folders.clone());
        let (deadline, rescan) = (
            config.daemon.default_deadline,
            config.daemon.rescan_interval,
        );
        move |stop| ingest_loop(shared, deadline, rescan, folders, stop)
    });
    // The local HTTP API: binding fails the start (a live socket, a bad address).
    let http = crate::api::Server::bind(&config, shared.clone()).await;
    match http {
        Ok(server) => components.start("http", move |stop| server.serve(stop)),
        Err(e) => {
            components.stop().await;
            return Err(e.context("starting the HTTP API"));
        }
    }
    // Retention, WAL checkpoints and the midnight budget nudge, on a cron schedule.
    components.start("maintenance", {
        let (shared, schedule) = (shared.clone(), d.into());
        move |stop| crate::daemon::cron::run(shared, schedule, stop)
    });
    info!(inbox = %folders.inbox.display(), outbox = %folders.outbox.display(), "nightshift ready");
    crate::daemon::systemd::ready(&format!("serving; inbox {}", folders.inbox.display()));
    components.start("watchdog", crate::daemon::systemd::watchdog);
    components.start("reload", {
        let running = config.clone();
        move |stop| reload_on_sighup(running, config_path, live_tx, stop)
    });

    let failed = if stopped_early {
        None
    } else {
        tokio::select! {
            () = &mut shutdown => None,
            exited = components.exited() => Some(exited),
        }
    };
    match &failed {
        None => info!("shutting down"),
        Some(name) => error!(
            component = name,
            "a component stopped unexpectedly; stopping the daemon"
        ),
    }
    crate::daemon::systemd::stopping();
    components.stop().await;
    // Results that became final during the drain.
    write_ready_outboxes(&store, &folders, OutboxLog::default()).await;
    match failed {
        None => {
            info!("stopped");
            Ok(())
        }
        Some(name) => bail!("the {name} component stopped unexpectedly (see the log above)"),
    }
}

/// The daemon's long-running components. Each runs until its stop signal;
/// one that returns or panics before that is reported by [`Components::exited`],
/// and the daemon then stops the rest and exits non-zero (systemd restarts
/// it, and the watchdog, being one of them, stops pinging).
struct Components {
    running: Vec<(
        &'static str,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    )>,
    exited_tx: mpsc::UnboundedSender<&'static str>,
    exited_rx: mpsc::UnboundedReceiver<&'static str>,
}

impl Components {
    fn new() -> Components {
        let (exited_tx, exited_rx) = mpsc::unbounded_channel();
        Components {
            running: Vec::new(),
            exited_tx,
            exited_rx,
        }
    }

    /// Starts `component(stop)` as a task.
    fn start<F, Fut>(&mut self, name: &'static str, component: F)
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        use futures_util::FutureExt;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stop_seen = stop_rx.clone();
        let fut = component(stop_rx);
        let exited = self.exited_tx.clone();
        let handle = tokio::spawn(async move {
            let outcome = std::panic::AssertUnwindSafe(fut).catch_unwind().await;
            if outcome.is_err() {
                error!(component = name, "component panicked");
            }
            if !*stop_seen.borrow() {
                let _ = exited.send(name);
            }
        });
        self.running.push((name, stop_tx, handle));
    }

    /// The name of the first component that stopped without being asked.
    async fn exited(&mut self) -> &'static str {
        match self.exited_rx.recv().await {
            Some(name) => name,
            // Unreachable while `self` holds a sender; wait forever then.
            None => std::future::pending().await,
        }
    }

    /// Stops the components in the reverse order of their start, each
    /// after the one started after it has finished.
    async fn stop(self) {
        for (name, stop, handle) in self.running.into_iter().rev() {
            let _ = stop.send(true);
            if let Err(e) = handle.await {
                warn!(
                    component = name,
                    "component task failed while stopping: {e}"
                );
            }
        }
    }
}

/// On SIGHUP, reads the configuration file again. A valid one replaces the
/// providers, prices, limits, classes and budgets in place (see
/// [`crate::config::live`]); an invalid one is refused with its file:line: field
/// error and the running configuration stays.
async fn reload_on_sighup(
    mut running: Config,
    path: Option<std::path::PathBuf>,
    live: watch::Sender<Arc<crate::config::live::Live>>,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot listen for SIGHUP (no configuration reload): {e}");
            let _ = stop.wait_for(|s| *s).await;
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = hup.recv() => {}
        }
        crate::daemon::systemd::reloading();
        let Some(path) = &path else {
            info!("SIGHUP: running on the embedded default; nothing to reload");
            crate::daemon::systemd::ready("serving (embedded default)");
            continue;
        };
        let loaded = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                let mut c = Config::load(&path)?;
                c.resolve_keys().map(|()| c)
            })
            .await
        };
        match loaded {
            Ok(Ok(new)) => {
                for what in crate::config::live::needs_restart(&running, &new) {
                    warn!(
                        setting = what,
                        "changed in the file, but only a restart applies it; keeping the running value"
                    );
                }
                let _ = live.send(Arc::new(crate::config::live::Live::from_config(&new)));
                info!(config = %path.display(), "SIGHUP: configuration reloaded (providers, prices, limits, classes, budgets)");
                running = new;
            }
            Ok(Err(e)) => error!("SIGHUP: configuration refused, keeping the running one: {e}"),
            Err(e) => {
                error!("SIGHUP: reading the configuration failed, keeping the running one: {e}")
            }
        }
        crate::daemon::systemd::ready("serving");
    }
}

/// Watches the inbox (inotify) and rescans it periodically as a fallback.
async fn ingest_loop(
    shared: Shared,
    default_deadline: Duration,
    rescan_interval: Duration,
    folders: Folders,
    mut stop: watch::Receiver<bool>,
) {
    let Shared {
        store, live, wake, ..
    } = shared;
    let changed = Arc::new(Notify::new());
    let completed = CompletedWrites::default();
    let watcher = {
        let (changed, completed) = (changed.clone(), completed.clone());
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(event) => {
                use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
                let complete = matches!(
                    event.kind,
                    EventKind::Access(AccessKind::Close(AccessMode::Write))
                        | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
                );
                if complete {
                    // For a rename pair, the last path is the new name.
                    if let Some(name) = event.paths.last().and_then(|p| p.file_name()) {
                        completed.mark(name.to_os_string());
                    }
                }
                // Reads (our own scans open the folder) change nothing.
                if complete || matches!(event.kind, EventKind::Create(_) | EventKind::Modify(_)) {
                    changed.notify_one();
                }
            }
            Err(e) => warn!("inbox watcher: {e}"),
        })
        .and_then(|mut w| {
            w.watch(&folders.inbox, RecursiveMode::NonRecursive)
                .map(|()| w)
        })
    };
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(
                "cannot watch {} ({e}); relying on the periodic rescan",
                folders.inbox.display()
            );
            None
        }
    };
    let mut next_scan = rescan_interval;
    let logged = Arc::new(std::sync::Mutex::new(InboxLog::default()));
    loop {
        // The catalog in force now (a reload applies from the next file on).
        let (store, catalog, folders2, completed2, logged2) = (
            store.clone(),
            live.borrow().catalog.clone(),
            folders.clone(),
            completed.clone(),
            logged.clone(),
        );
        let scan = tokio::task::spawn_blocking(move || {
            let mut logged = logged2.lock().unwrap_or_else(|e| e.into_inner());
            scan_inbox(
                &store,
                &catalog,
                default_deadline,
                &folders2,
                &completed2,
                &mut logged,
            )
        })
        .await;
        match scan {
            Ok((queued, unsettled)) => {
                if queued > 0 {
                    wake.notify_one();
                }
                // A file still being written is looked at again once it settles.
                next_scan = if unsettled {
                    ingest::SETTLE.min(rescan_interval)
                } else {
                    rescan_interval
                };
            }
            Err(e) => error!("inbox scan panicked: {e}"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = changed.notified() => {
                // Let a burst of events (a copy of many files) coalesce.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ = tokio::time::sleep(next_scan) => {}
        }
    }
}

/// What the ingest loop already logged: a problem that lasts (an entry that
/// cannot be moved out of the inbox, an inbox that cannot be listed) is
/// logged once, not on every scan.
#[derive(Default)]
struct InboxLog {
    entries: ingest::LogOnce<std::ffi::OsString>,
    listing: ingest::LogOnce<()>,
}

/// Ingests every ready inbox file. Returns the jobs queued and whether some
/// file was left to settle.
fn scan_inbox(
    store: &Store,
    catalog: &crate::domain::pricing::Catalog,
    default_deadline: Duration,
    folders: &Folders,
    completed: &CompletedWrites,
    logged: &mut InboxLog,
) -> (u64, bool) {
    let (files, unsettled) = match ingest::ready_files(&folders.inbox, completed, SystemTime::now())
    {
        Ok(x) => {
            logged.listing.forget(&());
            x
        }
        Err(e) => {
            if logged.listing.first((), &e.to_string()) {
                warn!(inbox = %escaped_os(folders.inbox.as_os_str()), "cannot list the inbox (retried on every scan, logged once): {e}");
            }
            return (0, false);
        }
    };
    // An entry no longer in the inbox is forgotten: if it comes back, a
    // problem with it is news again.
    logged
        .entries
        .retain(|name| fs::symlink_metadata(folders.inbox.join(name)).is_ok());
    let mut queued = 0;
    for path in files {
        let os_name = path.file_name().unwrap_or_default().to_os_string();
        let name = escaped_os(&os_name).to_string();
        let outcome =
            ingest::ingest_file(store, catalog, default_deadline, folders, &path, Utc::now());
        if outcome.is_ok() {
            logged.entries.forget(&os_name);
        }
        let moved = |p: &Path| escaped_os(p.as_os_str()).to_string();
        match outcome {
            Ok(FileOutcome::Ingested { summary, moved_to }) => {
                queued += summary.queued;
                info!(file = %name, queued = summary.queued, invalid = summary.invalid, outbox_stem = %escaped(&summary.stem),
                      moved_to = %moved(&moved_to), "ingested job file");
            }
            Ok(FileOutcome::Duplicate { previous, moved_to }) => {
                info!(file = %name, previous = %escaped(&previous), moved_to = %moved(&moved_to),
                      "same content was ingested before; not queued again");
            }
            Ok(FileOutcome::Rejected {
                reason,
                moved_to,
                note_error,
            }) => {
                warn!(file = %name, moved_to = %moved(&moved_to), "rejected job file: {reason}");
                if let Some(e) = note_error {
                    error!(file = %name, "could not write the rejection note: {e}");
                }
            }
            Ok(FileOutcome::Gone) => {
                debug!(file = %name, "gone from the inbox before it was read");
            }
            Err(e) => {
                let problem = e.to_string();
                if logged.entries.first(os_name, &problem) {
                    error!(file = %name, "ingest failed; the file stays in the inbox and is retried on every scan (logged once): {problem}");
                } else {
                    debug!(file = %name, "ingest failed again: {problem}");
                }
            }
        }
    }
    (queued, unsettled)
}

/// Writes outbox files for every finished source, whenever jobs finish.
async fn outbox_loop(shared: Shared, folders: Folders, mut stop: watch::Receiver<bool>) {
    let Shared {
        store, finished, ..
    } = shared;
    let mut logged = OutboxLog::default();
    loop {
        if crate::faults::fire("daemon.outbox_panic") {
            panic!("injected fault: daemon.outbox_panic");
        }
        logged = write_ready_outboxes(&store, &folders, logged).await;
        tokio::select! {
            _ = stop.changed() => return,
            _ = finished.notified() => {
                // Batch the writes of many jobs finishing together.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

/// What the outbox writer already logged: a source whose outbox cannot be
/// written is retried on every pass and logged once (per problem).
#[derive(Default)]
struct OutboxLog {
    sources: ingest::LogOnce<i64>,
    batches: ingest::LogOnce<()>,
    listing: ingest::LogOnce<()>,
}

/// Writes the outbox of every finished source, each on its own: one that
/// fails (a name the file system refuses, a full disk) is logged with its
/// source named and retried on the next pass, and blocks no other.
async fn write_ready_outboxes(
    store: &Arc<Store>,
    folders: &Folders,
    logged: OutboxLog,
) -> OutboxLog {
    let outbox = folders.outbox.clone();
    blocking(store, move |s| {
        let mut logged = logged;
        // API batches whose jobs are all final move to completed / expired /
        // cancelled here, on the completion path, not when someone asks.
        match results::close_finished_batches(s) {
            Ok(closed) => {
                logged.batches.forget(&());
                if closed > 0 {
                    info!(batches = closed, "batches finished");
                }
            }
            Err(e) => {
                if logged.batches.first((), &format!("{e:#}")) {
                    error!("closing finished batches failed (retried on every pass, logged once): {e:#}");
                }
            }
        }
        let sources = match s.sources_ready_for_outbox() {
            Ok(sources) => {
                logged.listing.forget(&());
                sources
            }
            Err(e) => {
                if logged.listing.first((), &e.to_string()) {
                    error!("listing the finished sources failed (retried on every pass, logged once): {e}");
                }
                return logged;
            }
        };
        for source in sources {
            let written = results::write_outbox(s, &outbox, &source)
                .map_err(anyhow::Error::from)
                .and_then(|paths| {
                    s.mark_outbox_written(source.id, Utc::now().timestamp_millis())?;
                    Ok(paths)
                });
            match written {
                Ok((out, err)) => {
                    if logged.sources.forget(&source.id) {
                        info!(source = %escaped(&source.name), "outbox written after earlier failures");
                    }
                    info!(source = %escaped(&source.name), output = %escaped_os(out.as_os_str()),
                          errors = %escaped_os(err.as_os_str()), "results written");
                }
                Err(e) => {
                    if logged.sources.first(source.id, &format!("{e:#}")) {
                        error!(source = %escaped(&source.name), stem = %escaped(&source.stem),
                               "writing this file's outbox failed (retried on every pass, logged once; other files are not held up): {e:#}");
                    } else {
                        debug!(source = %escaped(&source.name), "writing this file's outbox failed again: {e:#}");
                    }
                }
            }
        }
        logged
    })
    .await
}
