// nightshift's dashboard: one page over the daemon's own JSON API.
// No framework, no build step, no third-party code: the Content-Security-
// Policy lets this script fetch only from the daemon. Text from the API is
// always set with textContent, never parsed as HTML.
"use strict";

const REFRESH_MS = 3000;
const PALETTE = ["#3558d6", "#e07b39", "#2a9d8f", "#c44569", "#8e6c8a", "#6a994e", "#b08900", "#577590"];
// Price lines are drawn darker, so a class never shares a provider's colour.
const LINE_PALETTE = ["#1d2330", "#7a1f5c", "#0b6e4f", "#8a5a00", "#4a4e69", "#9c2a2a"];
const SVG = "http://www.w3.org/2000/svg";

let csrf = null;
let timer = null;
let renderSeq = 0;

// ---- small helpers ---------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "onclick" || k === "onsubmit" || k === "onchange") el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function s(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

function usd(x) {
  if (x === null || x === undefined) return "—";
  const a = Math.abs(x);
  return "$" + (a >= 100 ? x.toFixed(2) : a >= 1 ? x.toFixed(3) : x.toFixed(6));
}

function num(x) {
  return x === null || x === undefined ? "—" : Number(x).toLocaleString("en-US", { maximumFractionDigits: 1 });
}

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toISOString().replace("T", " ").slice(0, 16) + " UTC";
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options) {
  const opts = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
  if (opts.method && opts.method !== "GET") opts.headers["X-Nightshift-CSRF"] = csrf || "";
  const r = await fetch(path, opts);
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (!r.ok) {
    const msg = (body && body.error && body.error.message) || r.statusText;
    throw new HttpError(r.status, msg);
  }
  return body;
}

function table(headers, rows, numeric) {
  const num = new Set(numeric || []);
  return h("table", {},
    headers.some(x => x) ? h("thead", {}, h("tr", {}, headers.map((x, i) => h("th", { class: num.has(i) ? "num" : null }, x)))) : null,
    h("tbody", {}, rows.map(r => h("tr", {}, r.map((c, i) => h("td", { class: num.has(i) ? "num" : null }, c))))));
}

function bar(fraction) {
  const f = Math.max(0, Math.min(1, fraction || 0));
  const span = h("span");
  span.style.width = (f * 100).toFixed(1) + "%";
  return h("span", { class: "bar" + (fraction > 1 ? " over" : "") }, span);
}

function colorOf(names, palette) {
  const sorted = [...new Set(names)].sort();
  const p = palette || PALETTE;
  return name => p[sorted.indexOf(name) % p.length];
}

function price(x) {
  return "$" + (x >= 10 ? x.toFixed(2) : x >= 0.1 ? x.toFixed(3) : x.toPrecision(2));
}

// ---- views -----------------------------------------------------------------

const STATES = ["queued", "running", "succeeded", "failed", "expired", "cancelled"];

async function overview() {
  const [stats, providers] = await Promise.all([api("/v1/stats"), api("/v1/providers")]);
  const cards = h("div", { class: "cards", id: "jobs-by-state" },
    STATES.map(st => h("div", { class: "card", "data-state": st },
      h("div", { class: "k" }, st), h("div", { class: "n" }, num(stats.jobs[st] || 0)))));
  const classes = Object.entries(stats.queued_by_class || {});
  const budgets = (stats.budgets || []).map(b => [
    b.provider || "all providers", b.period, usd(b.spent_usd), usd(b.cap_usd),
    bar(b.cap_usd > 0 ? b.spent_usd / b.cap_usd : 0), when(b.renews_at)]);
  return [
    h("h2", {}, "Jobs by state"), cards,
    h("h2", {}, "Queued by class"),
    classes.length ? table(["class", "queued"], classes.map(([c, n]) => [c, num(n)]), [1])
      : h("p", { class: "muted" }, "Nothing queued."),
    h("h2", {}, "Spend and savings"),
    h("div", { class: "cards" },
      h("div", { class: "card", id: "spend-today" }, h("div", { class: "k" }, "spent today (UTC)"), h("div", { class: "n" }, usd(stats.spend_today_usd))),
      h("div", { class: "card", id: "spend-month" }, h("div", { class: "k" }, "spent this month"), h("div", { class: "n" }, usd(stats.spend_month_usd))),
      h("div", { class: "card", id: "spend" }, h("div", { class: "k" }, "spent (all time)"), h("div", { class: "n" }, usd(stats.spend_usd))),
      h("div", { class: "card", id: "savings" }, h("div", { class: "k" }, "saved vs list price"),
        h("div", { class: "n" }, usd(stats.savings_usd)),
        h("div", { class: "muted" }, stats.savings_pct === null ? "" : stats.savings_pct + "% of " + usd(stats.succeeded_list_cost_usd))),
      h("div", { class: "card" }, h("div", { class: "k" }, "next price change"), h("div", { class: "n" }, when(providers.next_price_change)))),
    h("h2", {}, "Budgets"),
    budgets.length ? table(["scope", "period", "spent", "cap", "", "renews"], budgets, [2, 3])
      : h("p", { class: "muted" }, "No budgets configured."),
  ];
}

// The plan chart: the next 48 h in the planner's slots, planned jobs per
// provider stacked per slot, and each class's cheapest price for a typical
// job as a line over the same time axis.
async function planView() {
  const [plan, prices] = await Promise.all([api("/v1/plan"), api("/v1/prices?hours=48")]);
  const t0 = Date.parse(plan.planned_at);
  const t1 = t0 + 48 * 3600e3;
  const W = 1100, H = 360, L = 56, R = 110, T = 16, B = 36;
  const x = t => L + (Math.min(Math.max(t, t0), t1) - t0) / (t1 - t0) * (W - L - R);
  const slots = new Map();
  const providersSeen = [];
  for (const a of plan.allocations) {
    const start = Date.parse(a.start);
    if (start >= t1) continue;
    const key = a.start + "|" + a.end;
    if (!slots.has(key)) slots.set(key, { start, end: Date.parse(a.end), iso: a.start, by: new Map() });
    const slot = slots.get(key);
    slot.by.set(a.provider, (slot.by.get(a.provider) || 0) + a.jobs);
    providersSeen.push(a.provider);
  }
  const color = colorOf(providersSeen);
  let maxJobs = 0;
  for (const sl of slots.values()) maxJobs = Math.max(maxJobs, [...sl.by.values()].reduce((p, q) => p + q, 0));
  maxJobs = maxJobs || 1;
  const y = n => H - B - n / maxJobs * (H - T - B);

  const svg = s("svg", { class: "chart", id: "plan-chart", viewBox: `0 0 ${W} ${H}`, role: "img" });
  svg.append(s("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#aab" }));
  for (let hr = 0; hr <= 48; hr += 6) {
    const t = t0 + hr * 3600e3;
    const tx = s("text", { x: x(t), y: H - B + 16, "text-anchor": "middle" });
    tx.textContent = new Date(t).toISOString().slice(11, 16) + (hr % 24 === 0 ? " " + new Date(t).toISOString().slice(5, 10) : "");
    svg.append(tx);
  }
  const ylab = s("text", { x: 6, y: T + 8 });
  ylab.textContent = num(maxJobs) + " jobs";
  svg.append(ylab);
  for (const sl of [...slots.values()].sort((p, q) => p.start - q.start)) {
    let base = 0;
    // Slots near now can be a minute long: drawn at least 6 px wide.
    const x0 = x(sl.start), x1 = Math.max(x(sl.end), x0 + 7);
    for (const [prov, jobs] of [...sl.by.entries()].sort()) {
      const r = s("rect", {
        x: x0, width: Math.max(x1 - x0 - 1, 1), y: y(base + jobs), height: Math.max(y(base) - y(base + jobs), 0.5),
        fill: color(prov), class: "alloc", "data-provider": prov, "data-start": sl.iso, "data-jobs": jobs,
      });
      const title = s("title");
      title.textContent = `${prov}: ${num(jobs)} jobs from ${when(sl.iso)}`;
      r.append(title);
      svg.append(r);
      base += jobs;
    }
  }
  // Prices: USD per 1,000 typical jobs, on the right axis.
  let maxPrice = 0;
  for (const c of prices.classes) for (const st of c.steps) maxPrice = Math.max(maxPrice, st.typical_job_usd * 1000);
  maxPrice = maxPrice || 1;
  const yp = p => H - B - p / maxPrice * (H - T - B);
  const classColor = colorOf(prices.classes.map(c => c.class), LINE_PALETTE);
  prices.classes.forEach(c => {
    let d = "";
    for (const st of c.steps) {
      const p = yp(st.typical_job_usd * 1000);
      d += (d ? "L" : "M") + x(Date.parse(st.from)).toFixed(1) + "," + p.toFixed(1) + "L" + x(Date.parse(st.to)).toFixed(1) + "," + p.toFixed(1);
    }
    const path = s("path", { d, class: "price", stroke: classColor(c.class), "stroke-dasharray": "6 3", "data-class": c.class });
    const title = s("title");
    title.textContent = `${c.class}: cheapest price per 1,000 typical jobs`;
    path.append(title);
    svg.append(path);
  });
  const plab = s("text", { x: W - R + 4, y: T + 8 });
  plab.textContent = price(maxPrice) + " / 1k jobs";
  svg.append(plab);

  const legend = h("p", { class: "legend" },
    [...new Set(providersSeen)].sort().map(p => { const i = h("i"); i.style.background = color(p); return h("span", {}, i, p + " (jobs)"); }),
    prices.classes.map(c => { const i = h("i"); i.style.background = classColor(c.class); return h("span", {}, i, c.class + " (cheapest, dashed)"); }));
  const rows = plan.allocations.map(a => [a.provider + "/" + a.model, when(a.start), num(a.jobs), usd(a.expected_cost_usd)]);
  return [
    h("h2", {}, "Plan: the next 48 hours"),
    h("p", { class: "muted" },
      `${num(plan.queued_jobs)} queued jobs · expected ${usd(plan.expected_cost_usd)} vs ${usd(plan.dispatch_now_cost_usd)} if all were sent now · planned ${when(plan.planned_at)} (${plan.source})`),
    svg, legend,
    h("p", { class: "muted" }, `Price lines: each class's cheapest effective price for a typical job (${prices.typical_job.input_tokens} in / ${prices.typical_job.output_tokens} out), per 1,000 jobs.`),
    h("h2", {}, "Allocations"),
    rows.length ? table(["provider/model", "from", "jobs", "expected cost"], rows, [2, 3]) : h("p", { class: "muted" }, "Nothing planned."),
  ];
}

function params() {
  const q = location.hash.split("?")[1] || "";
  return new URLSearchParams(q);
}

async function jobsView() {
  const p = params();
  const q = new URLSearchParams();
  for (const k of ["state", "source", "custom_id", "after"]) if (p.get(k)) q.set(k, p.get(k));
  q.set("limit", "50");
  const list = await api("/v1/jobs?" + q);
  const form = h("form", { class: "filters", id: "job-filters", onsubmit: ev => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    const next = new URLSearchParams();
    for (const [k, v] of f.entries()) if (v) next.set(k, v);
    location.hash = "#/jobs?" + next;
  } },
  h("label", {}, "state", h("select", { name: "state" }, h("option", { value: "" }, "any"),
    STATES.map(st => h("option", { value: st, selected: p.get("state") === st }, st)))),
  h("label", {}, "source", h("input", { name: "source", value: p.get("source") || "", placeholder: "sub_1, file, batch…", size: 14 })),
  h("label", {}, "custom_id", h("input", { name: "custom_id", value: p.get("custom_id") || "", size: 16 })),
  h("button", { type: "submit" }, "Filter"));
  const rows = list.data.map(j => [
    h("a", { href: "#/jobs/" + j.id, class: "job-link" }, j.id), j.custom_id, j.state, j.model,
    j.provider ? j.provider + "/" + j.provider_model : "—", when(j.deadline), usd(j.cost_usd)]);
  const more = list.has_more ? h("a", { href: "#/jobs?" + (() => { const n = new URLSearchParams(q); n.set("after", list.last_id); n.delete("limit"); return n; })() }, "next page →") : null;
  return [h("h2", {}, "Jobs"), form,
    rows.length ? table(["id", "custom_id", "state", "class", "provider", "deadline", "cost"], rows, [6]) : h("p", { class: "muted" }, "No jobs match."),
    h("p", {}, more)];
}

async function jobView(id) {
  const j = await api("/v1/jobs/" + encodeURIComponent(id));
  const facts = [
    ["custom_id", j.custom_id], ["state", j.state], ["class", j.model], ["submission", j.submission_id || "—"],
    ["submitted", when(j.submitted_at)], ["deadline", when(j.deadline)], ["not before", when(j.not_before)],
    ["attempts", j.attempts], ["provider", j.provider ? j.provider + "/" + j.provider_model : "—"],
    ["dispatched", when(j.dispatched_at)], ["completed", when(j.completed_at)],
    ["cost", usd(j.cost_usd)], ["list cost", usd(j.list_cost_usd)],
  ];
  const out = [h("h2", {}, "Job " + j.id)];
  if (j.explanation) out.push(h("div", { class: "why", id: "explanation", "data-code": j.explanation.code, "data-job": j.id }, j.explanation.text));
  out.push(table(["", ""], facts));
  if (j.state === "queued") {
    const btn = h("button", { type: "button", class: "danger", id: "cancel-job", "data-job": j.id }, "Cancel job");
    btn.addEventListener("click", async () => {
      if (btn.dataset.armed !== "1") { btn.dataset.armed = "1"; btn.textContent = "Click again to cancel " + j.id; return; }
      btn.disabled = true;
      try { await api("/v1/jobs/" + encodeURIComponent(j.id) + "/cancel", { method: "POST" }); show(); }
      catch (e) { btn.after(h("span", { class: "error", id: "cancel-error" }, " " + e.message)); }
    });
    out.push(h("p", {}, btn));
  }
  if (j.plan && j.plan.allocations && j.plan.allocations.length) {
    out.push(h("h2", {}, "Its group's plan"),
      table(["provider/model", "from", "jobs", "cost per job"],
        j.plan.allocations.map(a => [a.provider + "/" + a.model, when(a.start), num(a.jobs), usd(a.expected_cost_per_job_usd)]), [2, 3]));
  }
  if (j.request) out.push(h("h2", {}, "Request"), h("pre", {}, JSON.stringify(j.request, null, 2)));
  if (j.result) out.push(h("h2", {}, j.result.error ? "Error" : "Result"), h("pre", {}, JSON.stringify(j.result, null, 2)));
  return out;
}

async function sourcesView() {
  const [sources, batches] = await Promise.all([api("/v1/sources?limit=50"), api("/v1/batches?limit=50")]);
  const srows = sources.data.map(x => {
    const done = x.jobs - (x.counts.queued || 0) - (x.counts.running || 0);
    return [h("a", { href: "#/jobs?source=" + x.id }, x.id), x.origin, x.name, when(x.created_at), num(x.jobs),
      bar(x.jobs ? done / x.jobs : 1), num(x.counts.failed + x.counts.expired), num(x.invalid_lines)];
  });
  const brows = batches.data.map(b => {
    const c = b.request_counts || { total: 0, completed: 0, failed: 0 };
    const cells = [b.id, b.status, when(b.created_at ? new Date(b.created_at * 1000).toISOString() : null), num(c.total),
      bar(c.total ? (c.completed + c.failed) / c.total : 1), num(c.failed)];
    if (["validating", "in_progress"].includes(b.status)) {
      const btn = h("button", { type: "button", class: "danger cancel-batch", "data-batch": b.id }, "Cancel");
      btn.addEventListener("click", async () => {
        if (btn.dataset.armed !== "1") { btn.dataset.armed = "1"; btn.textContent = "Click again"; return; }
        btn.disabled = true;
        try { await api("/v1/batches/" + encodeURIComponent(b.id) + "/cancel", { method: "POST" }); show(); }
        catch (e) { btn.after(h("span", { class: "error" }, " " + e.message)); }
      });
      cells.push(btn);
    } else cells.push("");
    return cells;
  });
  return [
    h("h2", {}, "Sources (files, submissions, uploads)"),
    srows.length ? table(["id", "origin", "name", "received", "jobs", "done", "failed", "invalid lines"], srows, [4, 6, 7]) : h("p", { class: "muted" }, "None yet."),
    h("h2", {}, "OpenAI-style batches"),
    brows.length ? table(["id", "status", "created", "requests", "done", "failed", ""], brows, [3, 5]) : h("p", { class: "muted" }, "None yet."),
  ];
}

// The dispatcher's live view of a provider: each limit's use now.
function liveLine(live) {
  if (!live) return h("span", { class: "muted" }, "—");
  const l = live.limits || {};
  const parts = [];
  for (const k of ["rpm", "tpm", "rpd"]) {
    const x = l[k];
    if (x) parts.push(h("div", {}, `${k} ${num(x.used)}/${num(x.limit)} `, bar(x.limit ? x.used / x.limit : 0)));
  }
  if (l.concurrency) parts.push(h("div", {}, `in flight ${num(l.concurrency.in_flight)}/${num(l.concurrency.limit)} `,
    bar(l.concurrency.limit ? l.concurrency.in_flight / l.concurrency.limit : 0)));
  else if (l.in_flight !== undefined) parts.push(h("div", {}, `in flight ${num(l.in_flight)}`));
  if (l.full && l.full.length) parts.push(h("div", { class: "error" }, "full: " + l.full.join(", ") + (live.next_start ? "; next start " + when(live.next_start) : "")));
  return h("div", {}, parts);
}

// Circuit and pause, in words.
function liveState(live, health) {
  if (!live) return h("span", { class: "muted" }, health.dispatcher || health.status || "—");
  if (live.paused) return h("span", { class: "error" }, `paused until ${when(live.paused.until)} (${live.paused.reason}${live.paused.detail ? ": " + live.paused.detail : ""})`);
  const flex = live.flex_backoff_until ? h("div", { class: "muted" }, "flex backed off until " + when(live.flex_backoff_until)) : null;
  const c = live.circuit || {};
  if (c.state && c.state !== "closed") return h("div", {}, h("span", { class: "error" }, `circuit ${c.state}${c.until ? " until " + when(c.until) : ""}`), flex);
  return h("div", {}, h("span", { class: "ok" }, "circuit closed" + (c.consecutive_failures ? ` (${c.consecutive_failures} failures in a row)` : "")), flex);
}

async function providersView() {
  const p = await api("/v1/providers");
  const rows = p.data.map(x => {
    const hl = x.health || {};
    const lf = hl.last_failure;
    const live = x.live || null;
    return [
      h("strong", {}, x.name), x.simulated ? "simulated" : (x.region || ""),
      h("div", {}, ["rpm", "tpm", "rpd", "concurrency"].filter(k => x.limits[k] !== null && x.limits[k] !== undefined).map(k => h("div", {}, `${k} ${num(x.limits[k])}`))),
      liveLine(live),
      liveState(live, hl),
      `${num(hl.succeeded)} ok / ${num(hl.failed)} failed (${hl.window_minutes} min)`,
      lf ? h("span", { class: "error" }, `${when(lf.at)} ${lf.code || ""}: ${lf.message || ""}`) : "—",
      h("div", {}, x.models.map(m => h("div", {}, `${m.name} ${m.current_price.input_per_mtok.toFixed(3)}/${m.current_price.output_per_mtok.toFixed(3)}${m.price_window ? " (" + m.price_window + ")" : ""}`))),
    ];
  });
  return [h("h2", {}, "Providers"),
    table(["provider", "", "limits", "use now", "health", "last 15 min", "last failure", "models (USD/1M in/out now)"], rows),
    ...batchChannels(p.data)];
}

function duration(sec) {
  if (sec === null || sec === undefined) return "—";
  if (sec >= 3600) return num(sec / 3600) + " h";
  if (sec >= 60) return num(sec / 60) + " min";
  return num(sec) + " s";
}

// Each provider's Batch API channel: its terms, its models' batch prices,
// and the batches recently sent (newest first, as /v1/providers lists them).
function batchChannels(providers) {
  const withBatch = providers.filter(x => x.batch);
  if (!withBatch.length) return [];
  const terms = withBatch.map(x => {
    const b = x.batch;
    return [
      h("strong", {}, x.name),
      "standard price × " + b.discount,
      b.completion_window,
      duration(b.expected_turnaround_s),
      `${num(b.max_requests)} requests, ${num(b.max_bytes / 1e6)} MB`,
      duration(b.poll_every_s),
      h("div", {}, x.models.filter(m => m.batch).map(m => h("div", {},
        `${m.name} ${m.batch.current_price.input_per_mtok.toFixed(3)}/${m.batch.current_price.output_per_mtok.toFixed(3)}`))),
    ];
  });
  const rows = [];
  for (const x of withBatch) {
    for (const b of x.batch.recent || []) {
      rows.push(h("tr", { class: "provider-batch", "data-provider": x.name, "data-batch": b.id, "data-state": b.state },
        h("td", {}, x.name),
        h("td", { class: "num" }, String(b.id)),
        h("td", {}, b.remote_id || "—"),
        h("td", {}, b.model),
        h("td", {}, b.state + (b.remote_status ? " (" + b.remote_status + ")" : "")),
        h("td", { class: "num" }, num(b.requests)),
        h("td", { class: "num" }, `${num(b.succeeded)} / ${num(b.failed)} / ${num(b.requeued)}` + (b.late ? ` (${num(b.late)} late)` : "")),
        h("td", {}, when(b.created_at)),
        h("td", {}, when(b.fallback_at)),
        h("td", {}, when(b.ended_at)),
        h("td", { class: b.error ? "error" : null }, b.error || "")));
    }
  }
  const heads = ["provider", "id", "provider's id", "model", "state", "requests", "ok / failed / re-queued", "created", "fallback at", "ended", "error"];
  return [
    h("h2", {}, "Batch channels"),
    table(["provider", "price", "window", "expected turnaround", "at most", "polled every", "models (USD/1M in/out, batch)"], terms),
    h("h2", {}, "Recent provider batches"),
    rows.length
      ? h("table", { id: "provider-batches" },
        h("thead", {}, h("tr", {}, heads.map((x, i) => h("th", { class: [1, 5, 6].includes(i) ? "num" : null }, x)))),
        h("tbody", {}, rows))
      : h("p", { class: "muted", id: "provider-batches-none" }, "No batches sent yet."),
  ];
}

// ---- routing and refresh ---------------------------------------------------

function route() {
  const path = location.hash.replace(/^#/, "").split("?")[0] || "/";
  const m = path.match(/^\/jobs\/([A-Za-z0-9_-]+)$/);
  if (m) return ["jobs", () => jobView(m[1])];
  switch (path) {
    case "/plan": return ["plan", planView];
    case "/jobs": return ["jobs", jobsView];
    case "/sources": return ["sources", sourcesView];
    case "/providers": return ["providers", providersView];
    default: return ["overview", overview];
  }
}

async function show(refreshing) {
  const seq = ++renderSeq;
  const [name, view] = route();
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === name);
  const main = document.getElementById("main");
  // A refresh never replaces a page the user is in the middle of using.
  if (refreshing && (main.contains(document.activeElement) && document.activeElement !== main
    || main.querySelector("[data-armed='1']"))) return;
  try {
    const nodes = await view();
    if (seq !== renderSeq) return;
    main.replaceChildren(...nodes);
    main.dataset.view = name;
    main.dataset.rendered = String(seq);
    document.getElementById("status").textContent = "updated " + new Date().toISOString().slice(11, 19) + " UTC";
  } catch (e) {
    if (seq !== renderSeq) return;
    if (e instanceof HttpError && e.status === 401) return loggedOut();
    main.replaceChildren(h("p", { class: "error", id: "view-error" }, e.message));
  }
}

function loggedOut() {
  clearInterval(timer);
  csrf = null;
  document.getElementById("logout").hidden = true;
  document.getElementById("main").replaceChildren(
    h("h2", { id: "logged-out" }, "Not logged in"),
    h("p", {}, "Run ", h("code", {}, "nightshift ui"), " on the daemon's host and open the link it prints. Each link logs in once."));
}

async function start() {
  try {
    csrf = (await api("/ui/session")).csrf_token;
  } catch (e) {
    return loggedOut();
  }
  const logout = document.getElementById("logout");
  logout.hidden = false;
  logout.addEventListener("click", async () => {
    try { await api("/ui/logout", { method: "POST" }); } finally { loggedOut(); }
  });
  window.addEventListener("hashchange", () => show(false));
  await show(false);
  timer = setInterval(() => { if (!document.hidden) show(true); }, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
