// The dashboard: the jobs list at "/", a job's page at "/jobs/{id}".
// Auth: the API key stays in this browser (localStorage) and goes in an Authorization header
// on every fetch. Live events use fetch() + a ReadableStream rather than EventSource, which
// cannot send that header; a dropped stream reconnects with Last-Event-ID (no replays).
"use strict";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const $ = (id) => document.getElementById(id);
let apiKey = localStorage.getItem("lorafleet-api-key") || "";

function headers(extra = {}) {
  return apiKey ? { Authorization: `Bearer ${apiKey}`, ...extra } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (!response.ok) {
    let message = `${response.status}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    showError(message);
    throw new Error(message);
  }
  return response;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text ?? "";
  if (className) td.className = className;
  return td;
}

// ---- the jobs list ----
async function showJobs() {
  $("jobs-view").hidden = false;
  const models = (await (await api("/v1/models")).json()).data;
  $("model").replaceChildren(...models.filter((m) => !m.id.startsWith("ft:")).map((m) => new Option(m.id, m.id)));
  $("create-form").addEventListener("submit", createJob);
  await refreshJobs();
  setInterval(refreshJobs, 2000);
}

async function refreshJobs() {
  const jobs = (await (await api("/v1/fine_tuning/jobs?limit=50")).json()).data;
  const body = $("jobs").tBodies[0];
  const rows = await Promise.all(jobs.map(async (job) => [job, await progressOf(job)]));
  body.replaceChildren();
  for (const [job, progress] of rows) {
    const row = body.insertRow();
    row.dataset.jobId = job.id;
    const link = document.createElement("a");
    link.href = `/jobs/${job.id}`;
    link.textContent = job.id;
    row.insertCell().appendChild(link);
    cell(row, job.status, `status status-${job.status}`);
    cell(row, job.model);
    cell(row, job.fine_tuned_model);
    cell(row, progress);
  }
}

async function progressOf(job) {
  if (job.status !== "running") return TERMINAL.has(job.status) ? "" : "–";
  const events = (await (await api(`/v1/fine_tuning/jobs/${job.id}/events?limit=5`)).json()).data;
  const last = events.find((e) => e.type === "metrics");
  return last ? `${last.data.step}/${last.data.total_steps} steps` : "0/? steps";
}

async function createJob(event) {
  event.preventDefault();
  showError("");
  $("create").disabled = true;
  try {
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", $("training-file").files[0]);
    const file = await (await api("/v1/files", { method: "POST", body: form })).json();
    const hyperparameters = { n_epochs: Number($("epochs").value), batch_size: Number($("batch-size").value) };
    const body = { model: $("model").value, training_file: file.id, method: { type: "supervised", supervised: { hyperparameters } } };
    if ($("lr").value) body.training = { learning_rate: Number($("lr").value) };
    await api("/v1/fine_tuning/jobs", { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
    $("create-form").reset();
    await refreshJobs();
  } finally {
    $("create").disabled = false;
  }
}

// ---- a job's page ----
const series = { train: [], valid: [], lr: [], speed: [] };

async function showJob(jobId) {
  $("job-view").hidden = false;
  $("job-title").textContent = jobId;
  $("cancel").addEventListener("click", async () => { await api(`/v1/fine_tuning/jobs/${jobId}/cancel`, { method: "POST" }); await refreshJob(jobId); });
  $("download").addEventListener("click", () => download(jobId));
  await refreshJob(jobId);
  redraw();
  await followEvents(jobId);
  await refreshJob(jobId);
}

async function refreshJob(jobId) {
  const job = await (await api(`/v1/fine_tuning/jobs/${jobId}`)).json();
  const facts = { Status: job.status, Base: job.model, "Fine-tuned model": job.fine_tuned_model || "–", "Trained tokens": job.trained_tokens ?? "–" };
  if (job.error) facts.Error = `${job.error.code}: ${job.error.message}`;
  $("job-facts").replaceChildren(...Object.entries(facts).flatMap(([k, v]) => {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k; dd.textContent = v;
    if (k === "Status") { dd.id = "job-status"; dd.className = `status-${v}`; }
    return [dt, dd];
  }));
  $("cancel").disabled = TERMINAL.has(job.status);
  $("download").disabled = job.status !== "succeeded";
  const checkpoints = (await (await api(`/v1/fine_tuning/jobs/${jobId}/checkpoints`)).json()).data;
  const body = $("checkpoints").tBodies[0];
  body.replaceChildren();
  for (const c of checkpoints) {
    const row = body.insertRow();
    cell(row, c.step_number); cell(row, c.fine_tuned_model_checkpoint);
    cell(row, Object.entries(c.metrics || {}).filter(([, v]) => v != null).map(([k, v]) => `${k}=${typeof v === "number" ? formatNumber(v) : v}`).join(" "));
  }
  return job;
}

function onEvent(jobId, event) {
  const item = document.createElement("li");
  item.textContent = `${new Date(event.created_at * 1000).toLocaleTimeString()} ${event.message}`;
  $("events").prepend(item);
  const data = event.data || {};
  if (event.type === "metrics") {
    series.train.push([data.step, data.train_loss]);
    if (data.learning_rate != null) series.lr.push([data.step, data.learning_rate]);
    if (data.tokens_per_second != null) series.speed.push([data.step, data.tokens_per_second]);
  }
  if (data.valid_loss != null) series.valid.push([data.step, data.valid_loss]);
  redraw();
  if (data.status) refreshJob(jobId);
}

function redraw() {
  drawChart($("loss-chart"), [
    { name: "train", color: "#1d4ed8", points: series.train },
    { name: "valid", color: "#d97706", points: series.valid },
  ]);
  drawChart($("lr-chart"), [{ name: "lr", color: "#7c3aed", points: series.lr }]);
  drawChart($("speed-chart"), [{ name: "speed", color: "#059669", points: series.speed }]);
}

// Server-sent events over fetch (with the Authorization header), resumed by Last-Event-ID.
async function followEvents(jobId) {
  let lastId = null;
  for (;;) {
    try {
      const response = await fetch(`/v1/fine_tuning/jobs/${jobId}/events?stream=true`, {
        headers: headers(lastId ? { "Last-Event-ID": lastId } : {}),
      });
      if (!response.ok) throw new Error(`${response.status}`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let id = null, data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("id:")) id = line.slice(3).trim();
            else if (line.startsWith("data:")) data += line.slice(5).trim();
          }
          if (data === "[DONE]") return;
          if (id) lastId = id;
          if (data) onEvent(jobId, JSON.parse(data));
        }
      }
    } catch (error) {
      showError(`event stream interrupted (${error.message}); reconnecting…`);
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// download=stream: the archive through the API. The default on S3, a redirect to a presigned
// URL, fails here: fetch() follows it across origins with the Authorization header (CORS).
async function download(jobId) {
  const response = await api(`/v1/fine_tuning/jobs/${jobId}/adapter?download=stream`);
  const blob = await response.blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${jobId}-adapter.tar.gz`;
  link.click();
}

// ---- start ----
$("api-key").value = apiKey;
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = $("api-key").value.trim();
  localStorage.setItem("lorafleet-api-key", apiKey);
  location.reload();
});
const match = location.pathname.match(/^\/jobs\/([\w-]+)$/);
(match ? showJob(match[1]) : showJobs()).catch((error) => showError(error.message));
