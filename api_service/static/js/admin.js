// The operator dashboard: monitor and charts, live feed, alerts, outbox, reconciliation,
// account timeline.
import uPlot from '../vendor/uplot/uPlot.esm.js';
import { client, el, liveSocket, money, setLive, signedMoney, takeToken, toast, when } from './common.js';

const FEED_MAX = 50;
const TYPES = ['credit', 'sms_purchase', 'verification_refund', 'adjustment'];
const token = takeToken('admin');
const $ = (id) => document.getElementById(id);

if (!token) {
  $('signin').hidden = false;
  setLive('signed out');
} else {
  start();
}

function chartWidth(node) {
  return Math.max(260, Math.min(node.parentElement.clientWidth - 8, 640));
}

function start() {
  const api = client(token);
  let seriesChart = null;
  let typesChart = null;

  // -- monitor ------------------------------------------------------------------------------
  function drawCharts(m) {
    const xs = m.series.map((b) => Date.parse(b.start) / 1000);
    const data = [xs, m.series.map((b) => b.transactions)];
    const seriesNode = $('chart-series');
    if (seriesChart) seriesChart.destroy();
    seriesChart = new uPlot({
      width: chartWidth(seriesNode), height: 180,
      series: [{}, { label: 'transactions', stroke: '#1f5fbf', fill: 'rgba(31,95,191,0.15)' }],
      axes: [{}, { size: 40 }],
    }, data, seriesNode);

    const typesNode = $('chart-types');
    if (typesChart) typesChart.destroy();
    const names = TYPES.concat(Object.keys(m.by_type).filter((t) => !TYPES.includes(t)));
    typesChart = new uPlot({
      width: chartWidth(typesNode), height: 180,
      scales: { x: { time: false, range: [-0.5, names.length - 0.5] } },
      series: [{}, {
        label: 'count', stroke: '#1f7a3f', fill: 'rgba(31,122,63,0.35)',
        paths: uPlot.paths.bars({ size: [0.6, 80] }), points: { show: false },
      }],
      axes: [{
        splits: () => names.map((_, i) => i),
        values: (u, splits) => splits.map((i) => names[i] || ''),
      }, { size: 40 }],
    }, [names.map((_, i) => i), names.map((n) => m.by_type[n] || 0)], typesNode);
  }

  async function loadMonitor() {
    try {
      const m = await api(`/api/admin/transactions/monitor?minutes=${$('window').value}`);
      $('m-total').textContent = String(m.total_transactions);
      $('m-added').textContent = money(m.credits_added_cents);
      $('m-spent').textContent = money(m.credits_spent_cents);
      $('m-refunds').textContent = money(m.refunds_issued_cents);
      $('m-users').textContent = String(m.unique_users);
      drawCharts(m);
    } catch (error) {
      toast(`Monitor: ${error.message}`);
    }
  }
  $('window').addEventListener('change', loadMonitor);

  // -- live feed ----------------------------------------------------------------------------
  function feed(text, kind) {
    const list = $('feed');
    list.prepend(el('li', { 'data-testid': 'feed-item', class: kind }, text));
    while (list.children.length > FEED_MAX) list.lastElementChild.remove();
  }

  liveSocket({
    path: '/ws/admin',
    token,
    onStatus: setLive,
    onMessage(message) {
      if (message.type === 'balance_update') {
        const tx = message.transaction;
        feed(`${when(tx.created_at)} · ${tx.user_id} · ${tx.type} ${signedMoney(tx.amount_cents)} → ${money(tx.balance_after_cents)}`, 'tx');
      } else if (message.type === 'alert') {
        const a = message.alert;
        feed(`${when(a.created_at)} · alert ${a.rule} · ${a.user_id || ''}`, 'alert');
        loadAlerts();
      } else if (message.type === 'resync') {
        loadMonitor();
        loadAlerts();
      }
    },
  });

  // -- alerts -------------------------------------------------------------------------------
  async function loadAlerts() {
    try {
      const { alerts } = await api('/api/admin/alerts?status=open&limit=50');
      const list = $('alerts');
      list.replaceChildren(...alerts.map(alertRow));
      if (!alerts.length) list.append(el('li', { class: 'muted', text: 'No open alerts' }));
    } catch (error) {
      toast(`Alerts: ${error.message}`);
    }
  }

  function alertRow(a) {
    const noteId = `note-${a.id}`;
    const note = el('input', { id: noteId, maxlength: '500', autocomplete: 'off' });
    const ack = el('button', { type: 'button', 'data-testid': 'ack-button', text: 'Acknowledge' });
    const row = el('li', { 'data-testid': 'alert-row', 'data-id': a.id },
      el('p', {}, el('strong', { text: a.rule }), ` · ${a.user_id || ''} · `,
        el('time', { datetime: a.created_at, text: when(a.created_at) })),
      el('p', { class: 'muted', text: JSON.stringify(a.details) }),
      el('label', { for: noteId, text: 'Note ' }), note, ' ', ack);
    ack.addEventListener('click', async () => {
      ack.disabled = true;
      try {
        const body = note.value.trim() ? { note: note.value.trim() } : {};
        await api(`/api/admin/alerts/${a.id}/acknowledge`, { method: 'POST', body });
        row.remove();
      } catch (error) {
        ack.disabled = false;
        toast(`Acknowledge: ${error.message}`);
      }
    });
    return row;
  }

  // -- outbox and reconciliation ------------------------------------------------------------
  async function loadOutbox() {
    try {
      const status = await api('/api/admin/outbox');
      $('backlog').textContent = String(status.backlog);
      $('in-flight').textContent = String(status.in_flight);
      $('dead-count').textContent = String(status.dead);
      $('oldest').textContent = `${status.oldest_due_age_s} s`;
      const { rows } = await api('/api/admin/outbox/dead?limit=20');
      $('dead').replaceChildren(...rows.map(deadRow));
    } catch (error) {
      toast(`Outbox: ${error.message}`);
    }
  }

  function deadRow(row) {
    const retry = el('button', { type: 'button', text: 'Re-drive' });
    const item = el('li', { 'data-testid': 'dead-row' },
      el('p', {}, el('strong', { text: `#${row.id} ${row.task}` }), ` · ${row.user_id || ''} · ${row.attempts} attempts`),
      el('p', { class: 'muted', text: row.last_error || '' }), retry);
    retry.addEventListener('click', async () => {
      try {
        await api(`/api/admin/outbox/${row.id}/retry`, { method: 'POST' });
        item.remove();
        loadOutbox();
      } catch (error) {
        toast(`Re-drive: ${error.message}`);
      }
    });
    return item;
  }

  async function loadReconciliation() {
    try {
      const r = await api('/api/admin/reconciliation');
      $('recon').textContent = r.ran_at
        ? `${when(r.ran_at)}: ${r.accounts_checked} accounts, ${r.mismatches.length} mismatches`
        : 'not run yet';
    } catch (error) {
      $('recon').textContent = error.message;
    }
  }

  // -- account timeline ---------------------------------------------------------------------
  let timelineUser = null;
  let timelineCursor = null;

  async function loadTimeline(reset) {
    const query = new URLSearchParams({ limit: '50' });
    if (!reset && timelineCursor) query.set('cursor', timelineCursor);
    try {
      const page = await api(`/api/admin/accounts/${encodeURIComponent(timelineUser)}/timeline?${query}`);
      if (reset) $('timeline').replaceChildren();
      for (const event of page.events) {
        $('timeline').append(el('li', { 'data-testid': 'timeline-row', class: event.kind },
          el('time', { datetime: event.at, text: when(event.at) }), ` · ${event.kind} · ${event.summary}`));
      }
      timelineCursor = page.next_cursor;
      $('more-timeline').hidden = !page.next_cursor;
      $('timeline-status').textContent = `Timeline of ${page.user_id}`;
    } catch (error) {
      if (reset) $('timeline').replaceChildren();
      $('timeline-status').textContent = error.status === 404 ? `No account ${timelineUser}` : error.message;
    }
  }

  $('search').addEventListener('submit', (event) => {
    event.preventDefault();
    timelineUser = $('account').value.trim();
    if (timelineUser) loadTimeline(true);
  });
  $('more-timeline').addEventListener('click', () => loadTimeline(false));

  loadMonitor();
  loadAlerts();
  loadOutbox();
  loadReconciliation();
  setInterval(() => { loadMonitor(); loadOutbox(); }, 10000);
}
