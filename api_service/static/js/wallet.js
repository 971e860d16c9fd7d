// The wallet: live balance over /ws/balance, history, notifications, preferences.
import {
  ApiError, client, el, liveSocket, money, setLive, signedMoney, takeToken, toast, when,
} from './common.js';

const LABELS = {
  credit: 'Credit', sms_purchase: 'Purchase', verification_refund: 'Refund',
  adjustment: 'Adjustment',
};
const token = takeToken('user');
const $ = (id) => document.getElementById(id);

if (!token) {
  $('signin').hidden = false;
  setLive('signed out');
  $('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    location.hash = `token=${encodeURIComponent($('token-input').value.trim())}`;
    location.reload();
  });
} else {
  start();
}

function start() {
  const api = client(token);
  let lastSeq = null;
  let unread = 0;
  const shownSeqs = new Set();
  const shownNotes = new Map();
  let historyCursor = null;
  let historyTotal = 0;
  let notesCursor = null;

  // -- balance, live ------------------------------------------------------------------------
  function showBalance(cents) {
    $('balance').textContent = money(cents);
  }

  liveSocket({
    path: '/ws/balance',
    token,
    query: () => (lastSeq === null ? '' : `?since_seq=${lastSeq}`),
    onStatus: setLive,
    onMessage(message) {
      if (message.type === 'snapshot') {
        // After a reconnect (since_seq) the replay of what was missed follows the snapshot
        // and moves lastSeq on; a first connection starts at the snapshot.
        showBalance(message.balance_cents);
        if (lastSeq === null) lastSeq = message.seq;
      } else if (message.type === 'balance_update') {
        if (lastSeq !== null && message.seq <= lastSeq) return;
        showBalance(message.balance_cents);
        lastSeq = message.seq;
        if (!filtersSet()) {
          addTransaction(message.transaction, true);
          historyTotal += 1;
          showTotal();
        }
      } else if (message.type === 'notification') {
        const note = message.notification;
        if (!shownNotes.has(note.id)) {
          toast(`${note.title}: ${note.message}`);
          addNotification(note, true);
          if (!note.read) setUnread(unread + 1);
        }
      }
    },
  });

  // -- history ------------------------------------------------------------------------------
  function filtersSet() {
    const form = new FormData($('filters'));
    return Boolean(form.get('type') || form.get('start') || form.get('end'));
  }

  function filterQuery() {
    const form = new FormData($('filters'));
    const query = new URLSearchParams();
    if (form.get('type')) query.set('type', form.get('type'));
    if (form.get('start')) query.set('start_date', new Date(`${form.get('start')}T00:00:00`).toISOString());
    if (form.get('end')) {
      const end = new Date(`${form.get('end')}T00:00:00`);
      end.setDate(end.getDate() + 1); // the whole "to" day, in the viewer's zone: end_date
      end.setMilliseconds(-1); // is inclusive, so stop before the next day's midnight
      query.set('end_date', end.toISOString());
    }
    return query;
  }

  function addTransaction(tx, first) {
    if (shownSeqs.has(tx.seq)) return;
    shownSeqs.add(tx.seq);
    const amount = el('td', { class: `num ${tx.amount_cents < 0 ? 'debit' : 'credit'}`, text: signedMoney(tx.amount_cents) });
    const row = el('tr', { 'data-testid': 'tx-row', 'data-seq': tx.seq },
      el('td', {}, el('time', { datetime: tx.created_at, text: when(tx.created_at) })),
      el('td', { text: `${LABELS[tx.type] || tx.type}${tx.description ? ` · ${tx.description}` : ''}` }),
      amount,
      el('td', { class: 'num', text: money(tx.balance_after_cents) }));
    const body = $('history');
    if (first) body.prepend(row); else body.append(row);
  }

  function showTotal() {
    $('history-total').textContent = `${historyTotal} transaction${historyTotal === 1 ? '' : 's'}`;
  }

  let historyRequest = 0; // only the latest request's answer is shown

  async function loadHistory(reset) {
    const query = filterQuery();
    query.set('limit', '20');
    if (!reset && historyCursor !== null) query.set('cursor', historyCursor);
    const mine = ++historyRequest;
    try {
      const page = await api(`/api/wallet/transactions/detailed?${query}`);
      if (mine !== historyRequest) return;
      if (reset) {
        $('history').replaceChildren();
        shownSeqs.clear();
      }
      page.transactions.forEach((tx) => addTransaction(tx, false));
      historyCursor = page.next_cursor;
      historyTotal = page.total;
      showTotal();
      $('more-history').hidden = page.next_cursor === null;
    } catch (error) {
      if (mine === historyRequest) $('history-total').textContent = error.message;
    }
  }

  $('filters').addEventListener('submit', (event) => {
    event.preventDefault();
    loadHistory(true);
  });
  $('more-history').addEventListener('click', () => loadHistory(false));
  $('csv').addEventListener('click', async () => {
    // fetch and save: the token stays in a header, never in a URL
    try {
      const response = await api(`/api/wallet/transactions/export.csv?${filterQuery()}`, { raw: true });
      const url = URL.createObjectURL(await response.blob());
      const link = el('a', { href: url, download: 'transactions.csv' });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (error) {
      toast(`CSV: ${error.message}`);
    }
  });

  // -- notifications ------------------------------------------------------------------------
  function setUnread(count) {
    unread = Math.max(0, count);
    $('unread-count').textContent = String(unread);
  }

  function addNotification(note, first) {
    if (shownNotes.has(note.id)) return;
    const button = el('button', { type: 'button', text: 'Mark read', hidden: note.read });
    const item = el('li', { 'data-testid': 'notification-row', 'data-id': note.id, class: note.read ? 'read' : 'unread' },
      el('p', {}, el('strong', { text: note.title }), ' ', el('time', { datetime: note.created_at, text: when(note.created_at) })),
      el('p', { text: note.message }), button);
    button.addEventListener('click', async () => {
      try {
        await api(`/api/notifications/${note.id}/read`, { method: 'POST' });
        item.className = 'read';
        button.hidden = true;
        setUnread(unread - 1);
      } catch (error) {
        toast(error.message);
      }
    });
    shownNotes.set(note.id, item);
    const list = $('notifications');
    if (first) list.prepend(item); else list.append(item);
  }

  async function loadNotifications(reset) {
    const query = new URLSearchParams({ limit: '20' });
    if (!reset && notesCursor !== null) query.set('cursor', notesCursor);
    const page = await api(`/api/notifications?${query}`);
    page.notifications.forEach((note) => addNotification(note, false));
    notesCursor = page.next_cursor;
    $('more-notifications').hidden = page.next_cursor === null;
    setUnread(page.unread_count);
  }

  $('bell').addEventListener('click', () => {
    const open = $('inbox').hidden;
    $('inbox').hidden = !open;
    $('bell').setAttribute('aria-expanded', String(open));
    if (open) $('inbox').querySelector('h2').focus?.();
  });
  $('more-notifications').addEventListener('click', () => loadNotifications(false));
  $('mark-all').addEventListener('click', async () => {
    try {
      await api('/api/notifications/read-all', { method: 'POST' });
      for (const item of shownNotes.values()) {
        item.className = 'read';
        item.querySelector('button').hidden = true;
      }
      setUnread(0);
    } catch (error) {
      toast(error.message);
    }
  });

  // -- preferences --------------------------------------------------------------------------
  const BOOLEANS = ['email_on_credit', 'email_on_debit', 'email_on_refund',
    'push_on_credit', 'push_on_debit', 'push_on_refund'];
  const prefs = $('prefs');

  async function loadPrefs() {
    const current = await api('/api/notifications/preferences');
    for (const name of BOOLEANS) prefs.elements[name].checked = current[name];
    prefs.elements.min_amount_notify_cents.value = current.min_amount_notify_cents;
  }

  prefs.addEventListener('submit', async (event) => {
    event.preventDefault();
    prefs.querySelectorAll('.field-error').forEach((node) => { node.textContent = ''; });
    prefs.querySelectorAll('[aria-invalid]').forEach((node) => node.removeAttribute('aria-invalid'));
    const body = {};
    for (const name of BOOLEANS) body[name] = prefs.elements[name].checked;
    const raw = prefs.elements.min_amount_notify_cents.value.trim();
    // sent as typed (a number when it is one): the API's 422 explains anything else
    body.min_amount_notify_cents = /^-?[0-9]+$/.test(raw) ? Number(raw) : raw;
    try {
      await api('/api/notifications/preferences', { method: 'PUT', body });
      $('prefs-status').textContent = 'Saved';
    } catch (error) {
      $('prefs-status').textContent = error.message;
      if (error instanceof ApiError) {
        for (const field of error.fields) {
          const name = field.field.split('.')[0];
          const slot = document.getElementById(`err-${name}`);
          if (slot) slot.textContent = field.message;
          if (prefs.elements[name]) prefs.elements[name].setAttribute('aria-invalid', 'true');
        }
      }
    }
  });

  loadHistory(true);
  loadNotifications(true).catch((error) => toast(error.message));
  loadPrefs().catch((error) => toast(error.message));
}
