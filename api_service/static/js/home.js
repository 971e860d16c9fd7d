// The home page's health list, from /readyz (database, Redis, live workers).
async function refresh() {
  let body = null;
  try {
    const response = await fetch('/readyz');
    body = await response.json();
  } catch (e) {
    body = null;
  }
  const checks = (body && body.checks) || {};
  for (const part of ['database', 'redis']) {
    const cell = document.querySelector(`[data-part="${part}"]`);
    const state = checks[part] || 'no answer';
    cell.textContent = state === 'ok' ? 'answering' : state;
    cell.dataset.ok = String(state === 'ok');
  }
  const workers = document.querySelector('[data-part="workers"]');
  const count = body ? body.workers : null;
  workers.textContent = count === null || count === undefined ? 'unknown (Redis down)'
    : count === 0 ? 'none answering' : `${count} answering`;
  workers.dataset.ok = String(Boolean(count));
}

refresh();
setInterval(refresh, 5000);
