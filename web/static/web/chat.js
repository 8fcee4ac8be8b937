// The chat playground: conversations in localStorage, answers streamed from /v1/chat/completions (SSE read with
// fetch and a ReadableStream), Stop aborts the fetch (the server cancels the request when the client goes).
import { errorMessage, headers } from "./api.js";
import { renderMarkdown } from "./markdown.js";

const STORE = "minerva.conversations";
const CURRENT = "minerva.current";
const $ = (id) => document.getElementById(id);

let conversations = load();
let current = localStorage.getItem(CURRENT);
const ENCODERS = /bert|roberta|t5encoder/i;
let controller = null; // the running answer's AbortController
let modelsLoading = null; // the model list's fetch: a message sent before it ends waits for it

function load() {
  try {
    const stored = JSON.parse(localStorage.getItem(STORE) || "[]");
    return Array.isArray(stored) ? stored : [];
  } catch {
    return [];
  }
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(conversations));
  localStorage.setItem(CURRENT, current || "");
}

function conversation() {
  let found = conversations.find((c) => c.id === current);
  if (!found) {
    found = { id: crypto.randomUUID(), title: "New conversation", messages: [] };
    conversations.unshift(found);
    current = found.id;
    save();
  }
  return found;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// ------------------------------------------------------------------------------------------ conversations

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren();
  for (const c of conversations) {
    const item = document.createElement("li");
    item.className = c.id === current ? "current" : "";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title;
    if (c.id === current) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => switchTo(c.id));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "delete";
    remove.textContent = "✕";
    remove.setAttribute("aria-label", `Delete conversation: ${c.title}`);
    remove.addEventListener("click", () => {
      conversations = conversations.filter((other) => other.id !== c.id);
      if (current === c.id) current = conversations[0]?.id || null;
      save();
      renderAll();
    });
    item.append(open, remove);
    list.append(item);
  }
}

function switchTo(id) {
  if (controller) return; // one answer at a time; Stop first
  current = id;
  save();
  renderAll();
}

function renderAll() {
  const c = conversation();
  renderConversations();
  $("system").value = c.system || "";
  const transcript = $("transcript");
  transcript.replaceChildren(...c.messages.map((m) => messageElement(m)));
}

// ------------------------------------------------------------------------------------------------ messages

function messageElement(message) {
  const item = document.createElement("li");
  item.className = `message ${message.role}`;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = message.role === "user" ? "You" : message.model || "Assistant";
  item.append(role);
  if (message.role === "user") {
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = message.content;
    item.append(content);
  } else {
    fillAnswer(item, message);
  }
  return item;
}

function fillAnswer(item, message) {
  item.querySelectorAll(".reasoning-box, .content, .tool-calls, .stats").forEach((e) => e.remove());
  if (message.reasoning) {
    const details = document.createElement("details");
    details.className = "reasoning-box";
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const body = document.createElement("div");
    body.className = "reasoning";
    body.textContent = message.reasoning;
    details.append(summary, body);
    item.append(details);
  }
  const content = document.createElement("div");
  content.className = "content";
  renderMarkdown(content, message.content || "");
  item.append(content);
  const calls = Object.values(message.tool_calls || {});
  if (calls.length) {
    const box = document.createElement("div");
    box.className = "tool-calls";
    const title = document.createElement("div");
    title.textContent = "Tool calls";
    const pre = document.createElement("pre");
    pre.textContent = JSON.stringify(calls.map(toolCallShown), null, 2);
    box.append(title, pre);
    item.append(box);
  }
  const stats = document.createElement("div");
  stats.className = "stats";
  stats.dataset.testid = "stats";
  stats.textContent = statsText(message);
  item.append(stats);
}

function toolCallShown(call) {
  let args = call.arguments;
  try {
    args = JSON.parse(call.arguments);
  } catch {
    // still being written, or not JSON: show it as text
  }
  return { id: call.id, name: call.name, arguments: args };
}

function statsText(message) {
  const u = message.usage;
  const parts = [];
  if (u) {
    parts.push(`prompt ${u.prompt_tokens} tokens`, `completion ${u.completion_tokens}`);
    parts.push(`cached ${u.prompt_tokens_details?.cached_tokens ?? 0}`);
  } else if (message.streamed) {
    parts.push(`${message.streamed} tokens so far`);
  }
  if (message.tokensPerSecond) parts.push(`${message.tokensPerSecond.toFixed(1)} tok/s`);
  if (message.finish) parts.push(message.finish === "stopped" ? "stopped" : `finish: ${message.finish}`);
  return parts.join(" · ");
}

// ------------------------------------------------------------------------------------------------- sending

async function send(text) {
  const c = conversation();
  await modelsLoading;
  const model = $("model").value;
  if (!model) {
    showError("No model to send to: the model list is empty or could not be read.");
    return;
  }
  let tools;
  try {
    tools = $("tools").value.trim() ? JSON.parse($("tools").value) : undefined;
  } catch (error) {
    showError(`The tools are not JSON: ${error.message}`);
    return;
  }
  showError("");
  c.system = $("system").value;
  if (!c.messages.length) c.title = text.slice(0, 40);
  c.messages.push({ role: "user", content: text });
  const answer = { role: "assistant", model, content: "", reasoning: "", tool_calls: {}, streamed: 0 };
  c.messages.push(answer);
  save();
  renderAll();
  const item = $("transcript").lastElementChild;
  item.setAttribute("aria-busy", "true");

  const messages = c.messages.slice(0, -1).map((m) => ({ role: m.role, content: m.content || "" }));
  if (c.system) messages.unshift({ role: "system", content: c.system });
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
    ...(tools ? { tools, tool_choice: $("tool-choice").value } : {}),
  };
  controller = new AbortController();
  setBusy(true);
  let first = null;
  let pending = false;
  const repaint = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      fillAnswer(item, answer);
    });
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of events(response.body)) {
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) answer.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.content || delta.reasoning_content || delta.tool_calls) {
          first ??= performance.now();
          answer.streamed += 1;
        }
        answer.content += delta.content || "";
        answer.reasoning += delta.reasoning_content || "";
        for (const part of delta.tool_calls || []) {
          const call = (answer.tool_calls[part.index] ??= { id: "", name: "", arguments: "" });
          call.id = part.id || call.id;
          call.name += part.function?.name || "";
          call.arguments += part.function?.arguments || "";
        }
        if (choice.finish_reason) answer.finish = choice.finish_reason;
      }
      if (first && answer.streamed > 1) {
        const tokens = answer.usage?.completion_tokens ?? answer.streamed;
        answer.tokensPerSecond = (tokens - 1) / ((performance.now() - first) / 1000);
      }
      repaint();
    }
  } catch (error) {
    if (error.name === "AbortError") {
      answer.finish = "stopped";
    } else {
      showError(error.message);
      answer.finish = "error";
    }
  } finally {
    controller = null;
    setBusy(false);
    item.removeAttribute("aria-busy");
    fillAnswer(item, answer);
    save();
  }
}

// The SSE frames of a streamed answer: each `data:` line's JSON, until [DONE].
async function* events(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// -------------------------------------------------------------------------------------------------- models

async function loadModels() {
  const select = $("model");
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const { data } = await response.json();
    // The one chosen before, else the first that chats (encoders only embed)
    const chats = data.filter((m) => !ENCODERS.test(m.meta?.architecture || ""));
    const chosen = localStorage.getItem("minerva.model") || chats[0]?.id;
    select.replaceChildren(...data.map((m) => new Option(m.id, m.id, false, m.id === chosen)));
    showError("");
  } catch (error) {
    showError(`Cannot list the models: ${error.message}`);
  }
}

// --------------------------------------------------------------------------------------------------- setup

$("settings").addEventListener("submit", (event) => event.preventDefault());
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller?.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) return;
  current = null;
  conversation();
  renderAll();
  $("prompt").focus();
});
$("model").addEventListener("change", () => localStorage.setItem("minerva.model", $("model").value));
$("system").addEventListener("change", () => {
  conversation().system = $("system").value;
  save();
});
for (const id of ["temperature", "top-p", "max-tokens", "tools", "tool-choice"]) {
  const stored = localStorage.getItem(`minerva.${id}`);
  if (stored) $(id).value = stored;
  $(id).addEventListener("change", () => localStorage.setItem(`minerva.${id}`, $(id).value));
}
$("api-key").value = localStorage.getItem("minerva.apiKey") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("minerva.apiKey", $("api-key").value.trim());
  modelsLoading = loadModels();
});

// On a phone the conversations and settings start folded, so the transcript comes first (unless a key is
// required and none is typed yet).
const keyMissing = !$("api-key-field").hidden && !$("api-key").value;
if (matchMedia("(max-width: 48rem)").matches && !keyMissing) $("sidebar-box").open = false;

renderAll();
modelsLoading = loadModels();
