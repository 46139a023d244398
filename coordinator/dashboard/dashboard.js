// The fleetlora coordinator dashboard: renders /api/events (server-sent events) snapshots.
// Our own code, no library: the charts are inline SVG (lineChart below), so the page fetches nothing
// from the internet and works on an air-gapped coordinator.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => (token ? `${path}?token=${encodeURIComponent(token)}` : path);
const $ = (id) => document.getElementById(id);
const COLORS = ["#2f7de1", "#e1572f", "#2fa36b", "#9b51e0", "#d4a017", "#6b7385", "#e13fa0", "#1aa7b8"];
let last = null;

function ago(ts, now) {
  if (ts === null || ts === undefined) return "never";
  const s = Math.max(0, now - ts);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}
const clock = (ts) => new Date(ts * 1000).toLocaleTimeString();
const fmt = (v, digits = 3) => (v === null || v === undefined ? "–" : Number(v).toPrecision(digits));
const bytes = (v) => (v >= 1e6 ? `${(v / 1e6).toFixed(2)} MB` : `${(v / 1e3).toFixed(1)} kB`);

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function badge(state) {
  const span = document.createElement("span");
  span.className = `badge ${state}`;
  span.textContent = state;
  return span;
}

// A line chart: series = [{name, points: [[x, y], ...]}]; one <circle class="pt"> per point.
function lineChart(id, title, series, yFormat = (v) => fmt(v, 3), empty = "no rounds yet") {
  const el = $(id);
  const W = 400, H = 180, L = 48, R = 8, T = 8, B = 22;
  const all = series.flatMap((s) => s.points);
  let svg = `<svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none" role="img" aria-label="${title}">`;
  if (!all.length) {
    svg += `<text class="empty" x="${W / 2}" y="${H / 2}" text-anchor="middle">${empty}</text>`;
  } else {
    const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
    const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const py = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
    for (let i = 0; i <= 4; i++) {
      const y = y0 + ((y1 - y0) * i) / 4;
      svg += `<line class="grid" x1="${L}" x2="${W - R}" y1="${py(y)}" y2="${py(y)}"/>`;
      svg += `<text x="${L - 4}" y="${py(y) + 3}" text-anchor="end">${yFormat(y)}</text>`;
    }
    const step = Math.max(1, Math.ceil((x1 - x0) / 8));
    for (let x = Math.ceil(x0); x <= x1; x += step) {
      svg += `<text x="${px(x)}" y="${H - 6}" text-anchor="middle">${x}</text>`;
    }
    svg += `<line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/>`;
    svg += `<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`;
    series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      const d = s.points.map((p, j) => `${j ? "L" : "M"}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join("");
      svg += `<path d="${d}" fill="none" stroke="${color}" stroke-width="1.5"/>`;
      for (const p of s.points) {
        svg += `<circle class="pt" data-series="${s.name}" cx="${px(p[0])}" cy="${py(p[1])}" r="2.5" fill="${color}">`
          + `<title>${s.name}, round ${p[0]}: ${yFormat(p[1])}</title></circle>`;
      }
    });
  }
  svg += "</svg>";
  const legend = series.map((s, i) => `<span><i style="background:${COLORS[i % COLORS.length]}"></i>${s.name}</span>`);
  el.innerHTML = `<h3>${title}</h3>${svg}<div class="legend">${legend.join("")}</div>`;
}

// "divergence/base_model.model.encoder.layer.0.attention.self.query" -> "layer.0.attention.self.query"
const layerName = (key) => { const name = key.slice(11); const at = name.indexOf("layer."); return at < 0 ? name : name.slice(at); };

const curve = (curves, key, get = (c) => c[key]) =>
  curves.filter((c) => typeof get(c) === "number").map((c) => [c.round, get(c)]);

function renderCharts(curves) {
  lineChart("chart-accuracy", "Accuracy per round", [
    { name: "devices (federated)", points: curve(curves, "fed_eval_accuracy") },
    { name: "server (--eval-data)", points: curve(curves, "eval_accuracy") },
  ]);
  lineChart("chart-loss", "Loss per round", [
    { name: "devices (federated)", points: curve(curves, "fed_eval_loss") },
    { name: "server (--eval-data)", points: curve(curves, "eval_loss") },
    { name: "local training", points: curve(curves, "train_loss") },
  ]);
  lineChart("chart-bytes", "Bytes per round", [
    { name: "up (updates)", points: curve(curves, "bytes_up") },
    { name: "down (global)", points: curve(curves, "bytes_down") },
  ], bytes);
  const keys = new Set(curves.flatMap((c) => Object.keys(c.aggregation || {})));
  const layers = [...keys].filter((k) => k.startsWith("divergence/")).sort();
  lineChart("chart-divergence", "Divergence from the exact average (mean and per layer)", [
    { name: "mean", points: curve(curves, "divergence", (c) => (c.aggregation || {}).divergence) },
    ...layers.map((k) => ({ name: layerName(k), points: curve(curves, k, (c) => (c.aggregation || {})[k]) })),
  ]);
  const method = [...keys].filter((k) => k !== "divergence" && !k.startsWith("divergence/")).sort();
  lineChart("chart-method", "Method diagnostics (FedRPCA, FLoRA-NA, ...)",
    method.map((k) => ({ name: k, points: curve(curves, k, (c) => (c.aggregation || {})[k]) })),
    (v) => fmt(v, 3), curves.length ? "this method records none" : "no rounds yet");
}

function render(s) {
  last = s;
  $("run").textContent = s.run;
  $("method").textContent = s.method;
  const r = s.round;
  $("round-number").textContent = r.number;
  $("round-total").textContent = r.total;
  $("round-done").textContent = r.done ? "(run finished)" : "";
  const expected = r.sampled || r.received || 1;
  $("round-bar").style.width = `${Math.min(100, (100 * r.received) / expected)}%`;
  $("round-sampled").textContent = r.sampled === null ? "open fleet" : r.sampled;
  $("round-received").textContent = r.received;
  const refused = Object.entries(r.refused);
  $("round-refused").textContent = refused.length ? refused.map(([k, v]) => `${k} ${v}`).join(", ") : "none";
  $("round-extensions").textContent = r.extensions;
  const counts = $("state-counts");
  counts.replaceChildren(...Object.entries(s.states).filter(([, n]) => n).map(([k, n]) => {
    const b = badge(k);
    b.textContent = `${n} ${k}`;
    return b;
  }));
  const body = $("devices").tBodies[0];
  body.replaceChildren();
  for (const d of s.devices) {
    const row = body.insertRow();
    row.dataset.client = d.client;
    cell(row, d.client, "client");
    cell(row, d.profile || "–", "profile");
    cell(row, "", "state").appendChild(badge(d.state));
    cell(row, d.trail.map((t) => t[1]).join(" → "), "trail");
    cell(row, ago(d.last_seen, s.now), "seen");
    cell(row, d.plan.steps ?? "–", "steps");
    cell(row, d.plan.heads ? `heads ${d.plan.heads.join(",")}` : d.plan.rank ? `rank ${d.plan.rank}` : "–", "rank");
    cell(row, d.compute_s === null ? "–" : `${d.compute_s.toFixed(2)} s`, "compute");
  }
  const refusals = $("refusals").tBodies[0];
  refusals.replaceChildren();
  for (const f of s.refusals) {
    const row = refusals.insertRow();
    row.dataset.reason = f.reason;
    cell(row, clock(f.ts));
    cell(row, f.client || "?", "client");
    cell(row, f.reason, "reason");
    cell(row, f.message, "message");
  }
  const total = Object.entries(s.refused_total);
  $("refused-total").textContent = total.length ? `(run: ${total.map(([k, v]) => `${k} ${v}`).join(", ")})` : "";
  renderCharts(s.curves);
  tick();
}

function tick() {  // the deadline counts down between pushes
  if (!last) return;
  const r = last.round;
  const skew = last.now - Date.now() / 1000;
  const left = r.deadline - (Date.now() / 1000 + skew);
  $("round-deadline").textContent = r.done ? "–" : left > 0 ? `${left.toFixed(0)} s` : "due (waiting for a quorum)";
}

function connect() {
  const events = new EventSource(withToken("api/events"));
  events.onopen = () => { $("connection").textContent = "live"; $("connection").className = "badge live"; };
  events.onmessage = (e) => render(JSON.parse(e.data));
  events.onerror = () => { $("connection").textContent = "reconnecting…"; $("connection").className = "badge offline"; };
}

for (const [id, path] of [["adapter-link", "adapter.zip"], ["api-link", "api/state"], ["metrics-link", "metrics"]]) {
  $(id).href = withToken(path);
}
setInterval(tick, 1000);
connect();
