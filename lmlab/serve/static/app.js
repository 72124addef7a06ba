// lmlab serve: the dashboard (runs, live charts, probes) and the playground (next-token distribution, sampling).
// Plain JavaScript against the server's /api and /v1 endpoints; charts are drawn with uPlot.
"use strict";

const POLL_MS = 2000;
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const CHARTS = [  // one uPlot per figure: the metrics.jsonl keys it draws, per run
  {id: "loss", series: [{key: "train_loss", label: "train"}, {key: "val_loss", label: "val", dots: true},
                        {key: "val_loss", label: "overfitting", dots: true, only: "overfitting", color: "#cc0000"}]},
  {id: "accuracy", series: [{key: "val_accuracy", label: "val", dots: true}]},
  {id: "answers", skills: "exact_match", series: [{key: "ended_turn", label: "ended turn", dash: [2, 3], marks: true}]},
  {id: "rewards", optional: true, series: [{key: "reward", label: "reward (sampled)"},  // --stage rl
                                           {key: "pass_at_g", label: "pass@G", dash: [2, 3]},
                                           {key: "heldout_reward", label: "held-out (greedy)", dots: true}]},
  {id: "lr", series: [{key: "lr", label: "lr"}]},
  {id: "grad_norm", series: [{key: "grad_norm", label: "grad norm"}]},
  {id: "tokens_per_s", series: [{key: "tokens_per_s", label: "tokens/s"}]},
];

const state = {
  runs: [],               // from /api/runs
  shown: null,            // names of the runs on the charts (null: not chosen yet)
  logs: {},               // "run|file" -> {epoch, records}
  charts: {},             // chart id -> {plot, signature}
  colors: {},             // run name -> colour, stable while the page is open
};

// ------------------------------------------------------------------------------------------------------------
// Small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return Number(value).toFixed(digits);
}

function fmtCount(n) {
  if (!Number.isFinite(n)) return "–";
  for (const [unit, size] of [["G", 1e9], ["M", 1e6], ["k", 1e3]]) {
    if (Math.abs(n) >= size) return (n / size).toFixed(2) + unit;
  }
  return String(n);
}

function visible(text) {  // whitespace made visible, as lmlab's terminal output does
  return text.replace(/ /g, "␣").replace(/\n/g, "\\n").replace(/\t/g, "\\t");
}

// ------------------------------------------------------------------------------------------------------------
// The API key (lmlab serve --api-key): asked for once, when the server first answers 401, and kept for the tab

const KEY_STORE = "lmlab-api-key";
const auth = {key: sessionStorage.getItem(KEY_STORE), asking: null, declined: false};

function askForKey(refused) {
  if (auth.asking) return auth.asking;  // the requests refused together share one question
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("api-key");
  document.getElementById("key-error").textContent = refused ? "The server refused that key; try again." : "";
  dialog.dataset.asked = Number(dialog.dataset.asked || 0) + 1;
  auth.asking = new Promise(resolve => {
    dialog.addEventListener("close", () => {
      const key = dialog.returnValue === "ok" ? input.value.trim() : "";
      input.value = "";
      auth.asking = null;
      auth.declined = !key;
      document.getElementById("key-button").hidden = !auth.declined;
      if (key) {
        auth.key = key;
        sessionStorage.setItem(KEY_STORE, key);
      }
      resolve(key);
    }, {once: true});
  });
  dialog.returnValue = "";
  dialog.showModal();
  return auth.asking;
}

async function apiFetch(url, options = {}) {
  for (;;) {
    const sent = auth.key;
    const headers = {...(options.headers || {})};
    if (sent) headers.Authorization = "Bearer " + sent;
    const response = await fetch(url, {...options, headers});
    if (response.status !== 401) return response;
    if (auth.key !== sent) continue;  // a key was entered while this request was out: try it
    if (auth.declined || !await askForKey(Boolean(sent))) return response;
  }
}

async function getJSON(url) {
  const response = await apiFetch(url, {cache: "no-store"});
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

async function postJSON(url, payload, signal) {
  const response = await apiFetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                        body: JSON.stringify(payload), signal});
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error ? body.error.message : response.statusText);
  }
  return response;
}

function colorOf(name) {
  if (!(name in state.colors)) state.colors[name] = COLORS[Object.keys(state.colors).length % COLORS.length];
  return state.colors[name];
}

// ------------------------------------------------------------------------------------------------------------
// Dashboard: the run list

async function pollRuns() {
  try {
    const body = await getJSON("/api/runs");
    state.runs = body.runs;
    document.getElementById("connection").textContent = "";
  } catch (e) {
    document.getElementById("connection").textContent = "server not reachable: " + e.message;
    return;
  }
  if (state.shown === null && state.runs.length) state.shown = new Set(state.runs.slice(0, 4).map(r => r.name));
  renderRuns();
  renderModelChoice();
  renderChatModels();
}

// How a run's val loss was measured: windows of the context length, every val_stride tokens
function measuredWith(run) {
  const block = (run.model || {}).block_size, stride = run.val_stride || block;
  if (!block) return "";
  return stride >= block ? `windows of ${block} tokens, no overlap` : `windows of ${block} tokens every ${stride}`;
}

function renderRuns() {
  const tbody = document.querySelector("#runs tbody");
  document.getElementById("no-runs").hidden = state.runs.length > 0;
  tbody.replaceChildren(...state.runs.map(run => {
    const m = run.model || {};
    const shape = m.arch === "bigram" ? "bigram" : `${m.n_layer}L ${m.n_head}H ${m.n_embd}d, ctx ${m.block_size}`;
    const box = el("input", {type: "checkbox", checked: state.shown && state.shown.has(run.name),
                             onchange: e => toggleRun(run.name, e.target.checked)});
    return el("tr", {"data-run": run.name},
      el("td", {}, box),
      el("td", {}, el("span", {class: "dot", style: `background:${colorOf(run.name)}`}), run.name),
      el("td", {}, el("span", {class: `status ${run.status}`, title: run.error || ""}, run.status),
        run.overfitting_step === null || run.overfitting_step === undefined ? null :
          el("span", {class: "overfit", title: "validation loss rose while training loss fell: the model is " +
                      "memorising its training text; the best checkpoint is the one used"},
             ` overfitting since step ${run.overfitting_step}`)),
      el("td", {class: "num"}, run.step), el("td", {class: "num"}, fmtCount(run.tokens)),
      el("td", {class: "num"}, fmt(run.train_loss)),
      el("td", {class: "num", title: measuredWith(run)}, fmt(run.val_loss)),
      el("td", {class: "num", title: run.best_step === null ? "" : `at step ${run.best_step}`},
         fmt(run.best_val_loss)),
      el("td", {class: "num"}, run.checkpoint_step === null ? "none yet" : run.checkpoint_step),
      el("td", {class: "muted"}, `${run.preset || ""} · ${shape} · ${run.tokenizer || ""} (${run.vocab_size})`));
  }));
  const names = state.runs.map(r => r.name);
  for (const select of ["probe-run", "inside-run", "completions-run"].map(id => document.getElementById(id))) {
    if ([...select.options].map(o => o.value).join("\n") !== names.join("\n")) {  // an open list stays open
      const chosen = select.value;
      select.replaceChildren(...names.map(name => el("option", {value: name, selected: name === chosen}, name)));
    }
  }
}

function toggleRun(name, on) {
  if (on) state.shown.add(name); else state.shown.delete(name);
  refreshCharts();
}

// ------------------------------------------------------------------------------------------------------------
// Dashboard: logs (only the records added since the last poll travel) and charts

async function pollLog(run, file) {
  const key = `${run}|${file}`;
  const have = state.logs[key] || {epoch: 0, records: []};
  const params = new URLSearchParams({run, file, since: have.records.length, epoch: have.epoch});
  const body = await getJSON(`/api/log?${params}`);
  const records = body.start === 0 ? body.records : have.records.concat(body.records);
  state.logs[key] = {epoch: body.epoch, records};
  return body.records.length > 0 || body.start === 0;
}

function seriesPoints(records, xKey, yKey, only, sub) {  // only: a key the record must hold (e.g. overfitting)
  const xs = [], ys = [];  // sub: the entry of an object-valued key to draw (a skill of exact_match)
  for (const r of records) {
    if (only && !r[only]) continue;
    const x = r[xKey], y = sub === undefined ? r[yKey] : (r[yKey] || {})[sub];
    if (typeof x === "number" && typeof y === "number" && Number.isFinite(y)) { xs.push(x); ys.push(y); }
  }
  return [xs, ys];
}

const SKILL_DASH = [undefined, [7, 3], [9, 3, 2, 3], [4, 2], [12, 4]];  // line style per skill; colour per run

function skillSeries(spec, records) {  // one line per key of an object-valued key (the skills of exact_match)
  if (!spec.skills) return [];
  const skills = new Set();
  for (const r of records) {
    const value = r[spec.skills];
    if (value && typeof value === "object") Object.keys(value).forEach(k => skills.add(k));
  }
  return [...skills].sort().map((skill, i) => ({key: spec.skills, sub: skill, label: `${skill} exact match`,
                                                dash: SKILL_DASH[i % SKILL_DASH.length], marks: true}));
}

function chartData(spec, runs, xKey) {
  const tables = [], series = [];
  for (const run of runs) {
    const records = (state.logs[`${run}|metrics`] || {records: []}).records;
    const sft = (state.runs.find(r => r.name === run) || {}).stage === "sft";
    for (const s of skillSeries(spec, records).concat(spec.series)) {
      const points = seriesPoints(records, xKey, s.key, s.only, s.sub);
      if (!points[0].length) continue;
      tables.push(points);
      series.push({run, ...s, label: sft && s.key === "val_loss" && !s.only ? "masked val" : s.label});
    }
  }
  return {data: tables.length ? uPlot.join(tables) : [[]], series};
}

function makePlot(figure, spec, series, xKey, logY) {
  const box = figure.querySelector(".plot");
  box.replaceChildren();
  const opts = {
    width: Math.max(300, box.clientWidth), height: 220,
    scales: {x: {time: false}, y: logY && spec.id === "loss" ? {distr: 3} : {}},
    axes: [{label: {step: "step", tokens: "tokens", elapsed_s: "seconds"}[xKey]}, {size: 60}],
    legend: {live: true},
    cursor: {drag: {x: true, y: false}},
    hooks: {setSelect: [u => { if (u.select.width > 0) u.zoomed = true; }]},  // new data then keeps the zoom
    series: [{label: xKey}].concat(series.map(s => ({
      label: `${s.run} ${s.label}`, stroke: s.color || colorOf(s.run), width: s.dots ? 0 : 1.5, spanGaps: true,
      dash: s.dash,
      paths: s.dots ? () => null : undefined,
      points: s.dots ? {show: true, size: s.only ? 9 : 6, fill: s.color || colorOf(s.run)}
                     : {show: Boolean(s.marks), size: 5, fill: s.color || colorOf(s.run)},
    }))),
  };
  const plot = new uPlot(opts, [[]].concat(series.map(() => [])), box);
  plot.over.addEventListener("dblclick", () => { plot.zoomed = false; });  // uPlot zooms out on a double-click
  return plot;
}

function refreshCharts() {
  const xKey = document.getElementById("x-axis").value;
  const logY = document.getElementById("log-loss").checked;
  const runs = state.runs.map(r => r.name).filter(n => state.shown && state.shown.has(n));
  for (const spec of CHARTS) {
    const figure = document.querySelector(`figure[data-chart="${spec.id}"]`);
    const {data, series} = chartData(spec, runs, xKey);
    if (spec.skills) figure.hidden = !series.length;  // shown once an SFT run has answered
    const signature = JSON.stringify([xKey, logY, series.map(s => [s.run, s.key, s.sub, s.label])]);
    let chart = state.charts[spec.id];
    if (!chart || chart.signature !== signature) {
      if (chart) chart.plot.destroy();
      chart = state.charts[spec.id] = {plot: makePlot(figure, spec, series, xKey, logY), signature};
    }
    if (series.length) chart.plot.setData(data, !chart.plot.zoomed);
    const points = data.slice(1).reduce((n, ys) => n + ys.filter(v => v !== null && v !== undefined).length, 0);
    figure.dataset.points = points;
    if (spec.optional) figure.hidden = points === 0;  // shown once a run logs it (rewards: --stage rl)
    figure.classList.toggle("empty", points === 0);
  }
}

function renderCompletions(run) {  // --stage rl: completions and their rewards at one evaluation, scrubbed by step
  const box = document.getElementById("completions");
  const records = ((state.logs[`${run}|completions`] || {records: []}).records);
  const slider = document.getElementById("completions-step");
  if (!records.length) {
    slider.hidden = true;
    box.replaceChildren(el("p", {class: "muted"}, "No completions: a run of --stage rl writes them at every evaluation."));
    return;
  }
  const follow = slider.hidden || Number(slider.value) === Number(slider.max);  // at the newest: stay there
  slider.hidden = false;
  slider.max = records.length - 1;
  if (follow) slider.value = records.length - 1;
  const r = records[Math.min(Number(slider.value), records.length - 1)];
  const table = (title, rows) => rows && rows.length ? el("div", {class: "probe"}, el("h3", {}, title),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "prompt"), el("th", {}, "completion"),
                                       el("th", {class: "num"}, "reward"))),
       el("tbody", {}, rows.map(c => el("tr", {}, el("td", {}, el("code", {}, visible(c.prompt))),
                                           el("td", {}, el("code", {}, visible(c.completion))),
                                           el("td", {class: "num"}, fmt(c.reward))))))) : null;
  box.replaceChildren(el("p", {class: "muted", id: "completions-at"}, `step ${r.step} (${Number(slider.value) + 1} of ${records.length})`),
                      ...[table("held-out prompts (greedy)", r.held_out), table("a training group (sampled)", r.train)]
                        .filter(Boolean));
}

function renderProbes(run) {
  const box = document.getElementById("probes");
  const records = ((state.logs[`${run}|probes`] || {records: []}).records).filter(r => Array.isArray(r.probes));
  if (!records.length) {
    box.replaceChildren(el("p", {class: "muted"}, "No probes yet: they are recorded at every evaluation."));
    return;
  }
  const prompts = [];
  for (const r of records) for (const p of r.probes) if (!prompts.includes(p.prompt)) prompts.push(p.prompt);
  box.replaceChildren(...prompts.map(prompt => el("div", {class: "probe"},
    el("h3", {}, "prompt ", el("code", {}, visible(prompt))),
    el("table", {},
      el("thead", {}, el("tr", {}, el("th", {class: "num"}, "step"), el("th", {}, "top-5 next tokens"),
                                   el("th", {}, "greedy continuation"))),
      el("tbody", {}, records.map(r => {
        const p = r.probes.find(q => q.prompt === prompt);
        if (!p) return null;
        return el("tr", {},
          el("td", {class: "num"}, r.step),
          el("td", {}, (p.top || []).map(([token, prob]) => el("span", {class: "chip",
              style: `background:linear-gradient(90deg,#cfe3f7 ${(100 * prob).toFixed(1)}%,#f4f4f4 0)`},
              el("code", {}, visible(token)), ` ${(100 * prob).toFixed(1)}%`))),
          el("td", {class: "text"}, el("span", {class: "prompt"}, prompt), p.continuation || ""));
      }))))));
}

// ------------------------------------------------------------------------------------------------------------
// Dashboard: inside the model (inside.jsonl), with a scrubber over the evaluation steps

const SCORES = ["previous_token", "induction", "duplicate_token"];
const HEAD_DASH = [undefined, [7, 3], [2, 3], [9, 3, 2, 3]];  // line style per head; colour per layer
const MAX_DRAWN = 256;  // heatmap positions drawn at most (training records 32; a run from elsewhere may hold more)
const POSITION_STEPS = 5;  // loss-by-position curves: this many steps spread over the run, plus the scrubbed one
const inside = {index: null, follow: true, prompt: 0, charts: {}};

function insideRecords(run) {  // one record per step, in step order
  const byStep = new Map();
  for (const r of (state.logs[`${run}|inside`] || {records: []}).records) {
    if (Number.isInteger(r.step)) byStep.set(r.step, r);
  }
  return [...byStep.values()].sort((a, b) => a.step - b.step);
}

function headKeys(records) {  // the [layer, head] pairs that have scores
  const keys = new Map();
  for (const r of records) {
    ((r.heads || {}).induction || []).forEach((row, layer) => (row || []).forEach((_, head) =>
      keys.set(`${layer}.${head}`, [layer, head])));
  }
  return [...keys.values()].sort((a, b) => a[0] - b[0] || a[1] - b[1]);
}

function score(record, name, layer, head) {
  const value = (((record.heads || {})[name] || [])[layer] || [])[head];
  return typeof value === "number" ? value : null;
}

function spreadSteps(records, index) {  // up to POSITION_STEPS records from first to last, and the scrubbed one
  const picked = new Set();
  const n = records.length;
  for (let i = 0; i < Math.min(n, POSITION_STEPS); i++) {
    picked.add(n <= POSITION_STEPS ? i : Math.round(i * (n - 1) / (POSITION_STEPS - 1)));
  }
  if (index !== null && index < n) picked.add(index);
  return [...picked].sort((a, b) => a - b).map(i => records[i]);
}

function positionColor(fraction) {  // early steps light, late steps dark
  return `hsl(${220 - 180 * fraction}, 70%, ${62 - 30 * fraction}%)`;
}

function insideChart(id, records, index) {  // the series and uPlot data of one chart of the panel
  if (SCORES.includes(id)) {
    const keys = headKeys(records);
    return {x: "step", series: keys.map(([layer, head]) => ({label: `L${layer} H${head}`,
              stroke: COLORS[layer % COLORS.length], dash: HEAD_DASH[head % HEAD_DASH.length]})),
            data: [records.map(r => r.step)].concat(keys.map(([l, h]) => records.map(r => score(r, id, l, h))))};
  }
  if (id === "repeat_loss") {
    const value = (r, key) => typeof (r.repeat_loss || {})[key] === "number" ? r.repeat_loss[key] : null;
    return {x: "step", series: [{label: "first copy", stroke: COLORS[0]}, {label: "second copy", stroke: COLORS[1]}],
            data: [records.map(r => r.step), records.map(r => value(r, "first")), records.map(r => value(r, "second"))]};
  }
  const shown = spreadSteps(records, index).filter(r => Array.isArray((r.loss_by_position || {}).loss));
  const length = Math.max(0, ...shown.map(r => r.loss_by_position.loss.length));
  const current = index !== null ? records[index] : null;
  return {x: "position", series: shown.map((r, i) => ({label: `step ${r.step}`, width: r === current ? 3 : 1.3,
            stroke: positionColor(shown.length > 1 ? i / (shown.length - 1) : 1)})),
          data: [[...Array(length).keys()]].concat(shown.map(r => [...Array(length).keys()].map(
            p => typeof r.loss_by_position.loss[p] === "number" ? r.loss_by_position.loss[p] : null)))};
}

function stepMarker(u) {  // a dashed vertical line at the scrubbed step
  const records = insideRecords(document.getElementById("inside-run").value);
  const record = inside.index !== null ? records[inside.index] : null;
  if (!record) return;
  const x = u.valToPos(record.step, "x", true);
  const ctx = u.ctx;
  ctx.save();
  ctx.strokeStyle = "#555";
  ctx.setLineDash([4, 4]);
  ctx.beginPath();
  ctx.moveTo(x, u.bbox.top);
  ctx.lineTo(x, u.bbox.top + u.bbox.height);
  ctx.stroke();
  ctx.restore();
}

function renderInsideCharts(records, index) {
  for (const figure of document.querySelectorAll("figure[data-inside]")) {
    const id = figure.dataset.inside;
    const {x, series, data} = insideChart(id, records, index);
    const signature = JSON.stringify([x, series]);
    let chart = inside.charts[id];
    if (!chart || chart.signature !== signature) {
      if (chart) chart.plot.destroy();
      const box = figure.querySelector(".plot");
      box.replaceChildren();
      const opts = {
        width: Math.max(300, box.clientWidth), height: 220, scales: {x: {time: false}},
        axes: [{label: x}, {size: 50}], legend: {live: true},
        hooks: x === "step" ? {draw: [stepMarker]} : {},
        series: [{label: x}].concat(series.map(s => ({spanGaps: true, width: 1.5, points: {show: false}, ...s}))),
      };
      chart = inside.charts[id] = {plot: new uPlot(opts, [[]].concat(series.map(() => [])), box), signature};
    }
    chart.plot.setData(data);
    figure.dataset.points = data.slice(1).reduce((n, ys) => n + ys.filter(v => v !== null).length, 0);
    figure.classList.toggle("empty", figure.dataset.points === "0");
  }
}

function drawHeatmap(canvas, rows, size, cell) {
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#f1f1f4";  // the future: nothing attends there
  ctx.fillRect(0, 0, size * cell, size * cell);
  rows.slice(0, size).forEach((row, q) => (row || []).slice(0, q + 1).forEach((value, k) => {
    ctx.fillStyle = `rgba(31, 119, 180, ${Math.max(0, Math.min(100, value)) / 100})`;
    ctx.fillRect(k * cell, q * cell, cell, cell);
  }));
}

function renderAttention(record, tokens, entry) {
  const box = document.getElementById("attention");
  if (!entry || !Array.isArray(entry.percent)) {
    box.replaceChildren(el("p", {class: "muted"}, "No attention recorded at this step (the bigram has none)."));
    return;
  }
  const size = Math.min(tokens.length, MAX_DRAWN);
  const cell = Math.max(4, Math.min(12, Math.floor(216 / Math.max(size, 1))));
  box.replaceChildren(...entry.percent.map((heads, layer) => el("div", {class: "layer"}, (heads || []).map((rows, head) => {
    const canvas = el("canvas", {width: size * cell, height: size * cell, "data-layer": layer, "data-head": head,
                                 "data-percent": JSON.stringify(rows)});
    drawHeatmap(canvas, rows || [], size, cell);
    canvas.addEventListener("mousemove", e => {
      const q = Math.floor(e.offsetY / cell), k = Math.floor(e.offsetX / cell);
      const value = ((rows || [])[q] || [])[k];
      canvas.title = value === undefined ? "" :
        `${visible(tokens[q] || "")} (position ${q}) attends to ${visible(tokens[k] || "")} (position ${k}): ${value}%`;
    });
    const caption = `layer ${layer} head ${head} · induction ${fmt(score(record, "induction", layer, head), 2)}` +
                    ` · previous ${fmt(score(record, "previous_token", layer, head), 2)}`;
    return el("figure", {}, el("figcaption", {}, caption), canvas);
  }))));
}

function renderLens(entry) {
  const layers = (entry && Array.isArray(entry.top)) ? entry.top : [];
  document.querySelector("#lens tbody").replaceChildren(...layers.map((top, i) => el("tr", {"data-layer": i},
    el("td", {}, (i === 0 ? "embeddings" : `after block ${i - 1}`) + (i === layers.length - 1 ? " (the output)" : "")),
    el("td", {}, (top || []).map(([token, prob]) => el("span", {class: "chip", "data-token": token, "data-prob": prob,
        style: `background:linear-gradient(90deg,#cfe3f7 ${(100 * prob).toFixed(1)}%,#f4f4f4 0)`},
      el("code", {}, visible(token)), ` ${(100 * prob).toFixed(1)}%`))))));
}

function renderInside() {
  const run = document.getElementById("inside-run").value;
  const records = insideRecords(run);
  const slider = document.getElementById("inside-step");
  const none = document.getElementById("inside-none");
  none.hidden = records.length > 0;
  none.textContent = run ? `No records inside the model of ${run} yet: they are written at every evaluation ` +
                           "(unless training runs with --no-inside)." : "";
  slider.max = Math.max(0, records.length - 1);
  if (inside.follow || inside.index === null || inside.index >= records.length) inside.index = records.length - 1;
  if (!records.length) inside.index = null;
  slider.value = inside.index === null ? 0 : inside.index;
  const record = inside.index !== null ? records[inside.index] : null;
  document.getElementById("inside-step-label").textContent = record ? `step ${record.step}` : "–";
  renderInsideCharts(records, inside.index);
  if (!record) {
    document.getElementById("attention").replaceChildren();
    renderLens(null);
    return;
  }
  const entries = record.attention || [];
  const select = document.getElementById("inside-prompt");
  const prompts = entries.map(e => String(e.prompt));
  if ([...select.options].map(o => o.value).join("\n") !== prompts.map((_, i) => String(i)).join("\n") ||
      [...select.options].map(o => o.textContent).join("\n") !== prompts.map(visible).join("\n")) {
    select.replaceChildren(...prompts.map((p, i) => el("option", {value: i}, visible(p))));
  }
  inside.prompt = Math.min(inside.prompt, Math.max(0, entries.length - 1));
  select.value = inside.prompt;
  const entry = entries[inside.prompt];
  const tokens = entry && Array.isArray(entry.tokens) ? entry.tokens : [];
  document.getElementById("attention-title").textContent = entry ?
    `Attention at step ${record.step} on "${visible(tokens.join(""))}" (row: the position attending, column: ` +
    "the position attended to)" : `Attention at step ${record.step}`;
  renderAttention(record, tokens, entry);
  const lens = (record.lens || []).find(l => entry && l.prompt === entry.prompt) || (record.lens || [])[inside.prompt];
  document.getElementById("lens-title").textContent = lens ?
    `Logit lens at step ${record.step}: the next token after "${visible(String(lens.prompt))}", read from each layer` :
    `Logit lens at step ${record.step}`;
  renderLens(lens);
}

async function pollInside(run) {
  if (run && await pollLog(run, "inside")) renderInside();
}

async function pollDashboard() {
  await pollRuns();
  if (document.getElementById("dashboard").hidden) return;
  const runs = state.runs.map(r => r.name).filter(n => state.shown && state.shown.has(n));
  const probeRun = document.getElementById("probe-run").value;
  try {
    const changed = await Promise.all(runs.map(run => pollLog(run, "metrics")));
    if (changed.some(Boolean) || Object.keys(state.charts).length === 0) refreshCharts();
    if (probeRun && await pollLog(probeRun, "probes")) renderProbes(probeRun);
    const completionsRun = document.getElementById("completions-run").value;
    if (completionsRun && await pollLog(completionsRun, "completions")) renderCompletions(completionsRun);
    await pollInside(document.getElementById("inside-run").value);
  } catch (e) {
    document.getElementById("connection").textContent = "could not read the logs: " + e.message;
  }
}

// ------------------------------------------------------------------------------------------------------------
// Playground

const play = {request: 0, abort: null, surprisalTimer: null, refreshTimer: null};

function settings() {
  const temperature = Number(document.getElementById("temperature").value);
  const topK = Number(document.getElementById("top-k").value);
  const topP = Number(document.getElementById("top-p").value);
  const seedText = document.getElementById("seed").value.trim();
  return {model: document.getElementById("model").value, prompt: document.getElementById("prompt").value,
          temperature, top_k: topK, top_p: topP, seed: seedText === "" ? null : Number(seedText)};
}

function renderModelChoice() {
  const select = document.getElementById("model");
  const chosen = select.value;
  const usable = state.runs.filter(r => r.checkpoint_step !== null);
  const options = state.runs.map(r => el("option", {value: r.name, disabled: r.checkpoint_step === null},
    r.checkpoint_step === null ? `${r.name} (no checkpoint yet)` : r.name));
  const before = [...select.options].map(o => o.value + o.disabled).join();
  if (before !== options.map(o => o.value + o.disabled).join()) {
    select.replaceChildren(...options);
    const keep = usable.find(r => r.name === chosen) || usable[0];
    if (keep) select.value = keep.name;
    if (!document.getElementById("playground").hidden) refreshDistribution();
  }
}

function showSliderValues() {
  const s = settings();
  document.querySelector('output[for="temperature"]').textContent = s.temperature === 0 ? "0 (greedy)" : s.temperature.toFixed(2);
  document.querySelector('output[for="top-k"]').textContent = s.top_k === 0 ? "off" : String(s.top_k);
  document.querySelector('output[for="top-p"]').textContent = s.top_p >= 1 ? "off" : s.top_p.toFixed(2);
}

function scheduleRefresh() {
  showSliderValues();
  clearTimeout(play.refreshTimer);
  play.refreshTimer = setTimeout(refreshDistribution, 40);
}

async function refreshDistribution(sample = false) {
  const s = settings();
  if (!s.model) return null;
  const id = ++play.request;  // answers to older requests are dropped
  const info = document.getElementById("distribution-info");
  try {
    const response = await postJSON("/api/next", {...s, top: 20, sample});
    const view = await response.json();
    if (id !== play.request) return null;
    renderBars(view, s);
    document.getElementById("model-info").textContent =
      `checkpoint step ${view.checkpoint_step} · vocabulary ${view.vocab_size}`;
    document.getElementById("top-k").max = Math.min(view.vocab_size, 200);
    if (document.getElementById("color-surprisal").checked) scheduleSurprisal();
    return view;
  } catch (e) {
    if (id === play.request) info.textContent = "error: " + e.message;
    return null;
  }
}

function renderBars(view, s) {
  const rows = view.rows;
  const scale = Math.max(...rows.map(r => Math.max(r.probability, r.renormalized)), 1e-9);
  const kept = rows.filter(r => r.kept).length;
  document.getElementById("distribution-info").textContent =
    `next token after ${view.prompt_tokens} prompt tokens: the ${rows.length} most likely of ${view.vocab_size}; ` +
    `${kept} of them can be drawn with temperature ${s.temperature}, top-k ${s.top_k || "off"}, top-p ` +
    `${s.top_p >= 1 ? "off" : s.top_p}`;
  document.getElementById("bars").replaceChildren(...rows.map(r => el("div",
    {class: `bar-row${r.kept ? "" : " dropped"}`, "data-token": r.token, "data-probability": r.probability,
     "data-renormalized": r.renormalized},
    el("code", {class: "token"}, r.token),
    el("div", {class: "bar"},
      el("div", {class: "model", style: `width:${(100 * r.probability / scale).toFixed(2)}%`}),
      el("div", {class: "kept", style: `width:${(100 * r.renormalized / scale).toFixed(2)}%`})),
    el("span", {class: "num"}, `${(100 * r.probability).toFixed(1)}%`),
    el("span", {class: "num renormalized"}, r.kept ? `→ ${(100 * r.renormalized).toFixed(1)}%` : "dropped"))));
}

async function nextToken() {
  const button = document.getElementById("next-token");
  button.disabled = true;
  try {
    const view = await refreshDistribution(true);
    if (!view || !view.sampled) return;
    const picked = view.sampled;
    const prompt = document.getElementById("prompt");
    prompt.value += picked.text;
    document.getElementById("sampled").replaceChildren("sampled ", el("code", {}, visible(picked.text)),
      ` with probability ${(100 * picked.probability).toFixed(1)}% under these settings ` +
      `(${(100 * picked.model_probability).toFixed(1)}% under the model)`);
    await refreshDistribution();
  } finally {
    button.disabled = false;
  }
}

async function* events(response) {  // the chunks of a stream of server-sent events, until [DONE]
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {  // one server-sent event per blank line
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const chunk = JSON.parse(event.slice(6));
      if (chunk.error) throw new Error(chunk.error.message);
      yield chunk;
    }
  }
}

async function generateStream() {
  const s = settings();
  const prompt = document.getElementById("prompt");
  const maxTokens = Number(document.getElementById("max-tokens").value) || 100;
  play.abort = new AbortController();
  document.getElementById("generate").disabled = true;
  document.getElementById("stop").disabled = false;
  const sampled = document.getElementById("sampled");
  sampled.textContent = "generating…";
  try {
    const body = {model: s.model, prompt: s.prompt, max_tokens: maxTokens, temperature: s.temperature,
                  top_p: s.top_p, top_k: s.top_k, stream: true};
    if (s.seed !== null) body.seed = s.seed;
    const response = await postJSON("/v1/completions", body, play.abort.signal);
    for await (const chunk of events(response)) {
      for (const choice of chunk.choices) prompt.value += choice.text;
      prompt.scrollTop = prompt.scrollHeight;
    }
    sampled.textContent = `generated ${maxTokens} tokens`;
  } catch (e) {
    sampled.textContent = e.name === "AbortError" ? "stopped" : "error: " + e.message;
  } finally {
    document.getElementById("generate").disabled = false;
    document.getElementById("stop").disabled = true;
    refreshDistribution();
  }
}

function heat(bits) {  // white for an expected token, through yellow to red for a surprising one (8+ bits)
  const t = Math.max(0, Math.min(1, bits / 8));
  return `rgb(255,${Math.round(255 - 120 * t)},${Math.round(255 - 255 * Math.min(1, 2 * t))})`;
}

function scheduleSurprisal() {
  clearTimeout(play.surprisalTimer);
  play.surprisalTimer = setTimeout(showSurprisal, 150);
}

async function showSurprisal() {
  const box = document.getElementById("surprisal");
  const on = document.getElementById("color-surprisal").checked;
  box.hidden = !on;
  if (!on) return;
  const s = settings();
  try {
    const view = await (await postJSON("/api/surprisal", {model: s.model, text: s.prompt})).json();
    box.replaceChildren(
      el("span", {class: "first", title: "first token: nothing to predict it from"}, view.first),
      ...view.per_token.map(t => el("span", {class: "tok", style: `background:${heat(t.bits)}`,
        title: `${visible(t.text)}: ${t.bits.toFixed(2)} bits\n` +
               t.top.map(([text, p]) => `${visible(text)}  ${(100 * p).toFixed(1)}%`).join("\n")}, t.text)),
      el("div", {class: "muted"}, `${view.tokens} tokens predicted · ${fmt(view.bits_per_token, 3)} ` +
                                  "bits/token on average · hover a token for the model's top-5 predictions there"));
  } catch (e) {
    box.replaceChildren(el("span", {class: "muted"}, "surprisal: " + e.message));
  }
}

// ------------------------------------------------------------------------------------------------------------
// Chat: a conversation with a run fine-tuned on conversations, through /v1/chat/completions

const talk = {messages: [], abort: null};  // the user's and the assistant's messages so far

function renderChatModels() {
  const select = document.getElementById("chat-model");
  const chosen = select.value;
  const usable = state.runs.filter(r => r.checkpoint_step !== null && r.stage === "sft");
  const options = state.runs.map(r => el("option", {value: r.name, disabled: !usable.includes(r)},
    r.checkpoint_step === null ? `${r.name} (no checkpoint yet)` : r.stage !== "sft" ? `${r.name} (a text model)`
                               : r.name));
  if ([...select.options].map(o => o.value + o.disabled).join() !== options.map(o => o.value + o.disabled).join()) {
    select.replaceChildren(...options);
    const keep = usable.find(r => r.name === chosen) || usable[0];
    if (keep) select.value = keep.name;
  }
}

function chatLine(kind, text) {
  const log = document.getElementById("chat-log");
  const line = el("div", {class: `message ${kind}`}, text);
  log.append(line);
  line.scrollIntoView({block: "nearest"});
  return line;
}

async function sendChat(e) {
  e.preventDefault();
  const input = document.getElementById("chat-input");
  const text = input.value;
  if (!text.trim() || talk.abort) return;
  const info = document.getElementById("chat-info");
  const system = document.getElementById("chat-system").value;
  const asked = [...talk.messages, {role: "user", content: text}];
  const body = {model: document.getElementById("chat-model").value, stream: true,
                stream_options: {include_usage: true},
                messages: system ? [{role: "system", content: system}, ...asked] : asked,
                temperature: Number(document.getElementById("chat-temperature").value),
                max_tokens: Number(document.getElementById("chat-max-tokens").value) || 256};
  input.value = "";
  chatLine("user", text);
  const answer = chatLine("assistant", "…");
  talk.abort = new AbortController();
  document.getElementById("chat-send").disabled = true;
  document.getElementById("chat-stop").disabled = false;
  let content = "", finish = null, usage = null, dropped = 0;
  try {
    const response = await postJSON("/v1/chat/completions", body, talk.abort.signal);
    for await (const chunk of events(response)) {
      dropped = chunk.turns_dropped || dropped;
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        content += choice.delta.content || "";
        finish = choice.finish_reason || finish;
      }
      answer.textContent = content;
    }
    if (dropped) {  // as lmlab chat does: the turns left out are forgotten, and said so
      chatLine("note", `the ${dropped} oldest turn${dropped > 1 ? "s" : ""} no longer fit the context and ` +
                       `${dropped > 1 ? "are" : "is"} left out`);
    }
    talk.messages = [...asked.slice(2 * dropped), {role: "assistant", content}];
    info.textContent = `${usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} answer tokens · ` : ""}` +
                       (finish === "stop" ? "the model ended its turn" : "stopped at the most tokens asked for");
  } catch (err) {
    answer.remove();
    info.textContent = err.name === "AbortError" ? "stopped: this turn is not kept" : "error: " + err.message;
  } finally {
    talk.abort = null;
    document.getElementById("chat-send").disabled = false;
    document.getElementById("chat-stop").disabled = true;
  }
}

function resetChat() {
  if (talk.abort) talk.abort.abort();
  talk.messages = [];
  document.getElementById("chat-log").replaceChildren();
  document.getElementById("chat-info").textContent = "a new conversation";
}

// ------------------------------------------------------------------------------------------------------------
// Tabs and start-up

function showTab() {
  const tab = {"#playground": "playground", "#chat": "chat"}[location.hash] || "dashboard";
  for (const name of ["dashboard", "playground", "chat"]) {
    document.getElementById(name).hidden = name !== tab;
    document.getElementById(`tab-${name}`).classList.toggle("active", name === tab);
  }
  if (tab === "playground") {
    refreshDistribution();
  } else if (tab === "chat") {
    renderChatModels();
  } else {
    refreshCharts();
    resizeCharts();  // charts made while the dashboard was hidden had no width to measure
    pollDashboard();
  }
}

function resizeCharts() {
  for (const spec of CHARTS) {
    const chart = state.charts[spec.id];
    const box = document.querySelector(`figure[data-chart="${spec.id}"] .plot`);
    if (chart) chart.plot.setSize({width: Math.max(300, box.clientWidth), height: 220});
  }
  for (const [id, chart] of Object.entries(inside.charts)) {
    const box = document.querySelector(`figure[data-inside="${id}"] .plot`);
    chart.plot.setSize({width: Math.max(300, box.clientWidth), height: 220});
  }
}

function start() {
  window.addEventListener("hashchange", showTab);
  window.addEventListener("resize", resizeCharts);
  document.getElementById("x-axis").addEventListener("change", refreshCharts);
  document.getElementById("log-loss").addEventListener("change", refreshCharts);
  document.getElementById("probe-run").addEventListener("change", e => {
    pollLog(e.target.value, "probes").then(() => renderProbes(e.target.value));
  });
  document.getElementById("completions-run").addEventListener("change", e => {
    document.getElementById("completions-step").hidden = true;  // a new run opens at its newest evaluation
    pollLog(e.target.value, "completions").then(() => renderCompletions(e.target.value));
  });
  document.getElementById("completions-step").addEventListener("input", () => {
    renderCompletions(document.getElementById("completions-run").value);
  });
  document.getElementById("inside-run").addEventListener("change", e => {
    inside.follow = true;
    pollLog(e.target.value, "inside").then(renderInside);
  });
  document.getElementById("inside-step").addEventListener("input", e => {
    inside.index = Number(e.target.value);
    inside.follow = inside.index === Number(e.target.max);
    renderInside();
  });
  document.getElementById("inside-prompt").addEventListener("change", e => {
    inside.prompt = Number(e.target.value);
    renderInside();
  });
  for (const id of ["temperature", "top-k", "top-p"]) document.getElementById(id).addEventListener("input", scheduleRefresh);
  document.getElementById("model").addEventListener("change", () => refreshDistribution());
  document.getElementById("prompt").addEventListener("input", scheduleRefresh);
  document.getElementById("next-token").addEventListener("click", nextToken);
  document.getElementById("generate").addEventListener("click", generateStream);
  document.getElementById("stop").addEventListener("click", () => play.abort && play.abort.abort());
  document.getElementById("color-surprisal").addEventListener("change", showSurprisal);
  document.getElementById("chat-form").addEventListener("submit", sendChat);
  document.getElementById("chat-input").addEventListener("keydown", e => {
    if (e.key === "Enter" && !e.shiftKey) sendChat(e);
  });
  document.getElementById("chat-stop").addEventListener("click", () => talk.abort && talk.abort.abort());
  document.getElementById("chat-reset").addEventListener("click", resetChat);
  document.getElementById("key-button").addEventListener("click", async () => {
    auth.declined = false;
    if (await askForKey(false)) pollDashboard();
  });
  showSliderValues();
  pollRuns().then(showTab);
  setInterval(pollDashboard, POLL_MS);
}

start();
