// Calls to Minerva's own APIs from the pages: the key typed into the chat page (kept in this browser only) or,
// for staff actions, the admin session with its CSRF token.
export function apiKey() {
  return localStorage.getItem("minerva.apiKey") || "";
}

export function headers(extra = {}) {
  const result = { "Content-Type": "application/json", ...extra };
  const key = apiKey();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

export function csrfHeaders() {
  return { "X-CSRFToken": document.querySelector('meta[name="csrf-token"]').content };
}

/** The API's error message from a failed response (OpenAI's, Anthropic's or Ollama's shape), or its status. */
export async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error;
    return (typeof error === "string" ? error : error?.message) || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}: ${text.slice(0, 200)}`;
  }
}
