// Tandem status page: polls /v1/status and renders it. No external script, font or request:
// everything here is this file, status.html and status.css, served by the coordinator.
// With an API key set on the server (body[data-auth="required"]) the page asks for the key
// before its first request, keeps it in sessionStorage (this tab only) and sends it as a
// Bearer header; a refused key is forgotten and asked for again.
"use strict";

(() => {
  const KEY_STORE = "tandem.apiKey";
  const params = new URLSearchParams(location.search);
  const intervalMs = Math.max(200, Number(params.get("interval")) || 1000);
  const authRequired = document.body.dataset.auth === "required";
  // Known phases get fixed colours in lifecycle order; any other name gets one from the rest.
  const PHASE_COLORS = {
    queue: "#b8c0cc", route: "#9aa5b1", reserve: "#f0b429", prefill_queue: "#f7d070",
    prefill: "#e8590c", transfer: "#7048e8", decode_join: "#ae3ec9", decode: "#2f9e44",
  };
  const SPARE_COLORS = ["#1c7ed6", "#e64980", "#0ca678", "#868e96", "#f08c00", "#5c7cfa"];
  const $ = (id) => document.getElementById(id);
  let timer = null;

  function num(x, digits = 1) {
    return x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits);
  }

  function ms(x) {  // three significant figures at most, so that p50 / p90 / p99 fit a card
    if (x === null || x === undefined) return "–";
    return num(x, x < 10 ? 2 : x < 100 ? 1 : 0);
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  function duration(s) {
    if (s < 120) return `${s.toFixed(0)} s`;
    if (s < 7200) return `${(s / 60).toFixed(0)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function phaseColor(name) {
    if (PHASE_COLORS[name]) return PHASE_COLORS[name];
    let h = 0;
    for (const c of name) h = (h * 31 + c.charCodeAt(0)) >>> 0;
    return SPARE_COLORS[h % SPARE_COLORS.length];
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "style") Object.assign(node.style, v);
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v);
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function meter(used, total) {
    const pct = total > 0 ? (100 * used) / total : 0;
    return el("div", { class: "meter" },
      el("div", { style: { width: `${pct.toFixed(1)}%` } }),
      el("span", { class: "kv-text" }, `${used} / ${total}`));
  }

  function fillBody(table, rows) {
    const body = document.querySelector(`#${table} tbody`);
    body.replaceChildren(...rows);
  }

  function renderPercentiles(id, summary) {
    $(`${id}-count`).textContent = `(${summary.count} samples)`;
    $(id).replaceChildren(...["p50", "p90", "p99"].map((q) =>
      el("div", { dataset: { q } }, el("b", {}, ms(summary[q])), el("span", {}, q))));
  }

  function renderCards(s) {
    const r = s.requests;
    $("admitted-rate").textContent = num(r.admitted_per_s, 2);
    $("finished-rate").textContent = `${num(r.finished_per_s, 2)} finished/s, ` +
      `${r.finished_in_window} in the last ${s.window_s.toFixed(0)} s`;
    $("in-flight").textContent = r.in_flight;
    $("run-wait").textContent = `${r.running} running, ${r.waiting} waiting`;
    $("goodput-rate").textContent = num(r.goodput_per_s, 2);
    const slo = s.slo;
    $("slo").textContent = slo
      ? `SLO: TTFT ≤ ${slo.ttft_ms ?? "–"} ms, TPOT ≤ ${slo.tpot_ms ?? "–"} ms`
      : "no SLO set: every finished request counts";
    const kv = s.kv_transfer;
    $("kv-rate").textContent = kv.bytes_per_s === null ? "–" : `${bytes(kv.bytes_per_s)}/s`;
    $("kv-total").textContent = kv.backends.length
      ? `${bytes(kv.bytes_total)} in ${num(kv.seconds_total, 2)} s (${kv.backends.join(", ")})`
      : "no transfers (colocated)";
    renderPercentiles("ttft", s.latency_ms.ttft);
    renderPercentiles("itl", s.latency_ms.itl);
  }

  function renderTables(s) {
    fillBody("pools", s.pools.map((p) => el("tr", { dataset: { pool: p.name } },
      el("td", {}, p.name),
      el("td", { class: "live" }, `${p.workers_live} / ${p.workers_total}`),
      el("td", { class: "running" }, p.running),
      el("td", { class: "waiting" }, p.waiting),
      el("td", { class: "kv" }, meter(p.kv_blocks_used, p.kv_blocks_total)))));
    fillBody("workers", s.workers.map((w) => el("tr", { dataset: { worker: w.name } },
      el("td", {}, w.name),
      el("td", { class: "pool" }, w.pool),
      el("td", { class: "live" }, el("span", { class: `dot ${w.live ? "live" : "dead"}` }),
        w.live ? "live" : "dead"),
      el("td", { class: "incarnation" }, w.incarnation),
      el("td", { class: "running" }, w.running),
      el("td", { class: "waiting" }, w.waiting),
      el("td", { class: "kv" }, meter(w.kv_blocks_used, w.kv_blocks_total)))));
  }

  function renderWaterfall(requests) {
    const box = $("waterfall");
    $("waterfall-empty").hidden = requests.length > 0;
    if (!requests.length) {
      box.replaceChildren();
      $("legend").replaceChildren();
      return;
    }
    const span = Math.max(1e-3, ...requests.flatMap((r) => r.phases.map((p) => p.end_s)));
    const names = [...new Set(requests.flatMap((r) => r.phases.map((p) => p.name)))];
    $("legend").replaceChildren(...names.map((n) =>
      el("span", {}, el("i", { style: { background: phaseColor(n) } }), n)));
    const rows = requests.map((r) => {
      const shortId = r.id.length > 20 ? `${r.id.slice(0, 8)}…${r.id.slice(-6)}` : r.id;
      const label = el("div", { class: "wf-label", title: r.id }, shortId);
      if (r.finish_reason) label.append(` · ${r.finish_reason}`);
      if (r.retries) label.append(el("span", { class: "badge retries" }, `${r.retries} retry`));
      if (r.migrations) {
        label.append(el("span", { class: "badge migrations" }, `${r.migrations} migr.`));
      }
      const track = el("div", { class: "wf-track" }, ...r.phases.map((p) => el("div", {
        class: "bar",
        title: `${p.name}: ${num(p.start_s, 3)}–${num(p.end_s, 3)} s`,
        dataset: { phase: p.name },
        style: {
          left: `${((100 * p.start_s) / span).toFixed(3)}%`,
          width: `${((100 * (p.end_s - p.start_s)) / span).toFixed(3)}%`,
          background: phaseColor(p.name),
        },
      })));
      return el("div", { class: "wf-row", dataset: { request: r.id } }, label, track);
    });
    const axis = el("div", { class: "wf-axis" }, el("div"),
      el("div", {}, el("span", {}, "0 s"), el("span", {}, `${num(span / 2, 2)} s`),
        el("span", { id: "wf-span" }, `${num(span, 2)} s`)));
    box.replaceChildren(...rows, axis);
  }

  function render(s) {
    $("model").textContent = s.model;
    $("mode").textContent = s.mode;
    $("uptime").textContent = `up ${duration(s.uptime_s)}`;
    $("engine-error").hidden = !s.engine_error;
    $("engine-error").textContent = s.engine_error || "";
    renderCards(s);
    renderTables(s);
    renderWaterfall(s.recent_requests);
    document.body.dataset.renders = String(Number(document.body.dataset.renders) + 1);
  }

  function setConn(ok, text) {
    $("conn").className = `conn ${ok ? "ok" : "bad"}`;
    $("conn").textContent = text;
  }

  function askKey(message) {
    $("key-form").hidden = false;
    if (message) $("key-msg").textContent = message;
    setConn(false, "API key needed");
  }

  async function poll() {
    timer = null;
    const key = sessionStorage.getItem(KEY_STORE);
    if (authRequired && !key) {
      askKey();
      return;  // resumes when the form is submitted
    }
    try {
      const resp = await fetch("/v1/status", {
        headers: key ? { Authorization: `Bearer ${key}` } : {},
        cache: "no-store",
      });
      if (resp.status === 401) {
        sessionStorage.removeItem(KEY_STORE);
        askKey("That key was refused; enter the server's API key.");
        return;
      }
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      render(await resp.json());
      setConn(true, `updated ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      setConn(false, `no answer: ${err.message}`);
    }
    timer = setTimeout(poll, intervalMs);
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
    $("key-input").value = "";
    $("key-form").hidden = true;
    if (timer === null) poll();
  });
  $("interval").textContent = intervalMs;
  poll();
})();
