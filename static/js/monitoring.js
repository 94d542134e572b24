// Charts of the monitoring pages (Chart.js, vendored). Data comes from json_script
// elements; the GPU page also listens on /ws/gpu/ for live samples.
(function () {
  "use strict";
  const data = (id) => { const el = document.getElementById(id); return el ? JSON.parse(el.textContent) : null; };
  // Colours come from app.css's custom properties, resolved for the current theme
  // (light-dark() resolves only on an element, hence the probe), and again when the
  // header's button changes the theme (js/theme.js sends "themechange").
  function cssColor(name) {
    const probe = document.createElement("span");
    probe.style.color = `var(${name})`;
    document.body.appendChild(probe);
    const value = getComputedStyle(probe).color;
    probe.remove();
    return value;
  }
  const COLORS = [];
  const theme = {};
  function themeColors() {
    COLORS.splice(0, COLORS.length, ...[1, 2, 3, 4, 5, 6].map((i) => cssColor(`--chart-${i}`)));
    theme.text = cssColor("--muted");
    theme.lines = cssColor("--border");
  }
  themeColors();
  // Functions, read at each draw: a chart keeps the scale options it resolved at
  // first, so plain values set here later would not reach its axes.
  Chart.defaults.color = () => theme.text;
  Chart.defaults.borderColor = () => theme.lines;
  // A dataset's colour: its index into COLORS travels with it, for a theme change.
  const paint = (i, props) => ({ colorIndex: i, ...Object.fromEntries(props.map((p) => [p, COLORS[i]])) });
  document.addEventListener("themechange", () => {
    themeColors();
    Object.values(Chart.instances).forEach((chart) => {
      chart.data.datasets.forEach((set) => {
        if (set.colorIndex === undefined) return;
        ["borderColor", "backgroundColor"].forEach((p) => { if (p in set) set[p] = COLORS[set.colorIndex]; });
      });
      chart.update();
    });
  });
  const base = { responsive: true, maintainAspectRatio: false, animation: false, plugins: { legend: { display: false } } };

  function wrap(canvas) { canvas.parentElement.style.position = "relative"; canvas.style.maxHeight = "220px"; }

  // Usage pages: <canvas data-chart="bar|line|histogram|scatter" data-source="ID" data-series="KEY">
  document.querySelectorAll("canvas[data-chart]").forEach((canvas) => {
    const source = data(canvas.dataset.source);
    if (!source) return;
    const kind = canvas.dataset.chart, key = canvas.dataset.series, label = canvas.dataset.label;
    wrap(canvas);
    if (kind === "scatter") {
      new Chart(canvas, { type: "scatter", data: { datasets: [{ label, data: source[key], ...paint(0, ["backgroundColor"]), pointRadius: 2 }] },
        options: { ...base, scales: { x: { title: { display: true, text: "context used (tokens)" } }, y: { title: { display: true, text: "VRAM peak (GiB)" } } } } });
    } else if (kind === "histogram") {
      new Chart(canvas, { type: "bar", data: { labels: source[key].labels, datasets: [{ label, data: source[key].counts, ...paint(1, ["backgroundColor"]) }] }, options: base });
    } else {
      new Chart(canvas, { type: kind, data: { labels: source.labels, datasets: [{ label, data: source[key], ...paint(0, ["borderColor", "backgroundColor"]), spanGaps: true }] }, options: base });
    }
  });

  // GPU page ------------------------------------------------------------------
  const METRICS = [["memory_used_gib", "VRAM used (GiB)"], ["utilization_pct", "Utilisation (%)"], ["temperature_c", "Temperature (°C)"], ["power_w", "Power (W)"]];

  function gpuChart(container, title, series) {
    const figure = document.createElement("figure");
    figure.className = "card";
    figure.innerHTML = `<figcaption></figcaption><canvas></canvas>`;
    figure.querySelector("figcaption").textContent = title;
    container.appendChild(figure);
    const canvas = figure.querySelector("canvas");
    wrap(canvas);
    return new Chart(canvas, {
      type: "line",
      data: { labels: series.t.map((t) => new Date(t).toLocaleTimeString()),
        datasets: METRICS.map(([key, name], i) => ({ label: name, data: series[key], ...paint(i, ["borderColor", "backgroundColor"]), pointRadius: 0, spanGaps: true, yAxisID: key === "memory_used_gib" ? "y" : "y1" })) },
      options: { ...base, plugins: { legend: { display: true, position: "bottom" } },
        scales: { y: { position: "left", title: { display: true, text: "GiB" } }, y1: { position: "right", grid: { drawOnChartArea: false } } } },
    });
  }

  const history = data("gpu-history");
  const historyBox = document.getElementById("history-charts");
  if (history && historyBox) history.forEach((s) => gpuChart(historyBox, `${s.host} GPU ${s.gpu}`, s));

  const liveBox = document.getElementById("live-charts");
  if (liveBox) {
    const charts = {};
    const LIVE_POINTS = 120;
    const state = document.getElementById("live-state");
    (data("gpu-now-data") || []).forEach((g) => {
      charts[`${g.host}/${g.index}`] = gpuChart(liveBox, `${g.host} GPU ${g.index}`, { t: [], memory_used_gib: [], utilization_pct: [], temperature_c: [], power_w: [] });
    });
    const connect = () => {
      const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/gpu/`);
      socket.onopen = () => { if (state) state.textContent = "live"; };
      socket.onclose = () => { if (state) state.textContent = "reconnecting…"; setTimeout(connect, 3000); };
      socket.onmessage = (event) => {
        const msg = JSON.parse(event.data);
        if (msg.type !== "gpu.samples") return;
        msg.samples.forEach((s) => {
          const key = `${msg.host}/${s.index}`;
          const chart = charts[key] || (charts[key] = gpuChart(liveBox, `${msg.host} GPU ${s.index}`, { t: [], memory_used_gib: [], utilization_pct: [], temperature_c: [], power_w: [] }));
          chart.data.labels.push(new Date(s.t).toLocaleTimeString());
          const values = { memory_used_gib: s.memory_used_bytes / 2 ** 30, utilization_pct: s.utilization_pct, temperature_c: s.temperature_c, power_w: s.power_w };
          chart.data.datasets.forEach((d, i) => d.data.push(values[METRICS[i][0]]));
          if (chart.data.labels.length > LIVE_POINTS) { chart.data.labels.shift(); chart.data.datasets.forEach((d) => d.data.shift()); }
          chart.update("none");
        });
      };
    };
    connect();
  }
})();
