// The monitor page: polls the JSON endpoints every 2 s and redraws tables and Chart.js charts.
"use strict";

const REFRESH_MS = 2000;
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf"];
const charts = {};
let shownPipeline = null;

async function getJSON(path) {
  const response = await fetch(path, {cache: "no-store"});
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function secs(summary, field) {
  return summary ? summary[field].toFixed(3) : "-";
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function kinds(failures) {
  const parts = Object.entries(failures).map(([kind, n]) => `${kind} ${n}`);
  return parts.length ? ` (${parts.join(", ")})` : "";
}

function fillStages(stages) {
  const body = document.querySelector("#stage-table tbody");
  body.replaceChildren();
  for (const s of stages) {
    const row = document.createElement("tr");
    row.dataset.stage = s.name;
    cell(row, s.name, "text");
    cell(row, s.runs);
    cell(row, s.succeeded);
    cell(row, `${s.failed}${kinds(s.failures)}`, s.failed ? "bad" : "");
    cell(row, s.retries);
    cell(row, s.skipped);
    cell(row, s.cache_hits);
    for (const q of ["p50", "p95", "p99", "max"]) cell(row, secs(s.runtime, q));
    cell(row, secs(s.queue_wait, "p50"));
    cell(row, `${s.prompt_tokens}/${s.completion_tokens}`);
    cell(row, s.throughput_per_min.toFixed(0));
    body.appendChild(row);
  }
}

function fillPipelines(pipelines) {
  const body = document.querySelector("#pipeline-table tbody");
  body.replaceChildren();
  for (const p of pipelines) {
    const row = document.createElement("tr");
    row.dataset.pipeline = p.name;
    cell(row, p.name, "text");
    cell(row, p.runs);
    cell(row, p.succeeded);
    cell(row, `${p.failed}${kinds(p.failures)}`, p.failed ? "bad" : "");
    cell(row, p.retries);
    for (const q of ["p50", "p95", "p99"]) cell(row, secs(p.runtime, q));
    body.appendChild(row);
  }
}

function fillErrors(groups) {
  const body = document.querySelector("#error-table tbody");
  body.replaceChildren();
  for (const g of groups) {
    const latest = g.latest[0] || {job_id: "", message: ""};
    const row = document.createElement("tr");
    cell(row, g.stage, "text");
    cell(row, g.kind, "text");
    cell(row, g.count);
    cell(row, latest.job_id, "text");
    cell(row, latest.message.slice(0, 120), "text");
    body.appendChild(row);
  }
}

function chart(id, type, data, options) {
  if (charts[id]) {
    charts[id].data = data;
    charts[id].update("none");
    return;
  }
  charts[id] = new Chart(document.getElementById(id), {
    type, data,
    options: Object.assign({animation: false, responsive: true, maintainAspectRatio: true,
                            plugins: {legend: {position: "bottom", labels: {boxWidth: 12}}}}, options || {}),
  });
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", second: "2-digit"});
}

function drawSeries(series) {
  const names = Object.keys(series.stages);
  const points = names.length ? series.stages[names[0]] : [];
  const labels = points.map(p => clock(p.t));
  const dataset = (name, i, values) => ({label: name, data: values, borderColor: COLOURS[i % COLOURS.length],
    backgroundColor: COLOURS[i % COLOURS.length], spanGaps: true, pointRadius: 3});
  chart("latency", "line", {labels, datasets: names.map((n, i) =>
    dataset(n, i, series.stages[n].map(p => p.mean_seconds)))}, {scales: {y: {title: {display: true, text: "s"}}}});
  chart("throughput", "bar", {labels, datasets: names.map((n, i) =>
    dataset(n, i, series.stages[n].map(p => p.runs)))}, {scales: {x: {stacked: true}, y: {stacked: true}}});
}

function drawErrors(stages) {
  const failing = stages.filter(s => s.failed > 0);
  const allKinds = [...new Set(failing.flatMap(s => Object.keys(s.failures)))].sort();
  chart("errors", "bar", {labels: failing.map(s => s.name), datasets: allKinds.map((kind, i) => ({
    label: kind, data: failing.map(s => s.failures[kind] || 0), backgroundColor: COLOURS[(i + 3) % COLOURS.length]}))},
    {scales: {x: {stacked: true}, y: {stacked: true, ticks: {precision: 0}}}});
}

function drawQueues(depths) {
  const queues = Object.keys(depths);
  document.getElementById("queue-box").style.height = `${60 + 16 * queues.length}px`;  // a label per queue
  chart("queues", "bar", {labels: queues, datasets: [{label: "messages waiting", data: queues.map(q => depths[q]),
    backgroundColor: "#5b8def"}]}, {indexAxis: "y", maintainAspectRatio: false,
    scales: {x: {ticks: {precision: 0}}, y: {ticks: {autoSkip: false, font: {size: 10}}}}});
}

async function drawGraph(name, stages) {
  if (!name) return;
  const box = document.getElementById("pipeline-graph");
  if (shownPipeline !== name) {
    const response = await fetch(`/api/graph/${encodeURIComponent(name)}.svg`);
    box.innerHTML = await response.text();
    box.dataset.pipeline = name;
    shownPipeline = name;
  }
  const byName = Object.fromEntries(stages.map(s => [s.name, s]));
  for (const node of box.querySelectorAll("g.node[id^='stage.']")) {
    const stage = node.id.split(".")[1];
    const figures = byName[stage];
    const shape = node.querySelector("path, polygon, ellipse");
    if (!figures || !shape) continue;
    shape.setAttribute("fill", figures.failed ? "#f9d6d3" : "#d4f0d4");
    let title = node.querySelector("title");
    if (title) title.textContent = `${stage}: ${figures.runs} runs, ${figures.failed} failed, p50 ${secs(figures.runtime, "p50")} s`;
  }
}

function fillPipelineSelect(pipelines, stats) {
  const select = document.getElementById("pipeline-select");
  if (select.options.length === 0) {
    for (const p of pipelines) select.add(new Option(p.pipeline, p.pipeline));
    const busiest = [...stats.pipelines].sort((a, b) => b.runs - a.runs)[0];
    if (busiest) select.value = busiest.name;
    select.addEventListener("change", () => refresh());
  }
  return select.value;
}

function fillJobs(jobs) {
  const list = document.getElementById("jobs");
  list.replaceChildren(...jobs.slice(0, 20).map(job => {
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.href = `/api/trace/${job}`;
    link.textContent = job;
    item.appendChild(link);
    return item;
  }));
}

let pipelineList = null;

async function refresh() {
  try {
    const [stats, series, depths, jobs] = await Promise.all([
      getJSON("/api/stats"), getJSON("/api/series?buckets=60"), getJSON("/api/queues"), getJSON("/api/jobs")]);
    pipelineList = pipelineList || await getJSON("/api/pipelines");
    fillStages(stats.stages);
    fillPipelines(stats.pipelines);
    fillErrors(stats.errors);
    drawSeries(series);
    drawErrors(stats.stages);
    drawQueues(depths);
    await drawGraph(fillPipelineSelect(pipelineList, stats), stats.stages);
    fillJobs(jobs);
    const runs = stats.stages.reduce((n, s) => n + s.runs, 0);
    document.getElementById("status").textContent =
      `${stats.stages.length} stages, ${runs} stage runs, updated ${clock(stats.generated_at)}`;
    document.body.dataset.ready = "1";
  } catch (error) {
    document.getElementById("status").textContent = `error: ${error.message}`;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
