// Shared by the pages: the session token, calls to the JSON API, money and time formatting.

// The token arrives in the URL fragment (never sent to a server or logged), moves to
// sessionStorage and leaves the address bar.
export function takeToken(kind) {
  const key = `txmon.${kind}.token`;
  const params = new URLSearchParams(location.hash.slice(1));
  const fromUrl = params.get('token');
  if (fromUrl) {
    sessionStorage.setItem(key, fromUrl);
    history.replaceState(null, '', location.pathname + location.search);
  }
  return sessionStorage.getItem(key);
}

export function forgetToken(kind) {
  sessionStorage.removeItem(`txmon.${kind}.token`);
}

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }

  get fields() {
    return (this.body && this.body.error && this.body.error.details
            && this.body.error.details.fields) || [];
  }
}

export function client(token) {
  async function call(path, { method = 'GET', body, raw = false } = {}) {
    const headers = { Authorization: `Bearer ${token}` };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!response.ok) {
      let parsed = null;
      try { parsed = await response.json(); } catch (e) { /* not JSON */ }
      throw new ApiError(response.status, parsed);
    }
    return raw ? response : response.json();
  }
  return call;
}

const dollars = new Intl.NumberFormat('en-US', { style: 'currency', currency: 'USD' });

export function money(cents) {
  return dollars.format(cents / 100);
}

export function signedMoney(cents) {
  return (cents > 0 ? '+' : '') + money(cents);
}

// Times in the viewer's own time zone.
export function when(iso) {
  return new Date(iso).toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'text') node.textContent = value;
    else node.setAttribute(name, value === true ? '' : value);
  }
  for (const child of children) node.append(child);
  return node;
}

export function toast(text) {
  const box = document.getElementById('toasts');
  const item = el('div', { class: 'toast', text });
  box.append(item);
  setTimeout(() => item.remove(), 6000);
}

// A websocket that reconnects with a growing delay; `open()` builds the URL each time so
// the caller can add since_seq. The token goes in the first message, not the URL.
export function liveSocket({ path, token, query = () => '', onMessage, onStatus }) {
  let delay = 500;
  let stopped = false;
  function connect() {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const ws = new WebSocket(`${scheme}://${location.host}${path}${query()}`);
    ws.addEventListener('open', () => {
      ws.send(JSON.stringify({ type: 'auth', token }));
    });
    ws.addEventListener('message', (event) => {
      delay = 500;
      onStatus('live');
      onMessage(JSON.parse(event.data));
    });
    ws.addEventListener('close', (event) => {
      if (event.code === 1008) {
        stopped = true;
        onStatus('signed out', event.reason);
        return;
      }
      if (stopped) return;
      onStatus('reconnecting…');
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 10000);
    });
  }
  connect();
  return { stop() { stopped = true; } };
}

export function setLive(text, detail) {
  const live = document.getElementById('live');
  if (!live) return;
  live.textContent = detail ? `${text}: ${detail}` : text;
  live.dataset.state = text === 'live' ? 'live' : 'down';
}
