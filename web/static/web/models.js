// The models page: each model's state from /status.json every two seconds; Load and Unload call
// POST /minerva/api/models/<name>/load|unload with the admin session (and its CSRF token).
import { csrfHeaders, errorMessage } from "./api.js";
import { duration, modelState } from "./format.js";

const POLL_MS = 2000;
const error = document.getElementById("error");

async function refresh() {
  try {
    const response = await fetch("/status.json", { credentials: "same-origin" });
    if (!response.ok) throw new Error(await errorMessage(response));
    const status = await response.json();
    for (const model of status.models) {
      const item = document.querySelector(`[data-model="${CSS.escape(model.name)}"]`);
      if (!item) continue;
      const state = item.querySelector("[data-state]");
      const expiry = model.loaded ? ` · unloads ${model.kept_forever ? "never" : `in ${duration(model.expires_in)}`}` : "";
      state.textContent = `${modelState(model)} · ${model.slots_busy}/${model.slots} slots busy · context ${model.n_ctx}${expiry}`;
      state.className = model.loaded ? "state state-loaded" : "state";
    }
  } catch (err) {
    error.textContent = `Could not refresh: ${err.message}`;
    error.hidden = false;
  }
}

async function act(button) {
  const name = button.closest("[data-model]").dataset.model;
  const action = button.dataset.action;
  button.disabled = true;
  error.hidden = true;
  try {
    const response = await fetch(`/minerva/api/models/${encodeURIComponent(name)}/${action}`, {
      method: "POST", credentials: "same-origin", headers: csrfHeaders(),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
  } catch (err) {
    error.textContent = `${action} ${name}: ${err.message}`;
    error.hidden = false;
  } finally {
    button.disabled = false;
    refresh();
  }
}

for (const button of document.querySelectorAll("button[data-action]")) {
  button.addEventListener("click", () => act(button));
}
refresh();
setInterval(refresh, POLL_MS);
