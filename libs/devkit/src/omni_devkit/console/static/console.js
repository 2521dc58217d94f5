// The Omni console: availability grid (live from the stream), stories, shopper, health.
// Preact + htm from static/vendor: plain ES modules, no build step.
import { html, render, useEffect, useState, useRef } from "/static/vendor/htm-preact-3.1.1.mjs";

const STATUS_TEXT = { in_stock: "in stock", low_stock: "low", out_of_stock: "out" };

async function getJson(path, options) {
  const response = await fetch(path, options);
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function useAvailability() {
  const [grid, setGrid] = useState(null);
  const [live, setLive] = useState("connecting");
  const [latest, setLatest] = useState(null);
  useEffect(() => {
    const source = new EventSource("/api/stream");
    const reload = () => getJson("/api/overview").then(setGrid).catch(() => setLive("inventory unreachable"));
    // Load the grid after the stream has its position: no change falls in between.
    source.addEventListener("ready", () => { setLive("live"); reload(); });
    source.addEventListener("reset", () => reload());
    source.addEventListener("availability", (message) => {
      const change = JSON.parse(message.data);
      setLatest(`${change.sku}@${change.location_id}`);
      setGrid((current) => {
        if (!current) return current;
        const cells = { ...current.cells, [change.sku]: { ...(current.cells[change.sku] || {}) } };
        cells[change.sku][change.location_id] = { available: change.available, status: change.status };
        const skus = current.skus.includes(change.sku) ? current.skus : [...current.skus, change.sku].sort();
        return { ...current, cells, skus, online: { ...current.online, [change.sku]: change.online_available } };
      });
    });
    source.onerror = () => setLive("reconnecting");
    source.onopen = () => setLive("live");
    return () => source.close();
  }, []);
  return { grid, live, latest };
}

function Grid({ grid, latest }) {
  if (!grid) return html`<p class="muted">Waiting for inventory ...</p>`;
  if (grid.error) return html`<p class="skipped">${JSON.stringify(grid.error)}</p>`;
  return html`<div class="scroll"><table data-testid="grid">
    <thead><tr><th>SKU</th>${grid.locations.map((l) => html`<th title=${l.name}>${l.location_id}</th>`)}<th>online</th></tr></thead>
    <tbody>${grid.skus.map((sku) => html`<tr>
      <td class="sku">${sku}</td>
      ${grid.locations.map((l) => {
        const cell = (grid.cells[sku] || {})[l.location_id];
        const key = `${sku}@${l.location_id}`;
        if (!cell) return html`<td><div class="tile none" data-testid=${"cell-" + key} data-status="none">-</div></td>`;
        return html`<td><div class=${"tile " + cell.status + (latest === key ? " flash" : "")}
            data-testid=${"cell-" + key} data-status=${cell.status}>
          ${cell.available}<small>${STATUS_TEXT[cell.status]}</small></div></td>`;
      })}
      <td><div class=${"tile " + ((grid.online[sku] || 0) > 0 ? "in_stock" : "out_of_stock")}
          data-testid=${"online-" + sku}>${grid.online[sku] || 0}<small>web/app</small></div></td>
    </tr>`)}</tbody></table></div>`;
}

function Stories() {
  const [stories, setStories] = useState({});
  const timers = useRef({});
  const titles = {
    1: "A store sells its last unit: web and app see it out of stock",
    2: "Buy online, pick up in store; not collected: cancelled and restocked",
    3: "Bought online, returned in another store: stock up there, one refund",
    7: "Demand lost to stock-outs, biggest first, with revenue",
    4: "A cart left on the web: e-mail or push; bought in store: no reminder",
    5: "Points earned at a till, spent in the app",
    6: "The carrier's ETA slips: the shopper is told",
  };
  const poll = (n) => {
    getJson(`/api/stories/${n}`).then((run) => {
      setStories((s) => ({ ...s, [n]: run }));
      if (run.state === "running") timers.current[n] = setTimeout(() => poll(n), 400);
    });
  };
  const play = (n) => getJson(`/api/stories/${n}`, { method: "POST" }).then(() => poll(n)).catch(() => poll(n));
  return html`<div class="stories">${Object.entries(titles).map(([n, title]) => {
    const run = stories[n];
    return html`<div class="story">
      <button onClick=${() => play(n)} data-testid=${"play-" + n} title="Play">${n}</button>
      <div>${title} ${run ? html`<b class=${run.state}>${run.state}</b>` : ""}
        ${run && run.lines.length ? html`<pre class="narration" data-testid=${"story-" + n}>${run.lines.join("\n")}</pre>` : ""}</div>
    </div>`;
  })}</div>`;
}

function Section({ title, data, render: show }) {
  if (data == null) return "";
  return html`<div><h3 style="font-size:14px;margin:8px 0 2px">${title}</h3>${
    data.skipped ? html`<span class="skipped">skipped: ${data.skipped}</span>`
    : data.missing ? html`<span class="muted">nothing yet</span>`
    : data.error ? html`<span class="failed">${data.error}</span>`
    : show(data)}</div>`;
}

function Shopper() {
  const [shoppers, setShoppers] = useState([]);
  const [chosen, setChosen] = useState(null);
  const [view, setView] = useState(null);
  useEffect(() => { getJson("/api/shoppers").then((list) => { setShoppers(list); setChosen(list[0]?.customer_id); }); }, []);
  useEffect(() => {
    if (!chosen) return undefined;
    let stop = false;
    const load = () => getJson(`/api/shoppers/${chosen}`).then((v) => { if (!stop) setView(v); }).catch(() => {});
    load();
    const timer = setInterval(load, 2000);
    return () => { stop = true; clearInterval(timer); };
  }, [chosen]);
  const list = (items, line) => (items && items.length
    ? html`<ul>${items.slice(0, 8).map((i) => html`<li>${line(i)}</li>`)}</ul>`
    : html`<span class="muted">none yet</span>`);
  return html`<div>
    <select onChange=${(e) => setChosen(e.target.value)} value=${chosen}>
      ${shoppers.map((s) => html`<option value=${s.customer_id}>${s.name}</option>`)}</select>
    ${view && html`<div data-testid="shopper">
      <${Section} title="Profile" data=${view.profile} render=${(p) => html`<div class="kv">${Object.entries(p).slice(0, 8).map(([k, v]) => html`<span>${k}</span><span>${typeof v === "object" ? JSON.stringify(v) : String(v)}</span>`)}</div>`} />
      <${Section} title="History across channels" data=${view.history} render=${(h) => list(h.items || h.entries || h.orders || [], (i) => `${i.channel || ""} ${i.order_id || i.kind || ""} ${i.status || ""}`)} />
      <${Section} title="Orders" data=${view.orders} render=${(o) => list(o.orders, (i) => `${i.order_id} ${i.channel} ${i.status} ${i.total.amount} ${i.total.currency}`)} />
      <${Section} title="Points" data=${view.points} render=${(p) => html`<span>${p.available ?? p.balance ?? JSON.stringify(p)} points</span>`} />
      <${Section} title="Messages sent" data=${view.notifications} render=${(n) => list(n.items || n.notifications || n, (i) => `${i.channel || ""} ${i.template || ""} ${i.status || i.outcome || ""}`)} />
      <${Section} title="E-mails received" data=${view.emails} render=${(m) => m.length ? list(m, (i) => `${i.subject} (${i.date})`) : html`<span class="muted">none yet</span>`} />
    </div>`}
  </div>`;
}

function Histogram({ histogram }) {
  if (!histogram || !histogram.count) return html`<p class="muted">No stock change measured yet.</p>`;
  const bounds = Object.keys(histogram.buckets).filter((b) => b !== "+Inf").map(Number).sort((a, b) => a - b);
  let previous = 0;
  const bars = bounds.map((b) => {
    const cumulative = histogram.buckets[String(b)] ?? histogram.buckets[b.toFixed(1)] ?? previous;
    const n = cumulative - previous; previous = cumulative; return { b, n };
  });
  const max = Math.max(1, ...bars.map((x) => x.n));
  const label = (s) => (s < 1 ? `${+(s * 1000).toFixed(1)}ms` : `${s}s`);
  return html`<div data-testid="latency"><div class="bars">${bars.map((x) => html`<div style=${`height:${(100 * x.n) / max}%`} title=${`<= ${label(x.b)}: ${x.n}`}></div>`)}</div>
    <div class="bar-labels">${bars.map((x) => html`<span>${label(x.b)}</span>`)}</div>
    <p class="muted">${histogram.count} stock changes, from the event to the availability written</p></div>`;
}

function Health() {
  const [health, setHealth] = useState(null);
  const [dlq, setDlq] = useState(null);
  useEffect(() => {
    const load = () => getJson("/api/health").then(setHealth).catch(() => {});
    const loadDlq = () => getJson("/api/dlq").then(setDlq).catch(() => {});
    load(); loadDlq();
    const timer = setInterval(load, 2000);
    const dlqTimer = setInterval(loadDlq, 5000);
    return () => { clearInterval(timer); clearInterval(dlqTimer); };
  }, []);
  if (!health) return html`<p class="muted">...</p>`;
  const services = Object.entries(health.services);
  const inventory = health.services.inventory || {};
  return html`<div class="scroll"><table data-testid="health"><thead><tr><th>service</th><th>up</th><th>consumer lag</th><th>outbox backlog</th><th>DLQ (reason: count)</th></tr></thead>
    <tbody>${services.map(([name, s]) => html`<tr><td class="sku">${name}</td>${
      s.skipped ? html`<td colspan="4" class="skipped">${s.skipped}</td>`
      : html`<td class=${s.up ? "passed" : "failed"}>${s.up ? "yes" : "no"}</td><td>${s.consumer_lag ?? "-"}</td><td>${s.outbox_backlog ?? "-"}</td>
        <td style="text-align:left">${s.dlq && Object.keys(s.dlq).length ? Object.entries(s.dlq).map(([k, v]) => html`<div>${k}: ${v}</div>`) : "none"}</td>`}</tr>`)}</tbody></table></div>
    <h3 style="font-size:14px;margin:10px 0 4px">Newest dead letters</h3>
    <div data-testid="dlq">${!dlq ? "..." : dlq.skipped || dlq.error ? html`<span class="skipped">${dlq.skipped || dlq.error}</span>`
      : dlq.length ? html`<ul>${dlq.map((d) => html`<li><b>${d.topic}</b> ${d.ce_type || ""}: <b>${d.reason}</b> (${d.service}) <span class="muted">${d.error}</span></li>`)}</ul>`
      : html`<span class="muted">none: nothing was dead-lettered</span>`}</div>
    <p class="muted">${inventory.stream_clients ?? 0} clients on the availability stream</p>
    <h3 style="font-size:14px;margin:10px 0 4px">Stock change to availability (live)</h3>
    <${Histogram} histogram=${inventory.stock_to_availability} />`;
}

function App() {
  const { grid, live, latest } = useAvailability();
  return html`
    <header class="wide"><h1>Omni console</h1><span class="live" data-testid="live">${live}</span></header>
    <section class="wide"><h2>Availability: stores x SKUs, and what web and app may sell</h2><${Grid} grid=${grid} latest=${latest} /></section>
    <section><h2>Stories</h2><${Stories} /></section>
    <section><h2>Shopper</h2><${Shopper} /></section>
    <section class="wide"><h2>Platform health</h2><${Health} /></section>`;
}

const root = document.getElementById("app");
root.textContent = ""; // the "Loading" placeholder: Preact renders next to what is there
render(html`<${App} />`, root);
