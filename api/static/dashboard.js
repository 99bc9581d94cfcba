// The dashboard: the jobs list at "/", a job's page at "/jobs/{id}", and the loss curves of
// several jobs overlaid at "/compare?jobs=id,id,…" (picked on the jobs list).
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
// Jobs picked for the compare view; kept across the list's refreshes (rows are rebuilt).
const picked = new Set();

async function showJobs() {
  $("jobs-view").hidden = false;
  $("compare").addEventListener("click", () => {
    location.href = `/compare?jobs=${[...picked].map(encodeURIComponent).join(",")}`;
  });
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
    const pick = document.createElement("input");
    pick.type = "checkbox";
    pick.className = "pick";
    pick.value = job.id;
    pick.checked = picked.has(job.id);
    pick.setAttribute("aria-label", `compare ${job.id}`);
    pick.addEventListener("change", () => {
      if (pick.checked) picked.add(job.id); else picked.delete(job.id);
      $("compare").disabled = picked.size === 0;
    });
    row.insertCell().appendChild(pick);
    const link = document.createElement("a");
    link.href = `/jobs/${job.id}`;
    link.textContent = job.id;
    row.insertCell().appendChild(link);
    cell(row, job.suffix);
    cell(row, job.status, `status status-${job.status}`);
    cell(row, job.model);
    cell(row, learningRateOf(job));
    cell(row, job.fine_tuned_model);
    cell(row, progress);
  }
}

function learningRateOf(job) {
  const lr = job.training?.learning_rate;
  return lr == null ? "" : formatNumber(lr);
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
// Metric names are OpenAI's (metrics events and checkpoints' `metrics`).
const series = { train: [], valid: [], fullValid: [], trainAccuracy: [], validAccuracy: [], lr: [], speed: [] };

async function showJob(jobId) {
  $("job-view").hidden = false;
  $("job-title").textContent = jobId;
  for (const action of ["cancel", "pause", "resume"]) {
    $(action).addEventListener("click", async () => {
      $(action).disabled = true;
      try { await api(`/v1/fine_tuning/jobs/${jobId}/${action}`, { method: "POST" }); } finally { await refreshJob(jobId); }
    });
  }
  window.addEventListener("resize", redraw);
  $("download").addEventListener("click", () => download(jobId));
  $("try-form").addEventListener("submit", tryModel);
  $("try-model").addEventListener("change", (e) => { e.target.dataset.picked = e.target.value; });
  // The facts (estimated_finish moves as steps are measured) refresh while the job is on.
  const poll = setInterval(async () => {
    if (TERMINAL.has((await refreshJob(jobId)).status)) clearInterval(poll);
  }, 5000);
  await refreshJob(jobId);
  redraw();
  await followEvents(jobId);
  await refreshJob(jobId);
}

async function refreshJob(jobId) {
  const job = await (await api(`/v1/fine_tuning/jobs/${jobId}`)).json();
  const facts = { Status: job.status, Base: job.model, "Fine-tuned model": job.fine_tuned_model || "–", "Trained tokens": job.trained_tokens ?? "–" };
  if (job.estimated_finish) facts["Estimated finish"] = estimatedFinish(job.estimated_finish);
  if (job.error) facts.Error = `${job.error.code}: ${job.error.message}`;
  $("job-facts").replaceChildren(...Object.entries(facts).flatMap(([k, v]) => {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k; dd.textContent = v;
    if (k === "Status") { dd.id = "job-status"; dd.className = `status-${v}`; }
    if (k === "Estimated finish") dd.id = "job-estimated-finish";
    return [dt, dd];
  }));
  $("cancel").disabled = TERMINAL.has(job.status);
  // OpenAI's pause/resume: only a running job pauses, only a paused one resumes.
  $("pause").hidden = job.status !== "running";
  $("resume").hidden = job.status !== "paused";
  $("pause").disabled = $("resume").disabled = false;
  $("download").disabled = job.status !== "succeeded";
  const checkpoints = (await (await api(`/v1/fine_tuning/jobs/${jobId}/checkpoints`)).json()).data;
  const body = $("checkpoints").tBodies[0];
  body.replaceChildren();
  for (const c of checkpoints) {
    const row = body.insertRow();
    cell(row, c.step_number); cell(row, c.fine_tuned_model_checkpoint);
    cell(row, Object.entries(c.metrics || {}).filter(([, v]) => v != null).map(([k, v]) => `${k}=${typeof v === "number" ? formatNumber(v) : v}`).join(" "));
  }
  showTryModels(job, checkpoints);
  return job;
}

// ---- the prompt box: the job's fine-tuned model or a checkpoint, through POST /v1/completions ----
function showTryModels(job, checkpoints) {
  const choices = [];
  if (job.fine_tuned_model) choices.push(new Option(`fine-tuned model (${job.fine_tuned_model})`, job.fine_tuned_model));
  for (const c of checkpoints) choices.push(new Option(`checkpoint at step ${c.step_number} (${c.id})`, c.id));
  // The page refreshes: keep what the user picked, else the first choice (the fine-tuned
  // model once there is one, not the checkpoint that was first while the job trained).
  const picked = $("try-model").dataset.picked;
  $("try-model").replaceChildren(...choices);
  if (picked && choices.some((o) => o.value === picked)) $("try-model").value = picked;
  $("try").hidden = choices.length === 0;
}

async function tryModel(event) {
  event.preventDefault();
  showError("");
  const answer = $("try-answer");
  answer.hidden = false;
  answer.textContent = "…";
  answer.className = "answer waiting";
  $("try-send").disabled = true;
  try {
    const body = {
      model: $("try-model").value,
      prompt: $("try-prompt").value,
      max_tokens: Number($("try-max-tokens").value),
      temperature: Number($("try-temperature").value),
    };
    const completion = await (await api("/v1/completions", { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } })).json();
    answer.textContent = completion.choices[0].text;
    answer.className = "answer";
  } catch (error) {
    answer.hidden = true; // api() has shown the error
  } finally {
    $("try-send").disabled = false;
  }
}

// A Unix time as the local clock time, and how far off it is ("14:32:05, in 3 min").
function estimatedFinish(seconds) {
  const at = new Date(seconds * 1000), left = Math.round((at - Date.now()) / 60000);
  const when = left <= 0 ? "any moment now" : left < 90 ? `in ${left} min` : `in ${(left / 60).toFixed(1)} h`;
  return `${at.toLocaleTimeString()} (${when})`;
}

function onEvent(jobId, event) {
  const item = document.createElement("li");
  item.textContent = `${new Date(event.created_at * 1000).toLocaleTimeString()} ${event.message}`;
  $("events").prepend(item);
  const data = event.data || {};
  if (event.type === "metrics") {
    // An evaluation's event repeats its step's training figures beside validation's
    // (`evaluation`: "sample" or "full"): the training curves take training steps only.
    const training = data.evaluation == null;
    if (training && data.train_loss != null) series.train.push([data.step, data.train_loss]);
    if (data.learning_rate != null) series.lr.push([data.step, data.learning_rate]);
    if (data.tokens_per_second != null) series.speed.push([data.step, data.tokens_per_second]);
    // Validation figures ride in metrics events too, when the job has a validation file.
    if (data.valid_loss != null) series.valid.push([data.step, data.valid_loss]);
    if (data.full_valid_loss != null) series.fullValid.push([data.step, data.full_valid_loss]);
    if (training && data.train_mean_token_accuracy != null) series.trainAccuracy.push([data.step, data.train_mean_token_accuracy]);
    if (data.valid_mean_token_accuracy != null) series.validAccuracy.push([data.step, data.valid_mean_token_accuracy]);
  }
  redraw();
  if (data.status) refreshJob(jobId);
}

function redraw() {
  if ($("job-view").hidden) return;
  drawChart($("loss-chart"), [
    { name: "train", color: "#1d4ed8", points: series.train },
    { name: "valid", color: "#d97706", points: series.valid },
    { name: "full_valid", color: "#b42318", points: series.fullValid },
  ], { yLabel: "loss" });
  $("full-valid-legend").hidden = series.fullValid.length === 0;
  const accuracy = series.trainAccuracy.length + series.validAccuracy.length > 0;
  $("accuracy").hidden = !accuracy;
  if (accuracy) {
    drawChart($("accuracy-chart"), [
      { name: "train_accuracy", color: "#1d4ed8", points: series.trainAccuracy },
      { name: "valid_accuracy", color: "#d97706", points: series.validAccuracy },
    ], { yLabel: "accuracy", yRange: [0, 1] });
  }
  drawChart($("lr-chart"), [{ name: "lr", color: "#7c3aed", points: series.lr }], { yLabel: "lr" });
  drawChart($("speed-chart"), [{ name: "speed", color: "#059669", points: series.speed }], { yLabel: "tokens/s" });
}

// ---- the compare view: several jobs' loss curves on one chart ----
const PALETTE = ["#1d4ed8", "#d97706", "#059669", "#b42318", "#7c3aed", "#0e7490", "#a16207", "#be185d"];

async function allEvents(jobId) {
  const events = [];
  let after = null;
  for (;;) {
    const query = `limit=100${after ? `&after=${after}` : ""}`;
    const page = await (await api(`/v1/fine_tuning/jobs/${jobId}/events?${query}`)).json();
    events.push(...page.data);
    if (!page.has_more || page.data.length === 0) return events.reverse(); // oldest first
    after = page.data[page.data.length - 1].id;
  }
}

async function showCompare(jobIds) {
  $("compare-view").hidden = false;
  const runs = await Promise.all(jobIds.map(async (id) => {
    const job = await (await api(`/v1/fine_tuning/jobs/${id}`)).json();
    const metrics = (await allEvents(id)).filter((e) => e.type === "metrics" && e.data).map((e) => e.data);
    return {
      job,
      train: metrics.filter((d) => d.evaluation == null && d.train_loss != null).map((d) => [d.step, d.train_loss]),
      valid: metrics.filter((d) => d.valid_loss != null).map((d) => [d.step, d.valid_loss]),
    };
  }));
  const draw = () => drawChart($("compare-chart"), runs.flatMap((run, i) => [
    { name: `${run.job.id}:train`, color: PALETTE[i % PALETTE.length], points: run.train },
    { name: `${run.job.id}:valid`, color: PALETTE[i % PALETTE.length], points: run.valid, dash: true },
  ]), { yLabel: "loss", empty: "no metrics yet" });
  draw();
  window.addEventListener("resize", draw);
  $("compare-legend").replaceChildren(...runs.map((run, i) => {
    const item = document.createElement("li");
    item.dataset.jobId = run.job.id;
    item.style.setProperty("--swatch", PALETTE[i % PALETTE.length]);
    const link = document.createElement("a");
    link.href = `/jobs/${run.job.id}`;
    link.textContent = run.job.suffix || run.job.id;
    const lr = learningRateOf(run.job);
    const details = [lr && `lr ${lr}`, run.job.status, run.valid.length ? "train + valid" : "train"];
    item.append(link, ` · ${details.filter(Boolean).join(" · ")}`);
    return item;
  }));
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
const compared = location.pathname === "/compare"
  ? (new URLSearchParams(location.search).get("jobs") || "").split(",").filter(Boolean) : null;
const view = match ? showJob(match[1]) : compared ? showCompare(compared) : showJobs();
view.catch((error) => showError(error.message));
