// The dashboard page: polls the JSON API (trainer/dashboard/app.py) every POLL_MS and redraws
// with Plotly. Curves grow by the metrics lines read since the last poll.
"use strict";

const POLL_MS = 2000;
const state = {
  runs: [],          // summaries from /api/runs
  selected: new Set(),
  focus: null,       // the run whose config, samples and log the other tabs show
  series: {},        // run id -> {next: line count read, rows: [...]}
};

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function post(path, body) {
  return api(path, {method: "POST", headers: {"Content-Type": "application/json"},
                    body: JSON.stringify(body || {})});
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  });
  children.forEach(c => node.append(c));
  return node;
}

const enc = id => id.split("/").map(encodeURIComponent).join("/");

// --- the list of runs -------------------------------------------------------------------------

function drawRuns() {
  const list = document.getElementById("runs");
  list.replaceChildren(...state.runs.map(run => {
    const box = el("input", {type: "checkbox", class: "pick",
                             onchange: e => {
                               if (e.target.checked) { state.selected.add(run.id);
                                                       state.focus = run.id; }
                               else state.selected.delete(run.id);
                               refreshSelection(); }});
    box.checked = state.selected.has(run.id);
    const step = run.last.step !== undefined ? `step ${run.last.step}` : "";
    const of = run.steps ? ` / ${run.steps}` : "";
    const line = el("div", {class: "line"}, el("span", {class: `state ${run.state}`}, run.state),
                    el("span", {class: "muted"}, step + (step ? of : "")));
    if (run.state === "running")
      line.append(el("button", {class: "small stop", onclick: () => act(run.id, "stop")}, "stop"));
    if ((run.state === "stopped" || run.state === "failed") && run.launched)
      line.append(el("button", {class: "small resume", onclick: () => act(run.id, "resume")},
                     "resume"));
    const item = el("li", {class: "run", "data-id": run.id, "data-state": run.state},
                    el("label", {}, box, " ", el("span", {class: "name"}, run.id)), line);
    if (run.status && run.status.error) item.append(el("div", {class: "error"}, run.status.error));
    return item;
  }));
}

async function act(id, what) {
  try { await post(`/api/runs/${enc(id)}/${what}`); }
  catch (e) { alert(`${what} ${id}: ${e.message}`); }
  poll();
}

function drawModels(models) {
  document.getElementById("models").replaceChildren(
      ...models.map(m => el("li", {class: "model"}, m)));
  const source = document.getElementById("chat-source");
  const current = source.value;
  const options = [...state.runs.map(r => ["run:" + r.id, "run " + r.id]),
                   ...models.map(m => ["model:" + m, "folder " + m])];
  if (options.map(o => o[0]).join() !== [...source.options].map(o => o.value).join()) {
    source.replaceChildren(...options.map(([v, t]) => el("option", {value: v}, t)));
    if (options.some(o => o[0] === current)) source.value = current;
  }
}

// --- curves -----------------------------------------------------------------------------------

const GROUPS = {eval_loss: "loss"};  // metrics drawn on another's axes
// the charts first on the page; the others (an objective's own metrics...) follow by name
const FIRST = ["loss", "lr", "tokens_per_sec", "mfu", "padding_ratio", "grad_norm"];
const chartOf = name => GROUPS[name] || name;

async function fetchMetrics(id) {
  const s = state.series[id] || (state.series[id] = {next: 0, rows: []});
  const got = await api(`/api/runs/${enc(id)}/metrics?since=${s.next}`);
  s.rows.push(...got.rows);
  s.next = got.next;
}

function drawCharts() {
  const ids = [...state.selected];
  const charts = {};
  ids.forEach(id => (state.series[id] || {rows: []}).rows.forEach(row => {
    Object.keys(row).forEach(k => {
      if (k === "step" || k === "note" || typeof row[k] !== "number") return;
      const chart = chartOf(k);
      ((charts[chart] = charts[chart] || {})[`${id} ${k}`] =
          charts[chart][`${id} ${k}`] || {x: [], y: [], name: ids.length > 1 ? `${id}: ${k}` : k,
                                         mode: "lines+markers", marker: {size: 3}});
      charts[chart][`${id} ${k}`].x.push(row.step);
      charts[chart][`${id} ${k}`].y.push(row[k]);
    });
  }));
  const holder = document.getElementById("charts");
  const rank = name => { const i = FIRST.indexOf(name); return i < 0 ? FIRST.length : i; };
  const names = Object.keys(charts).sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  [...holder.children].forEach(c => { if (!names.includes(c.dataset.metric)) c.remove(); });
  names.forEach(name => {
    let div = document.getElementById("chart-" + name);
    if (!div) {
      div = el("div", {id: "chart-" + name, class: "chart", "data-metric": name});
      holder.append(div);
    }
    Plotly.react(div, Object.values(charts[name]),
                 {title: {text: name, font: {size: 13}, x: 0.02, xanchor: "left"},
                  margin: {t: 30, r: 10, b: 30, l: 50},
                  xaxis: {title: {text: "step"}}, legend: {font: {size: 10}}},
                 {displaylogo: false, responsive: true});
  });
}

// --- config, samples --------------------------------------------------------------------------

async function drawDetails() {
  const ids = [...state.selected];
  const diff = document.getElementById("diff");
  if (ids.length > 1) {
    const q = ids.map(i => "ids=" + encodeURIComponent(i)).join("&");
    const {differences} = await api("/api/compare?" + q);
    diff.replaceChildren(el("tr", {}, el("th", {}, "key"), ...ids.map(i => el("th", {}, i))),
        ...Object.entries(differences).map(([k, v]) => el("tr", {}, el("td", {}, k),
            ...ids.map(i => el("td", {}, JSON.stringify(v[i]))))));
  } else {
    diff.replaceChildren(el("tr", {}, el("td", {class: "muted"}, "select two runs or more")));
  }
  const first = state.selected.has(state.focus) ? state.focus : ids[ids.length - 1];
  document.getElementById("config-of").textContent = first || "-";
  document.getElementById("config").textContent = first ?
      JSON.stringify(await api(`/api/runs/${enc(first)}/config`), null, 1) : "";
  const samples = first ? await api(`/api/runs/${enc(first)}/samples`) : [];
  document.getElementById("samples").replaceChildren(...(samples.length ? samples.map(s =>
      el("div", {class: "sample"}, el("h3", {}, `step ${s.step}`), el("pre", {}, s.prompt + s.text)))
      : [el("p", {class: "muted"}, first ? "no samples yet" : "select a run")]));
  document.getElementById("log").textContent =
      first ? (await api(`/api/runs/${enc(first)}/log`)).log : "";
}

function refreshSelection() {
  const ids = [...state.selected];
  document.getElementById("selection").textContent =
      ids.length ? "Showing " + ids.join(", ") : "No run selected.";
  drawCharts();
  drawDetails().catch(() => {});
}

// --- polling ------------------------------------------------------------------------------------

async function poll() {
  try {
    const got = await api("/api/runs");
    document.getElementById("root").textContent = got.root;
    state.runs = got.runs;
    const known = new Set(got.runs.map(r => r.id));
    [...state.selected].forEach(id => { if (!known.has(id)) state.selected.delete(id); });
    drawRuns();
    drawModels(got.models);
    await Promise.all([...state.selected].map(fetchMetrics));
    drawCharts();
    const tab = document.querySelector("nav button.active").dataset.tab;
    if (tab === "config" || tab === "samples") await drawDetails();
  } catch (e) {
    document.getElementById("selection").textContent = "dashboard unreachable: " + e.message;
  }
}

// --- launch and chat ----------------------------------------------------------------------------

async function loadRecipes() {
  const {recipes} = await api("/api/recipes");
  document.getElementById("recipe").replaceChildren(
      ...recipes.map(r => el("option", {value: r}, r)));
  if (recipes.includes("tiny.py")) document.getElementById("recipe").value = "tiny.py";
  loadFields();
}

// the recipe's settings as inputs; the ones edited become overrides
async function loadFields() {
  const recipe = document.getElementById("recipe").value;
  const arg = document.getElementById("recipe-arg").value.trim();
  const error = document.getElementById("fields-error");
  error.textContent = "";
  try {
    const {fields} = await api(`/api/recipes/${encodeURIComponent(recipe)}?arg=` +
                               encodeURIComponent(arg));
    document.getElementById("fields").replaceChildren(...Object.entries(fields).map(([k, v]) =>
        el("tr", {"data-key": k}, el("td", {}, k),
           el("td", {}, el("input", {class: "field", "data-key": k, "data-default": v,
                                     value: v})))));
    filterFields();
  } catch (e) {
    document.getElementById("fields").replaceChildren();
    error.textContent = e.message;
  }
}

function filterFields() {
  const text = document.getElementById("field-filter").value.trim();
  document.querySelectorAll("#fields tr").forEach(
      tr => tr.classList.toggle("hidden", !tr.dataset.key.includes(text)));
}

function editedFields() {
  const out = {};
  document.querySelectorAll("#fields input.field").forEach(input => {
    if (input.value !== input.dataset.default) out[input.dataset.key] = input.value;
  });
  return out;
}

function parseOverrides(text) {
  const out = {};
  for (const line of text.split("\n").map(l => l.trim()).filter(Boolean)) {
    const at = line.indexOf("=");
    if (at < 1) throw new Error(`"${line}": write key=value`);
    out[line.slice(0, at).trim().replace(/^--config\./, "")] = line.slice(at + 1).trim();
  }
  return out;
}

async function launch(event) {
  event.preventDefault();
  const error = document.getElementById("launch-error");
  const busy = document.getElementById("launch-busy");
  error.textContent = "";
  document.getElementById("launch-ok").textContent = "";
  busy.classList.remove("hidden");
  try {
    const got = await post("/api/launch", {
      name: document.getElementById("run-name").value.trim(),
      recipe: document.getElementById("recipe").value,
      arg: document.getElementById("recipe-arg").value.trim(),
      overrides: {...editedFields(),
                  ...parseOverrides(document.getElementById("overrides").value)}});
    document.getElementById("launch-ok").textContent = `launched ${got.id}`;
    state.selected.add(got.id);
    state.focus = got.id;
    poll();
  } catch (e) {
    error.textContent = e.message;
  } finally {
    busy.classList.add("hidden");
  }
}

async function send(event) {
  event.preventDefault();
  const [kind, ...rest] = document.getElementById("chat-source").value.split(":");
  const id = rest.join(":");
  const number = name => Number(document.getElementById(name).value);
  const step = document.getElementById("chat-step").value;
  document.getElementById("chat-error").textContent = "";
  document.getElementById("reply").textContent = "...";
  try {
    const got = await post("/api/chat", {
        [kind]: id, step: step === "" ? null : Number(step),
        prompt: document.getElementById("prompt").value,
        max_new_tokens: number("chat-max"), temperature: number("chat-temperature"),
        top_k: number("chat-top-k"), top_p: number("chat-top-p"), seed: number("chat-seed"),
        chat: document.getElementById("chat-template").checked});
    document.getElementById("reply").textContent = got.text;
    document.getElementById("reply-stats").textContent =
        `${got.tokens} tokens in ${got.seconds.toFixed(2)} s`;
  } catch (e) {
    document.getElementById("reply").textContent = "";
    document.getElementById("chat-error").textContent = e.message;
  }
}

document.querySelectorAll("nav button").forEach(b => b.addEventListener("click", () => {
  document.querySelectorAll("nav button").forEach(x => x.classList.toggle("active", x === b));
  document.querySelectorAll(".tab").forEach(t =>
      t.classList.toggle("hidden", t.id !== "tab-" + b.dataset.tab));
  if (b.dataset.tab === "curves") drawCharts();
  else drawDetails().catch(() => {});
}));
document.getElementById("launch-form").addEventListener("submit", launch);
document.getElementById("recipe").addEventListener("change", loadFields);
document.getElementById("recipe-arg").addEventListener("change", loadFields);
document.getElementById("field-filter").addEventListener("input", filterFields);
document.getElementById("chat-form").addEventListener("submit", send);
loadRecipes();
poll();
setInterval(poll, POLL_MS);
