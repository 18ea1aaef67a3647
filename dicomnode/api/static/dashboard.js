// dicomnode dashboard: polls the JSON API every few seconds and renders what it answers.
// The bearer token is asked for once and kept in sessionStorage (gone when the tab closes).
"use strict";

const POLL_MS = 3000;
const TOKEN_KEY = "dicomnode.token";
const STAGES = ["received", "completed", "queued", "started", "finished", "sent"];

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function setStatus(text) { document.getElementById("status").textContent = text; }

async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = "Bearer " + token();
  const response = await fetch(path, { ...options, headers });
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

// the token's scopes (GET /api/me); retry and cancel need "operate"
let scopes = null;
function mayOperate() { return scopes !== null && scopes.includes("operate"); }

function actionButton(label, job, path) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = label;
  button.dataset.jobId = job.id;
  button.textContent = label;
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const answer = await api("/api/jobs/" + job.id + "/" + path, { method: "POST" });
      setStatus("job " + answer.id + " " + answer.state);
    } catch (error) {
      setStatus(label + " failed: " + error.message);
    }
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
  cell(row, job.id);
  cell(row, job.model);
  cell(row, job.attempts + "/" + job.max_attempts);
  cell(row, (job.error || "").split("\n")[0], "reason");
  cell(row, job.finished_at ? new Date(job.finished_at).toLocaleString() : "");
  const actions = row.insertCell();
  if (mayOperate()) actions.appendChild(actionButton("retry", job, "retry"));
}

function renderJob(row, job) {
  row.dataset.jobId = job.id;
  cell(row, job.id);
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
  } else if (!["done", "skipped"].includes(job.state)) {
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

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    if (scopes === null) {
      scopes = (await api("/api/me")).scopes;
      document.body.dataset.scopes = scopes.join(" ");
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
  refresh();
  setInterval(refresh, POLL_MS);
});
