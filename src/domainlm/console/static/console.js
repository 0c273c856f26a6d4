// domainlm console: live updates and small form helpers. Plain JS; user text only ever goes through textContent.
"use strict";

const FINISHED = ["succeeded", "failed", "cancelled", "interrupted"];
const COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#be123c"];
// the page's language: the texts console.js writes itself, from the server's message catalogue
const MESSAGES = JSON.parse((document.getElementById("i18n") || {}).textContent || "{}");
function t(text, fields) {
  let out = MESSAGES[text] || text;
  for (const [k, v] of Object.entries(fields || {})) out = out.replace("{" + k + "}", v);
  return out;
}

async function getJSON(url) {
  const r = await fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}});
  if (!r.ok) throw new Error(url + ": " + r.status);
  return r.json();
}

function every(ms, fn) {
  // keeps polling through errors (a console restart), so a page left open picks up where it was
  const tick = async () => {
    try {
      if (await fn() === false) return;
    } catch (e) { /* retry next tick */ }
    setTimeout(tick, ms);
  };
  setTimeout(tick, ms);
}

function fmtSteps(p, unit) { return p.steps + (p.total ? " / " + p.total : "") + " " + t(unit || "steps"); }
function fmtEta(j) { return j.status === "running" && j.progress.eta_s != null ? j.progress.eta_s + " s" : "–"; }
function setStatus(el, status) {
  el.textContent = t(status);
  el.dataset.status = status;
  el.className = "status " + status;
}
function stepUnit(j) { return j.command === "sweep" ? "cells" : "steps"; }
function gib(n) { return (n / 2 ** 30).toFixed(1) + " GiB"; }

function machine(box) {
  // the machine card: CPU, memory, disk, each GPU, polled while the page is open
  every(3000, async () => {
    const m = await getJSON("/api/resources");
    const set = (sel, text) => { const el = box.querySelector(sel); if (el) el.textContent = text; };
    if (m.cpu.percent != null) set('[data-m="cpu"]', m.cpu.percent + "%");
    if (m.memory) set('[data-m="memory"]', m.memory.percent + "%");
    set('[data-m="disk"]', m.disk.percent + "%");
    for (const g of m.gpus) {
      const el = box.querySelector('[data-gpu="' + g.index + '"]');
      if (!el) continue;
      el.querySelector('[data-m="gpu-util"]').textContent = (g.utilization == null ? "–" : g.utilization) + "%";
      el.querySelector('[data-m="gpu-mem"]').textContent =
        t("{used} of {total}", {used: gib(g.memory_used), total: gib(g.memory_total)});
    }
  });
}

function jobsPage() {
  const table = document.getElementById("jobs");
  every(2000, async () => {
    const jobs = await getJSON("/api/jobs" + location.search);  // the same filter as the page
    if (!table) { if (jobs.length) { location.reload(); return false; } return; }
    if (jobs.length !== table.tBodies[0].rows.length) { location.reload(); return false; }
    for (const j of jobs) {
      const row = table.querySelector('tr[data-job="' + j.id + '"]');
      if (!row) continue;
      // a job that starts or ends changes the queue, its devices and its result: draw the page again
      if (row.querySelector('[data-field="status"]').dataset.status !== j.status) { location.reload(); return false; }
      row.querySelector('[data-field="bar"]').style.width = ((j.progress.fraction || 0) * 100) + "%";
      row.querySelector('[data-field="steps"]').textContent = fmtSteps(j.progress, stepUnit(j));
      row.querySelector('[data-field="eta"]').textContent = j.status === "running" ? fmtEta(j) : "";
    }
  });
}

function drawChart(canvas, series, ylabel) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 52, R = 12, T = 12, B = 34;
  ctx.clearRect(0, 0, W, H);
  const pts = series.flatMap(s => s.points);
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#667085";
  if (!pts.length) { ctx.fillText(t("no points yet"), W / 2 - 36, H / 2); return; }
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= 0.1; y1 += 0.1; }
  const pad = (y1 - y0) * 0.08; y0 -= pad; y1 += pad;
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R), Y = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  ctx.strokeStyle = "#e4e7ec"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    ctx.beginPath(); ctx.moveTo(L, Y(y)); ctx.lineTo(W - R, Y(y)); ctx.stroke();
    ctx.fillText(y.toPrecision(3), 4, Y(y) + 4);
  }
  const xticks = [...new Set([0, 1, 2, 3, 4].map(i => Math.round(x0 + (x1 - x0) * i / 4)))];
  for (const x of xticks) ctx.fillText(String(x), X(x) - 8, H - B + 16);
  ctx.fillText(t("step"), W - R - 28, H - 4);
  let lx = L + 6;
  series.forEach((s, i) => {
    ctx.strokeStyle = ctx.fillStyle = COLORS[i % COLORS.length]; ctx.lineWidth = 2;
    ctx.beginPath();
    s.points.forEach((p, k) => (k ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
    ctx.stroke();
    if (s.points.length < 40) {
      s.points.forEach(p => { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 2.5, 0, 7); ctx.fill(); });
    }
    ctx.fillRect(lx, T + 2, 10, 3); ctx.fillStyle = "#344054"; ctx.fillText(s.name, lx + 14, T + 8);
    lx += ctx.measureText(s.name).width + 34;
  });
  canvas.dataset.points = String(pts.length);
}

function seriesOf(curves, key, splits) {
  const out = [];
  for (const [run, bySplit] of Object.entries(curves)) {
    for (const split of splits) {
      const rows = (bySplit[split] || []).filter(r => key in r);
      const name = (run === "run" ? "" : run + " ") + split;
      if (rows.length) out.push({name: name, points: rows.map(r => [r.step, r[key]])});
    }
  }
  return out;
}

function jobPage() {
  const box = document.getElementById("job");
  const id = box.dataset.job;
  let status = box.dataset.status;
  const update = async () => {
    const [j, log, curves] = await Promise.all([
      getJSON("/api/jobs/" + id),
      fetch("/api/jobs/" + id + "/log?lines=200", {credentials: "same-origin"}).then(r => r.text()),
      getJSON("/api/jobs/" + id + "/curves")]);
    setStatus(document.getElementById("status"), j.status);
    document.getElementById("progress").textContent = fmtSteps(j.progress, stepUnit(j));
    document.getElementById("eta").textContent = fmtEta(j);
    document.getElementById("bar").style.width = ((j.progress.fraction || 0) * 100) + "%";
    const pre = document.getElementById("log");
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = log;
    if (atEnd) pre.scrollTop = pre.scrollHeight;
    if (document.getElementById("chart-loss")) {  // a sweep shows its table instead
      drawChart(document.getElementById("chart-loss"), seriesOf(curves, "loss", ["train", "valid"]), "loss");
      const pretrain = j.command === "pretrain";
      const fallback = j.config.task === "multilabel" ? "f1_micro" : "accuracy";
      const metric = pretrain ? "mlm_acc" : (j.config.metric || fallback);
      document.getElementById("metric-caption").textContent = t("{metric} by step", {metric: metric});
      const splits = pretrain ? ["train", "valid"] : ["valid"];
      drawChart(document.getElementById("chart-metric"), seriesOf(curves, metric, splits), metric);
    }
    if (j.status !== status) {  // buttons and produced models change with the state: redraw the page once
      status = j.status;
      location.reload();
      return false;
    }
    if (FINISHED.includes(j.status)) return false;  // nothing changes any more
  };
  const pre = document.getElementById("log");
  pre.scrollTop = pre.scrollHeight;  // the newest lines, as a terminal shows them
  update().catch(() => {});
  every(1500, update);
}

function newJobPage() {
  const form = document.getElementById("job-form");
  const presets = JSON.parse(form.dataset.presets || "{}");
  for (const b of form.querySelectorAll("[data-preset]")) {
    b.addEventListener("click", () => {
      const values = presets[b.dataset.preset];
      const select = form.elements["preset"];
      if (select) select.value = b.dataset.preset;
      for (const [k, v] of Object.entries(values)) {
        const el = form.elements[k];
        if (!el) continue;
        if (el.type === "checkbox") el.checked = !!v; else el.value = String(v);
        el.closest(".field").classList.add("filled");
        setTimeout(() => el.closest(".field").classList.remove("filled"), 1200);
      }
      for (const c of form.querySelectorAll("[data-preset]")) c.classList.toggle("on", c === b);
    });
  }
  const select = form.elements["preset"];  // the dropdown fills the fields as the chips do
  if (select) select.addEventListener("change", () => {
    const chip = form.querySelector('[data-preset="' + select.value + '"]');
    if (chip) chip.click();
  });
  const toggle = () => {
    const method = form.elements["method"];
    for (const n of ["lora_rank", "lora_alpha"]) {
      const f = document.getElementById("field-" + n);
      if (f && method) f.hidden = method.value !== "lora";
    }
    const mode = form.querySelector('input[name="valid_mode"]:checked');
    if (mode) {
      const dev = mode.value === "dev";
      document.getElementById("field-dev").hidden = !dev;
      document.getElementById("field-valid_ratio").hidden = dev;
    }
  };
  form.addEventListener("change", toggle);
  toggle();
}

function comparePage() {
  const box = document.getElementById("compare-curves");
  if (!box) return;
  const curves = JSON.parse(box.dataset.curves), names = JSON.parse(box.dataset.names);
  // the end of a name tells models apart ("… step-000004 seed-1"); the legend has room for a few words each
  const short = n => n.length > 30 ? "…" + n.slice(-29) : n;
  const series = key => curves.map((c, i) => ({name: short(names[i]), points: c[key]})).filter(s => s.points.length);
  drawChart(document.getElementById("chart-compare-metric"), series("metric"), "metric");
  drawChart(document.getElementById("chart-compare-loss"), series("loss"), "loss");
}

function modelPage() {
  const predict = document.getElementById("predict");
  if (predict) predict.form.addEventListener("submit", () => {
    predict.textContent = t("Classifying… (the first time loads the model)"); predict.disabled = true;
  });
  const ship = document.getElementById("ship");
  if (!ship || !["starting", "ready"].includes(ship.dataset.state)) return;
  every(1500, async () => {
    const ep = await getJSON("/api/models/" + ship.dataset.model + "/endpoint");
    const state = document.getElementById("endpoint-state");
    if (ep.state === "stopped" || ep.state === "none") { location.reload(); return false; }
    setStatus(state, ep.state);
    const ready = ep.state === "ready";
    state.classList.replace(ready ? "ready" : "starting", ready ? "succeeded" : "running");
    if (ep.metrics) document.getElementById("endpoint-metrics").textContent = JSON.stringify(ep.metrics, null, 1);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  for (const f of document.querySelectorAll("form[data-confirm]")) {  // a question before what cannot be undone
    f.addEventListener("submit", e => { if (!confirm(f.dataset.confirm)) e.preventDefault(); });
  }
  const page = document.body.dataset.page;
  const box = document.getElementById("machine");
  if (box) machine(box);
  if (page === "jobs") jobsPage();
  if (page === "job") jobPage();
  if (page === "new-job") newJobPage();
  if (page === "compare") comparePage();
  if (page === "model") modelPage();
});
