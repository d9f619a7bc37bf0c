-- nightshift queue schema, version 8.
--
-- Applied by `Store::open` (src/store/mod.rs embeds this file) to a new
-- database (`PRAGMA user_version` 0). An older database is upgraded by the
-- steps in `MIGRATIONS` there instead; this file always describes the newest
-- schema (a step's CREATE statements appear here verbatim).
--
-- Times are Unix milliseconds (UTC). Money is USD. Tokens are provider tokens.

-- One row per accepted source of jobs: a file from the watched folder (origin
-- 'inbox'), an uploaded batch file, or a direct API submission.
CREATE TABLE IF NOT EXISTS sources (
    id            INTEGER PRIMARY KEY,
    origin        TEXT    NOT NULL CHECK (origin IN ('inbox', 'upload', 'api')),
    name          TEXT    NOT NULL,            -- file name as dropped / uploaded
    stem          TEXT    NOT NULL UNIQUE,     -- outbox file stem, unique across sources
    sha256        TEXT,                        -- content hash; a re-drop of the same content is not re-queued
    ingested_at   INTEGER NOT NULL,
    total_lines   INTEGER NOT NULL,
    valid_jobs    INTEGER NOT NULL,
    invalid_lines INTEGER NOT NULL,
    outbox_written_at INTEGER                  -- set once <stem>.output/.errors.jsonl exist
);
CREATE UNIQUE INDEX IF NOT EXISTS sources_inbox_sha256 ON sources (sha256) WHERE origin = 'inbox';

-- Lines of an accepted source that could not be queued; they go to the errors file.
CREATE TABLE IF NOT EXISTS line_errors (
    source_id INTEGER NOT NULL REFERENCES sources (id),
    line      INTEGER NOT NULL,                -- 1-based line number in the source
    custom_id TEXT,                            -- when it could be read
    field     TEXT,                            -- JSON path of the offending field, e.g. body.model
    message   TEXT    NOT NULL,
    PRIMARY KEY (source_id, line)
) WITHOUT ROWID;

-- Distinct route keys (what decides where a job may run: endpoint, model,
-- providers, regions), so jobs and their index carry a small integer.
CREATE TABLE IF NOT EXISTS routes (
    id  INTEGER PRIMARY KEY,
    key TEXT    NOT NULL UNIQUE                -- canonical JSON, see job::RouteKey
);

-- One row per job. State machine:
--   queued -> running -> succeeded | failed
--   queued -> expired | cancelled | failed
--   running -> queued (lease expired or released at shutdown)
CREATE TABLE IF NOT EXISTS jobs (
    id            INTEGER PRIMARY KEY,
    source_id     INTEGER REFERENCES sources (id),
    line          INTEGER,                     -- line number within the source
    custom_id     TEXT    NOT NULL,
    endpoint      TEXT    NOT NULL,            -- '/v1/chat/completions' | '/v1/embeddings'
    model         TEXT    NOT NULL,            -- as requested: class, model or provider/model
    body          TEXT    NOT NULL,            -- the request body, verbatim JSON
    options       TEXT,                        -- the 'nightshift' object, verbatim JSON
    route_id      INTEGER NOT NULL REFERENCES routes (id),
    priority      INTEGER NOT NULL DEFAULT 0,
    est_input_tokens  INTEGER NOT NULL,
    est_output_tokens INTEGER NOT NULL,
    submitted_at  INTEGER NOT NULL,
    deadline      INTEGER NOT NULL,
    state         TEXT    NOT NULL DEFAULT 'queued'
                  CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'expired', 'cancelled')),
    not_before    INTEGER NOT NULL DEFAULT 0,  -- earliest dispatch time chosen by the plan
    attempts      INTEGER NOT NULL DEFAULT 0,
    lease_owner   TEXT,                        -- instance id of the daemon running it
    lease_until   INTEGER,
    provider      TEXT,                        -- where it ran (last attempt)
    provider_model TEXT,
    dispatched_at INTEGER,
    completed_at  INTEGER,
    status_code   INTEGER,                     -- provider HTTP status, when there was one
    request_id    TEXT,
    response      TEXT,                        -- provider response body, verbatim
    error_code    TEXT,                        -- failures without a usable HTTP answer
    error_message TEXT,
    input_tokens  INTEGER,
    output_tokens INTEGER,
    cost_usd      REAL,
    list_cost_usd REAL,
    -- Answers that arrived after the job's lease was recovered (at-least-once
    -- duplicates): not the result, but paid for.
    late_answers  INTEGER NOT NULL DEFAULT 0,
    late_cost_usd REAL    NOT NULL DEFAULT 0,
    UNIQUE (source_id, custom_id)
);
CREATE INDEX IF NOT EXISTS jobs_source_state ON jobs (source_id, state);
-- Version 7: the channel of the request that answered ('sync', 'flex';
-- 'batch' reserved), NULL before dispatch. Added as the migration adds it,
-- so that a new and an upgraded database have the same schema text.
ALTER TABLE jobs ADD COLUMN provider_channel TEXT;
-- Version 2. What was spent since a time (budgets, each pass) reads only the
-- jobs finished since then, and no table rows: the index covers the sum.
CREATE INDEX IF NOT EXISTS jobs_completed ON jobs (completed_at, provider, cost_usd, late_cost_usd) WHERE completed_at IS NOT NULL;
-- Version 3. The queued jobs, by route and deadline, in dispatch order. One
-- index serves the planner's summary (it covers it: no table reads), a
-- dispatch pass (a group's most urgent jobs, read with LIMIT, not the whole
-- group sorted), expiry and the earliest deadline (a range per route), so
-- that per-pass work does not grow with the queue. It replaces version 1's
-- jobs_route and version 2's jobs_queued_deadline: every index is written by
-- every ingested job, and one of them costs less than three.
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (route_id, deadline, priority DESC, id, est_input_tokens, est_output_tokens, state) WHERE state = 'queued';
-- Version 5. `GET /v1/jobs?custom_id=` reads the jobs of one custom_id in id
-- order from here (a custom_id is unique only within its source, so the
-- UNIQUE index, source first, cannot answer it). `?source=file` (or
-- `submission`, `batch`) finds the sources of that origin in sources_origin
-- and reads their jobs from jobs_source_state.
CREATE INDEX IF NOT EXISTS jobs_custom_id ON jobs (custom_id);
CREATE INDEX IF NOT EXISTS sources_origin ON sources (origin);
-- Version 6. Queue statistics (`/v1/stats`, the dashboard's overview) and
-- lease recovery (every 30 s) read only these indexes, never the table,
-- whose rows hold request and response bodies: running jobs (few), final
-- jobs by state and provider with the sums the statistics add up, and the
-- jobs with late answers (fewer still). Queued jobs are counted along
-- jobs_due.
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (lease_until, lease_owner, provider) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS jobs_final ON jobs (state, provider, cost_usd, list_cost_usd, input_tokens, output_tokens) WHERE state IN ('succeeded', 'failed', 'expired', 'cancelled');
CREATE INDEX IF NOT EXISTS jobs_late ON jobs (late_answers, late_cost_usd) WHERE late_answers > 0;

-- Files of the OpenAI-compatible API (`/v1/files`). Uploaded batch input
-- files keep their content here; a finished batch's output and error files
-- have none: their content is produced from the jobs table when read.
CREATE TABLE IF NOT EXISTS files (
    id         INTEGER PRIMARY KEY,
    purpose    TEXT    NOT NULL,               -- 'batch' (uploaded input) | 'batch_output'
    filename   TEXT    NOT NULL,
    bytes      INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    content    BLOB,                           -- uploaded files only
    batch_id   INTEGER,                        -- output and error files: their batch
    kind       TEXT    NOT NULL DEFAULT 'input' CHECK (kind IN ('input', 'output', 'errors'))
);

-- Batches of the OpenAI-compatible API (`/v1/batches`). A batch's jobs are
-- one `sources` row (origin 'upload', stem 'batch_<id>'). Its request counts
-- are read from the jobs; its status moves on when its jobs are final.
CREATE TABLE IF NOT EXISTS batches (
    id                INTEGER PRIMARY KEY,
    input_file_id     INTEGER NOT NULL REFERENCES files (id),
    source_id         INTEGER UNIQUE REFERENCES sources (id),   -- set once its jobs are queued
    endpoint          TEXT    NOT NULL,
    completion_window TEXT    NOT NULL,        -- as given: '24h', '90m', ...
    metadata          TEXT,                    -- JSON object, verbatim
    status            TEXT    NOT NULL DEFAULT 'validating'
                      CHECK (status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed',
                                        'expired', 'cancelling', 'cancelled')),
    errors            TEXT,                    -- JSON array of OpenAI batch errors (invalid lines)
    created_at        INTEGER NOT NULL,
    in_progress_at    INTEGER,
    expires_at        INTEGER NOT NULL,        -- created_at + completion_window: the jobs' deadline
    finalizing_at     INTEGER,
    completed_at      INTEGER,
    failed_at         INTEGER,
    expired_at        INTEGER,
    cancelling_at     INTEGER,
    cancelled_at      INTEGER,
    output_file_id    INTEGER REFERENCES files (id),
    error_file_id     INTEGER REFERENCES files (id)
);
CREATE INDEX IF NOT EXISTS batches_open ON batches (status)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');

-- Version 4. Every request sent (each attempt is a row), kept for 24 hours
-- (the longest rate-limit window, rpd): a daemon seeds its rate limits from
-- it at start, so a restart does not begin with full allowances. Written in
-- the transaction that starts the attempts, which also deletes the rows
-- older than 24 hours. `model` is the provider's model name; `tokens` what
-- the limits charged (the estimate). `jobs.dispatched_at` is not enough: it
-- keeps only a job's last attempt.
CREATE TABLE IF NOT EXISTS sends (
    at_ms    INTEGER NOT NULL,
    provider TEXT    NOT NULL,
    model    TEXT    NOT NULL,
    tokens   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sends_at ON sends (at_ms, provider, model, tokens);

-- Version 8. Batches nightshift sends to providers' Batch APIs (the batch
-- channel; see src/store/batches.rs). A batch and its jobs are recorded
-- before anything is uploaded; `tag` names it at the provider (OpenAI batch
-- metadata), so a daemon killed after "create" finds it again instead of
-- creating it twice. Its jobs are 'running' with provider_batch_id set and
-- no lease; lease recovery skips them (jobs_running leads with the batch).
-- jobs_running is re-created with provider_batch_id first.
CREATE TABLE IF NOT EXISTS provider_batches (
    id            INTEGER PRIMARY KEY,
    provider      TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    endpoint      TEXT    NOT NULL,
    state         TEXT    NOT NULL DEFAULT 'prepared'
                  CHECK (state IN ('prepared', 'creating', 'submitted', 'cancelling', 'done')),
    requests      INTEGER NOT NULL,
    tag           TEXT    NOT NULL,
    file_id       TEXT,
    remote_id     TEXT,
    remote_status TEXT,
    created_at    INTEGER NOT NULL,
    submitted_at  INTEGER,
    fallback_at   INTEGER NOT NULL,
    ended_at      INTEGER,
    succeeded     INTEGER NOT NULL DEFAULT 0,
    failed        INTEGER NOT NULL DEFAULT 0,
    requeued      INTEGER NOT NULL DEFAULT 0,
    late          INTEGER NOT NULL DEFAULT 0,
    error         TEXT
);
CREATE INDEX IF NOT EXISTS provider_batches_open ON provider_batches (state) WHERE state <> 'done';
ALTER TABLE jobs ADD COLUMN provider_batch_id INTEGER;
DROP INDEX IF EXISTS jobs_running;
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (provider_batch_id, lease_until, lease_owner, provider) WHERE state = 'running';
-- Version 9. Each job's size bin (bins of expected output tokens growing by
-- 4x, 0..7: `domain::estimate::size_bin`), written at ingest.
-- The planner groups jobs by route, size bin and deadline, so long and short
-- jobs are not averaged; jobs_due leads with (route_id, size_bin) so that
-- the summary walks it in GROUP BY order and a pass reads a group's most
-- urgent jobs along it. Expiry ranges over deadline per (route, bin).
ALTER TABLE jobs ADD COLUMN size_bin INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET size_bin = CASE
    WHEN est_output_tokens < 1 THEN 0 WHEN est_output_tokens < 4 THEN 1
    WHEN est_output_tokens < 16 THEN 2 WHEN est_output_tokens < 64 THEN 3
    WHEN est_output_tokens < 256 THEN 4 WHEN est_output_tokens < 1024 THEN 5
    WHEN est_output_tokens < 4096 THEN 6 ELSE 7 END
  WHERE state IN ('queued', 'running');
DROP INDEX IF EXISTS jobs_due;
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (route_id, size_bin, deadline, priority DESC, id, est_input_tokens, est_output_tokens, state) WHERE state = 'queued';
