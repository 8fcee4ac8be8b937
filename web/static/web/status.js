// The status page: /status.json every two seconds, drawn into the page's tables.
import { errorMessage } from "./api.js";
import { duration, modelState, size } from "./format.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;

function ms(seconds) {
  return seconds == null ? ">60 s" : seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds} s`;
}

function percentiles(entry) {
  return entry ? `${ms(entry.p50)} / ${ms(entry.p90)} / ${ms(entry.p99)}` : "–";
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell);
    else td.textContent = cell ?? "";
    tr.append(td);
  }
  return tr;
}

function draw(status) {
  const rates = status.rates;
  const cards = [
    ["Requests / min", rates.requests_per_minute],
    ["Prompt tokens / min", rates.prompt_tokens_per_minute],
    ["Completion tokens / min", rates.completion_tokens_per_minute],
    ["Workers", status.workers.length],
    ["Loaded models", status.models.filter((m) => m.loaded).length],
    ["Queued", status.models.reduce((n, m) => n + (m.queue_depth || 0), 0)],
  ];
  $("rates").replaceChildren(...cards.map(([label, value]) => {
    const div = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = label;
    dd.textContent = value;
    div.append(dt, dd);
    return div;
  }));
  $("models").tBodies[0].replaceChildren(...status.models.map((m) => {
    const state = document.createElement("span");
    state.textContent = modelState(m);
    state.className = m.loaded ? "state-loaded" : "";
    const latency = status.latency[m.name] || {};
    return row([m.name, state, m.n_ctx, m.quantization || m.format, size(m.file_size),
                `${m.slots_busy} / ${m.slots}`, m.queue_depth ?? "?",
                m.kept_forever ? "never" : duration(m.expires_in), percentiles(latency.ttft),
                percentiles(latency.itl)]);
  }));
  $("workers").replaceChildren(...(status.workers.length ? status.workers.map((w) => {
    const li = document.createElement("li");
    const models = w.queues.map((q) => q.replace(/^minerva\.model\./, "")).join(", ");
    const slots = w.slots ? ` · slots ${w.slots.busy}/${w.slots.total} busy` : "";
    li.textContent = `${w.id}: serving ${models || "no model queue"}${slots} · last heartbeat ${w.seen_seconds_ago} s ago`;
    return li;
  }) : [Object.assign(document.createElement("li"), { textContent: "No worker alive." })]));
  $("requests").tBodies[0].replaceChildren(...status.requests.map((r) => {
    const link = document.createElement("a");
    link.href = `/admin/inference/requestlog/?q=${encodeURIComponent(r.request_id)}`;
    link.textContent = r.request_id.slice(0, 12);
    return row([new Date(r.created).toLocaleTimeString(), link, r.endpoint, r.model,
                `${r.status}${r.status_code ? ` (${r.status_code})` : ""}`,
                `${r.prompt_tokens} / ${r.completion_tokens}`,
                r.ttft_ms == null ? "–" : `${Math.round(r.ttft_ms)} ms`,
                r.latency_ms == null ? "–" : `${Math.round(r.latency_ms)} ms`]);
  }));
  $("batches").replaceChildren(...(status.batches.length ? status.batches.map((b) => {
    const li = document.createElement("li");
    const counts = b.request_counts;
    li.textContent = `${b.id} · ${b.model} · ${b.status} · ${counts.completed + counts.failed} of ${counts.total} done`
      + (counts.failed ? ` (${counts.failed} failed)` : "");
    return li;
  }) : [Object.assign(document.createElement("li"), { textContent: "No batches yet." })]));
  $("updated").textContent = `Updated ${new Date(status.at * 1000).toLocaleTimeString()}.`;
}

async function poll() {
  try {
    const response = await fetch("/status.json", { credentials: "same-origin" });
    if (!response.ok) throw new Error(await errorMessage(response));
    draw(await response.json());
  } catch (error) {
    $("updated").textContent = `Could not refresh: ${error.message}`;
  }
  setTimeout(poll, POLL_MS);
}

poll();
