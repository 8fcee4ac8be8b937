// How the status and models pages write sizes, durations and a model's state.

export function size(bytes) {
  if (!bytes) return "?";
  return bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(2)} GiB` : `${(bytes / 2 ** 20).toFixed(0)} MiB`;
}

export function duration(seconds) {
  if (seconds == null) return "–";
  if (seconds < 120) return `${seconds} s`;
  return seconds < 7200 ? `${Math.round(seconds / 60)} min` : `${Math.round(seconds / 3600)} h`;
}

export function modelState(model) {
  if (!model.available) return "file missing";
  if (!model.enabled) return "disabled";
  if (!model.loaded) return model.loading != null ? `loading ${Math.round(model.loading * 100)}%` : "idle";
  return model.slots_busy ? "loaded, generating" : "loaded";
}
