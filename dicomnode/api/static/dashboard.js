// dicomnode dashboard: polls the JSON API every few seconds and renders what it answers.
// The bearer token is asked for once and kept in sessionStorage (gone when the tab closes).
"use strict";

const POLL_MS = 3000;
const TOKEN_KEY = "dicomnode.token";
const STAGES = ["received", "completed", "queued", "started", "finished", "sent"];

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function setStatus(text) { document.getElementById("status").textContent = text; }

function authHeaders(accept) {
  const headers = { Accept: accept };
  if (token()) headers.Authorization = "Bearer " + token();
  return headers;
}

async function api(path, options = {}) {
  const headers = authHeaders("application/json");
  const init = { ...options, headers };
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.json);
    delete init.json;
  }
  const response = await fetch(path, init);
  if (response.status === 401) throw new Error("token required");
  if (response.status === 403) throw new Error("not allowed: " + (await response.json()).error);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) td.className = className;
  return td;
}

function seconds(value) {
  if (value === null || value === undefined) return "-";
  return value < 120 ? value.toFixed(1) + " s" : (value / 60).toFixed(1) + " min";
}

function timeline(job) {
  const box = document.createElement("div");
  box.className = "timeline";
  const start = job.stages.received ? Date.parse(job.stages.received) : null;
  for (const name of STAGES) {
    const at = job.stages[name];
    const chip = document.createElement("span");
    chip.className = "stage" + (at ? "" : " pending");
    chip.dataset.stage = name;
    chip.title = at || "not yet";
    const offset = at && start !== null ? " +" + seconds((Date.parse(at) - start) / 1000) : "";
    chip.textContent = name + offset;
    box.appendChild(chip);
  }
  return box;
}

// the token's scopes (GET /api/me); retry, cancel and resend need "operate", approve and
// reject "review", the key images "phi"
let scopes = null;
function may(scope) { return scopes !== null && scopes.includes(scope); }
function mayOperate() { return may("operate"); }

async function act(label, jobId, path, json) {
  try {
    const answer = await api("/api/jobs/" + jobId + "/" + path, { method: "POST", json });
    setStatus(label + ": job " + answer.id + " " + (answer.state || "sending again"));
  } catch (error) {
    setStatus(label + " failed: " + error.message);
  }
}

function actionButton(label, job, path) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = label;
  button.dataset.jobId = job.id;
  button.textContent = label;
  button.addEventListener("click", async () => {
    button.disabled = true;
    await act(label, job.id, path);
    refresh();
  });
  return button;
}

function fill(tableId, rows, render) {
  const body = document.querySelector("#" + tableId + " tbody");
  body.replaceChildren();
  for (const item of rows) render(body.insertRow(), item);
}

function renderFailure(row, job) {
  row.dataset.jobId = job.id;
  row.insertCell().appendChild(jobLink(job.id));
  cell(row, job.model);
  cell(row, job.attempts + "/" + job.max_attempts);
  cell(row, (job.error || "").split("\n")[0], "reason");
  cell(row, job.finished_at ? new Date(job.finished_at).toLocaleString() : "");
  const actions = row.insertCell();
  if (mayOperate()) actions.appendChild(actionButton("retry", job, "retry"));
}

function jobLink(id) {
  const link = document.createElement("a");
  link.href = "#/jobs/" + id;
  link.className = "job-link";
  link.textContent = id;
  return link;
}

function renderJob(row, job) {
  row.dataset.jobId = job.id;
  row.insertCell().appendChild(jobLink(job.id));
  const state = document.createElement("span");
  state.className = "badge " + job.state;
  state.textContent = job.state;
  row.insertCell().appendChild(state);
  cell(row, job.model);
  cell(row, job.route);
  row.insertCell().appendChild(timeline(job));
  const actions = row.insertCell();
  if (!mayOperate()) return;
  if (job.state === "failed" || job.state === "cancelled") {
    actions.appendChild(actionButton("retry", job, "retry"));
  } else if (!["done", "skipped", "rejected", "review"].includes(job.state)) {
    actions.appendChild(actionButton("cancel", job, "cancel"));
  }
}

function renderRate(row, rate) {
  cell(row, rate.model);
  cell(row, rate.jobs_per_hour.toFixed(2));
  cell(row, rate.finished);
  cell(row, rate.failed);
  cell(row, seconds(rate.mean_run_s));
  cell(row, seconds(rate.mean_total_s));
}

function number(value, digits) {
  return value === null || value === undefined ? "-" : value.toFixed(digits);
}

function renderShadow(row, c) {
  cell(row, c.live);
  cell(row, c.shadow);
  cell(row, c.inputs);
  cell(row, c.matched);
  cell(row, c.only_live);
  cell(row, c.only_shadow);
  cell(row, number(c.mean_dice, 3));
  cell(row, c.grade_agreement === null ? "-" : (100 * c.grade_agreement).toFixed(1) + "%");
  cell(row, number(c.kappa, 3));
  cell(row, number(c.weighted_kappa, 3));
}

// the shadow comparisons read every job's findings: every tenth poll (30 s), not every one
const SHADOW_EVERY = 10;
let polls = 0;

// -- one job's page: /#/jobs/ID -------------------------------------------------------------

function shownJob() {
  const match = /^#\/jobs\/(\d+)$/.exec(location.hash);
  return match ? Number(match[1]) : null;
}

const SENDABLE = ["sending", "done", "failed"];
const ENDED = ["done", "failed", "cancelled", "skipped", "rejected", "review"];
let previewsOf = null;  // the job (and whether it had results) whose key images are shown
let actionsFor = "";  // job id and state the action buttons were made for

function when(value) { return value ? new Date(value).toLocaleString() : ""; }

function measure(value, unit, digits) {
  return typeof value === "number" ? value.toFixed(digits) + unit : "";
}

function renderFinding(row, finding) {
  cell(row, finding.index);
  cell(row, finding.label || (finding.finding_type || {}).meaning || "");
  cell(row, measure(finding.probability, "", 2));
  cell(row, measure(finding.diameter_mm, " mm", 1));
  cell(row, measure(finding.volume_mm3, " mm\u00b3", 0));
  const other = Object.entries(finding.attributes || {})
    .filter(([, v]) => ["number", "string", "boolean"].includes(typeof v))
    .map(([k, v]) => k + " " + (typeof v === "number" ? Number(v.toFixed(3)) : v));
  cell(row, other.join(", "));
}

function renderSend(row, send) {
  row.dataset.destination = send.destination;
  cell(row, send.destination);
  cell(row, send.kind);
  cell(row, send.state);
  cell(row, send.attempts);
  cell(row, when(send.sent_at));
  cell(row, send.last_error || "", "reason");
}

function renderEvent(row, event) {
  row.dataset.action = event.action;
  cell(row, when(event.at));
  cell(row, event.actor);
  cell(row, event.action);
  cell(row, event.detail || "");
}

function renderActions(job) {
  const box = document.getElementById("job-actions");
  box.replaceChildren();
  if (mayOperate()) {
    if (job.state === "failed" || job.state === "cancelled") {
      box.appendChild(actionButton("retry", job, "retry"));
    } else if (!ENDED.includes(job.state)) {
      box.appendChild(actionButton("cancel", job, "cancel"));
    }
    if (SENDABLE.includes(job.state) && job.mode === "live" && job.destinations.length) {
      box.appendChild(actionButton("resend", job, "resend"));
    }
  }
  const review = document.getElementById("job-review");
  review.hidden = !(job.state === "review" && may("review"));
  document.getElementById("approve").dataset.jobId = job.id;
  document.getElementById("reject").dataset.jobId = job.id;
}

async function showPreviews(jobId) {
  const box = document.getElementById("previews");
  const note = document.getElementById("previews-note");
  box.replaceChildren();
  if (!may("phi")) {
    note.textContent = "The key images need a token with the phi scope (they are patient images).";
    return;
  }
  const listed = (await api("/api/jobs/" + jobId + "/previews")).previews;
  note.textContent = listed.length ? "" : "No key images.";
  for (const preview of listed) {
    const response = await fetch(preview.url, { headers: authHeaders("image/png") });
    if (!response.ok) throw new Error("key image " + preview.n + ": " + response.statusText);
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.alt = "key image " + preview.n;
    image.dataset.n = preview.n;
    image.width = preview.columns;
    image.height = preview.rows;
    image.src = URL.createObjectURL(await response.blob());
    const caption = document.createElement("figcaption");
    caption.textContent = "key image " + preview.n + " (" + preview.columns + "\u00d7" +
      preview.rows + ")";
    figure.append(image, caption);
    box.appendChild(figure);
  }
}

async function refreshJob(jobId) {
  const job = await api("/api/jobs/" + jobId);
  document.getElementById("job-id").textContent = job.id;
  const badge = document.getElementById("job-state");
  badge.textContent = job.state;
  badge.className = "badge " + job.state;
  document.getElementById("job-what").textContent =
    job.model + " via " + job.route + (job.mode === "shadow" ? " (shadow)" : "") +
    ", " + job.priority_name + ", attempt " + job.attempts + "/" + job.max_attempts;
  document.getElementById("job-error").textContent = job.error || "";
  const start = job.stages.received ? Date.parse(job.stages.received) : null;
  fill("job-stages", STAGES.filter((name) => job.stages[name]), (row, name) => {
    row.dataset.stage = name;
    cell(row, name);
    cell(row, when(job.stages[name]));
    cell(row, start === null ? "" : "+" + seconds((Date.parse(job.stages[name]) - start) / 1000));
  });
  const inputs = document.getElementById("job-inputs");
  inputs.replaceChildren(...job.inputs.map((uid) => {
    const item = document.createElement("li");
    item.textContent = uid;
    return item;
  }));
  if (!job.inputs.length) inputs.textContent = may("phi") ? "none" : "(phi scope)";
  const findings = ((job.result || {}).findings || []).map((f, index) => ({ ...f, index }));
  fill("job-findings", findings, renderFinding);
  fill("job-sends", job.sends, renderSend);
  fill("job-log", job.audit, renderEvent);
  if (actionsFor !== job.id + "/" + job.state) {
    actionsFor = job.id + "/" + job.state;
    renderActions(job);
  }
  const shown = job.id + "/" + Boolean(job.result);  // fetched again once the results exist
  if (previewsOf !== shown) {
    previewsOf = shown;
    await showPreviews(job.id);
  }
}

function showPage() {
  const jobId = shownJob();
  document.getElementById("job-page").hidden = jobId === null;
  document.getElementById("overview").hidden = jobId !== null;
  if (jobId === null) { previewsOf = null; actionsFor = ""; }
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    if (scopes === null) {
      scopes = (await api("/api/me")).scopes;
      document.body.dataset.scopes = scopes.join(" ");
      actionsFor = "";
    }
    const jobId = shownJob();
    if (jobId !== null) {
      await refreshJob(jobId);
      document.body.dataset.loaded = String(Date.now());
      setStatus("updated " + new Date().toLocaleTimeString());
      return;
    }
    const [summary, recent, failed] = await Promise.all([
      api("/api/summary"),
      api("/api/jobs?limit=20"),
      api("/api/jobs?status=failed&limit=10"),
    ]);
    for (const [state, n] of Object.entries(summary.states)) {
      const element = document.getElementById("count-" + state);
      if (element) element.textContent = n;
    }
    fill("failures", failed.jobs, renderFailure);
    fill("recent", recent.jobs, renderJob);
    fill("throughput", summary.throughput, renderRate);
    if (polls++ % SHADOW_EVERY === 0) {
      fill("shadows", (await api("/api/models/shadows?since=7d")).comparisons, renderShadow);
    }
    document.body.dataset.loaded = String(Date.now());
    setStatus("updated " + new Date().toLocaleTimeString());
  } catch (error) {
    if (error.message === "token required") scopes = null;
    setStatus(error.message);
  } finally {
    busy = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token");
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    scopes = null;
    refresh();
  });
  document.getElementById("approve").addEventListener("click", async (event) => {
    event.target.disabled = true;
    await act("approve", event.target.dataset.jobId, "approve", {});
    event.target.disabled = false;
    refresh();
  });
  document.getElementById("reject").addEventListener("click", async (event) => {
    const input = document.getElementById("reject-reason");
    if (!input.value.trim()) {
      setStatus("reject: give a reason");
      input.focus();
      return;
    }
    event.target.disabled = true;
    await act("reject", event.target.dataset.jobId, "reject", { reason: input.value.trim() });
    event.target.disabled = false;
    input.value = "";
    refresh();
  });
  window.addEventListener("hashchange", () => { showPage(); refresh(); });
  showPage();
  refresh();
  setInterval(refresh, POLL_MS);
});
