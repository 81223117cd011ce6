// eventgate's live dashboard: polls /v1/stats with the key typed in, draws SVG charts.
// No build step and nothing from elsewhere: this file, the page and its stylesheet are all.
"use strict";

(function () {
  const KEY_STORE = "eventgate.key"; // sessionStorage: gone when the tab closes
  const params = new URLSearchParams(window.location.search);
  const REFRESH_MS = Math.max(500, Number(params.get("refresh") || 2) * 1000);
  const KEEP = 180; // samples drawn: 6 minutes at the default refresh
  const COLORS = ["#2f6fdf", "#1a9e5a", "#e08a1e", "#c8372d", "#7b4fd6", "#1799a8", "#9c6b30", "#d14c9b"];
  const STATS_URL = "v1/stats"; // relative: works behind a proxy that adds a path prefix

  const $ = (id) => document.getElementById(id);
  let key = sessionStorage.getItem(KEY_STORE) || "";
  let samples = []; // {t: seconds, stats}
  let timer = null;

  const fmt = (n, digits) => {
    if (n === null || n === undefined || Number.isNaN(n)) return "–";
    return Number(n).toLocaleString("en-US", { maximumFractionDigits: digits === undefined ? 0 : digits });
  };
  const seconds = (s) => (s === null || s === undefined ? "–" : s < 1 ? fmt(s * 1000, 1) + " ms" : fmt(s, 2) + " s");

  function setValue(el, value, text) {
    el.dataset.value = value === null || value === undefined ? "" : String(value);
    el.textContent = text === undefined ? fmt(value) : text;
  }

  function setStatus(state, text) {
    const status = $("status");
    status.dataset.state = state;
    status.textContent = text;
  }

  // ---- polling -------------------------------------------------------------------------

  async function poll() {
    let response;
    try {
      response = await fetch(STATS_URL, { headers: { Authorization: "Bearer " + key }, cache: "no-store" });
    } catch (err) {
      setStatus("error", "front door unreachable; retrying");
      return;
    }
    if (response.status === 401 || response.status === 403) {
      const problem = await response.json().catch(() => ({}));
      stop();
      showForm(problem.detail || "this key cannot read the figures");
      return;
    }
    if (!response.ok) {
      setStatus("error", "figures unavailable (" + response.status + "); retrying");
      return;
    }
    const stats = await response.json();
    samples.push({ t: Date.parse(stats.taken_at) / 1000, stats: stats });
    if (samples.length > KEEP + 1) samples = samples.slice(-KEEP - 1);
    render(stats);
    const who = stats.scope === "operator" ? "operator view, every account" : "account " + stats.account;
    setStatus("live", who + " · updated " + new Date(stats.taken_at).toLocaleTimeString());
  }

  function start() {
    $("key-form").hidden = true;
    $("board").hidden = false;
    $("forget").hidden = false;
    samples = [];
    poll();
    timer = window.setInterval(poll, REFRESH_MS);
  }

  function stop() {
    if (timer !== null) window.clearInterval(timer);
    timer = null;
  }

  function showForm(error) {
    $("board").hidden = true;
    $("forget").hidden = true;
    $("key-form").hidden = false;
    $("key-error").hidden = !error;
    $("key-error").textContent = error || "";
    setStatus("idle", "enter a key to start");
  }

  // ---- figures -------------------------------------------------------------------------

  // Per-second rate of `pick(stats)` between consecutive samples: [[t, rate], ...].
  function rates(pick) {
    const out = [];
    for (let i = 1; i < samples.length; i++) {
      const dt = samples[i].t - samples[i - 1].t;
      if (dt <= 0) continue;
      out.push([samples[i].t, Math.max(0, (pick(samples[i].stats) - pick(samples[i - 1].stats)) / dt)]);
    }
    return out;
  }

  function levels(pick) {
    return samples.map((s) => [s.t, pick(s.stats)]);
  }

  const accountField = (name, field) => (stats) => {
    const row = stats.accounts.find((a) => a.account === name);
    return row ? row[field] : 0;
  };

  function render(stats) {
    const operator = stats.scope === "operator";
    document.body.classList.toggle("account-scope", !operator);
    $("scope-note").hidden = operator;
    for (const field of ["accepted", "persisted", "duplicate", "in_queue", "deferred", "dead_lettered"]) {
      setValue($("tile-" + field), stats.totals[field]);
    }
    $("identity").textContent = "Each row adds up: " + stats.identity + ".";
    renderAccounts(stats);
    const rate = [
      { name: "accepted", points: rates((s) => s.totals.accepted) },
      { name: "persisted", points: rates((s) => s.totals.persisted) },
    ];
    drawChart($("chart-rate"), $("legend-rate"), rate, (v) => fmt(v, 2));
    if (!operator) return;

    const rejected = Object.values(stats.rejected).reduce((a, b) => a + b, 0);
    setValue($("tile-rejected"), rejected);
    const backlog = stats.queues.reduce((a, q) => a + q.backlog_jobs, 0);
    setValue($("tile-backlog"), backlog);
    const lag = stats.queues.reduce((a, q) => Math.max(a, q.oldest_job_age_s), 0);
    setValue($("tile-lag"), lag, seconds(lag));
    setValue($("tile-workers"), stats.workers_alive);
    const sink = stats.sink_write;
    setValue($("tile-sink-p50"), sink.p50_s, seconds(sink.p50_s));
    setValue($("tile-sink-p99"), sink.p99_s, seconds(sink.p99_s));
    renderRequests(stats);
    renderQueues(stats);

    const queues = stats.queues.map((q) => q.queue);
    const queueSeries = (field) =>
      queues.map((name) => ({
        name: name,
        points: levels((s) => ((s.queues || []).find((q) => q.queue === name) || {})[field] || 0),
      }));
    drawChart($("chart-backlog"), $("legend-backlog"), queueSeries("backlog_jobs"), (v) => fmt(v, 1), 4);
    drawChart($("chart-lag"), $("legend-lag"), queueSeries("oldest_job_age_s"), (v) => fmt(v, 2) + " s");
    const statuses = new Set();
    for (const s of samples) {
      for (const byStatus of Object.values(s.stats.requests || {})) {
        for (const status of Object.keys(byStatus)) if (Number(status) >= 400) statuses.add(status);
      }
    }
    const errors = [...statuses].sort().map((status) => ({
      name: status,
      points: rates((s) =>
        Object.values(s.requests || {}).reduce((a, byStatus) => a + (byStatus[status] || 0), 0),
      ),
    }));
    drawChart($("chart-errors"), $("legend-errors"), errors, (v) => fmt(v, 2));
  }

  function cell(row, field, value, text, className) {
    const td = document.createElement("td");
    td.dataset.field = field;
    setValue(td, value, text);
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function renderAccounts(stats) {
    const body = $("accounts").tBodies[0];
    body.replaceChildren();
    for (const account of stats.accounts) {
      const row = document.createElement("tr");
      row.dataset.account = account.account;
      const name = document.createElement("td");
      name.dataset.field = "account";
      name.textContent = account.account;
      row.appendChild(name);
      for (const field of ["accepted", "persisted", "duplicate", "deferred", "dead_lettered", "in_queue", "rate_limited"]) {
        cell(row, field, account[field], undefined, account[field] < 0 ? "negative" : "");
      }
      const accepted = rates(accountField(account.account, "accepted")).pop();
      const persisted = rates(accountField(account.account, "persisted")).pop();
      cell(row, "accepted_per_s", accepted ? accepted[1] : null, accepted ? fmt(accepted[1], 1) : "–");
      cell(row, "persisted_per_s", persisted ? persisted[1] : null, persisted ? fmt(persisted[1], 1) : "–");
      body.appendChild(row);
    }
  }

  function renderRequests(stats) {
    const body = $("requests").tBodies[0];
    body.replaceChildren();
    const dialects = Object.keys(stats.requests).sort();
    for (const dialect of dialects) {
      const byStatus = stats.requests[dialect];
      for (const status of Object.keys(byStatus).sort()) {
        const row = document.createElement("tr");
        row.dataset.dialect = dialect;
        row.dataset.status = status;
        const name = document.createElement("td");
        name.textContent = dialect;
        row.appendChild(name);
        cell(row, "status", status, status, Number(status) >= 400 ? "error-status" : "");
        cell(row, "requests", byStatus[status]);
        body.appendChild(row);
      }
    }
    for (const dialect of Object.keys(stats.rejected).sort()) {
      const row = document.createElement("tr");
      row.dataset.dialect = dialect;
      row.dataset.status = "rejected";
      const name = document.createElement("td");
      name.textContent = dialect;
      row.appendChild(name);
      cell(row, "status", "rejected", "invalid events");
      cell(row, "requests", stats.rejected[dialect]);
      body.appendChild(row);
    }
  }

  function renderQueues(stats) {
    const body = $("queues").tBodies[0];
    body.replaceChildren();
    for (const queue of stats.queues) {
      const row = document.createElement("tr");
      row.dataset.queue = queue.queue;
      const name = document.createElement("td");
      name.textContent = queue.queue;
      row.appendChild(name);
      cell(row, "backlog_jobs", queue.backlog_jobs);
      cell(row, "oldest_job_age_s", queue.oldest_job_age_s, fmt(queue.oldest_job_age_s, 1));
      cell(row, "started_jobs", queue.started_jobs);
      cell(row, "scheduled_jobs", queue.scheduled_jobs);
      cell(row, "failed_jobs", queue.failed_jobs);
      body.appendChild(row);
    }
  }

  // ---- charts --------------------------------------------------------------------------

  const SVG = "http://www.w3.org/2000/svg";

  function svgEl(name, attrs, text) {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    return el;
  }

  // The smallest "nice" number (1, 2, 2.5 or 5 times a power of ten) at or above x.
  function niceCeil(x) {
    if (x <= 0) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(x)));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= x) return step * power;
    return 10 * power;
  }

  function drawChart(svg, legend, series, label, minMax) {
    const width = Math.max(200, svg.clientWidth || 600);
    const height = Math.max(120, svg.clientHeight || 190);
    const left = 52, right = 8, top = 8, bottom = 22;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.replaceChildren();
    const now = samples.length ? samples[samples.length - 1].t : 0;
    // The window grows with the samples taken, up to KEEP of them, so a new page fills it.
    const seen = samples.length ? now - samples[0].t : 0;
    const span = Math.max(10, Math.min((KEEP * REFRESH_MS) / 1000, seen));
    const highest = Math.max(minMax || 1, ...series.flatMap((s) => s.points.map((p) => p[1])));
    // Gridlines at a nice step, about four of them.
    const step = niceCeil(highest / 4);
    const ticks = Math.max(1, Math.ceil(highest / step - 1e-9));
    const max = step * ticks;
    const x = (t) => left + ((t - (now - span)) / span) * (width - left - right);
    const y = (v) => top + (1 - v / max) * (height - top - bottom);
    for (let i = 0; i <= ticks; i++) {
      const v = step * i;
      svg.appendChild(svgEl("line", { class: "grid", x1: left, x2: width - right, y1: y(v), y2: y(v) }));
      svg.appendChild(svgEl("text", { class: "axis", x: left - 6, y: y(v) + 4, "text-anchor": "end" }, label(v)));
    }
    const ago = span < 120 ? "-" + Math.round(span) + " s" : "-" + Math.round(span / 60) + " min";
    for (const [t, text] of [[now - span, ago], [now, "now"]]) {
      const anchor = text === "now" ? "end" : "start";
      svg.appendChild(svgEl("text", { class: "axis", x: x(t), y: height - 6, "text-anchor": anchor }, text));
    }
    legend.replaceChildren();
    const drawn = series.filter((s) => s.points.length);
    if (!drawn.length) {
      svg.appendChild(svgEl("text", { class: "empty", x: width / 2, y: height / 2, "text-anchor": "middle" }, "waiting for data"));
    }
    series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      if (s.points.length) {
        const points = s.points.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ");
        svg.appendChild(svgEl("polyline", { class: "line", points: points, stroke: color }));
      }
      const item = document.createElement("span");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = color;
      const latest = document.createElement("span");
      latest.className = "latest";
      const last = s.points[s.points.length - 1];
      latest.textContent = last ? label(last[1]) : "–";
      item.append(swatch, s.name, latest);
      legend.appendChild(item);
    });
  }

  // ---- wiring --------------------------------------------------------------------------

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    key = $("key").value.trim();
    $("key").value = "";
    sessionStorage.setItem(KEY_STORE, key);
    start();
  });
  $("forget").addEventListener("click", () => {
    stop();
    key = "";
    sessionStorage.removeItem(KEY_STORE);
    showForm("");
  });
  window.addEventListener("resize", () => {
    if (samples.length) render(samples[samples.length - 1].stats);
  });

  if (key) start();
  else showForm("");
})();
