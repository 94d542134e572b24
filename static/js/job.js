// The job page: state, live progress bar, elapsed time and ETA, the current pass,
// the result as sanitized markdown and the metrics of every pass. The server's
// snapshot is the truth; generation.* frames refine the current pass between steps.
(function () {
  "use strict";
  const root = document.getElementById("job");
  let snap = JSON.parse(document.getElementById("job-snapshot").textContent);
  window.JobPage = { id: snap.job };
  const el = function (id) { return document.getElementById(id); };
  let live = { generation: null, evaluated: null, evalTotal: null, tokens: 0, text: "" };
  let renderedResult = null;

  function fmtDuration(seconds) {
    if (seconds == null || !isFinite(seconds)) return "–";
    seconds = Math.max(0, Math.round(seconds));
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    return (h ? h + " h " : "") + (h || m ? m + " min " : "") + s + " s";
  }

  function currentPass() {
    return snap.passes.find(function (p) { return p.state === "running"; }) || null;
  }

  function progress() {
    if (snap.state === "done") return 1;
    const total = snap.passes.reduce(function (a, p) { return a + p.weight; }, 0) || 1;
    let done = snap.passes.reduce(function (a, p) { return a + (p.state === "done" ? p.weight : 0); }, 0);
    const cur = currentPass();
    if (cur && live.generation === cur.generation) {
      const prompt = cur.prompt_tokens, max = snap.max_tokens;
      let frac = 0;
      if (live.tokens > 0) frac = (prompt + Math.min(live.tokens, max)) / (prompt + max);
      else if (live.evalTotal) frac = (live.evaluated / live.evalTotal) * prompt / (prompt + max);
      done += frac * cur.weight;
    }
    return Math.min(1, done / total);
  }

  // Seconds of model time the passes not yet done need, at the measured prompt and
  // decode rates (snap.rates: this job's finished passes, else the model's recent
  // generations). Reading a prompt is many times faster per token than writing an
  // answer, so a share of tokens done is no measure of time done. Before anything
  // was measured, the current pass's own decode rate serves once it has written a few tokens.
  function timeLeft() {
    const rates = snap.rates || {};
    let promptRate = rates.prompt_tokens_per_s, decodeRate = rates.decode_tokens_per_s;
    const perPass = rates.new_tokens_per_pass || snap.max_tokens;
    const cur = currentPass();
    const liveHere = cur && live.generation === cur.generation;
    if (!decodeRate && liveHere && live.tokens >= 8 && live.firstTokenAt) {
      decodeRate = (live.tokens - 1) / ((Date.now() - live.firstTokenAt) / 1000);
      promptRate = promptRate || Infinity;  // the prompt is read by then
    }
    if (!promptRate || !decodeRate) return null;
    let seconds = 0;
    snap.passes.forEach(function (p) {
      if (p.state === "done") return;
      let prompt = p.prompt_tokens, answer = perPass;
      if (p === cur && liveHere) {
        if (live.tokens > 0) prompt = 0;
        else if (live.evalTotal) prompt = live.evalTotal - live.evaluated;
        answer = Math.max(0, perPass - live.tokens);
      }
      seconds += prompt / promptRate + answer / decodeRate;
    });
    return seconds;
  }

  function phaseText() {
    const cur = snap.current;
    const label = cur ? cur.label + (snap.passes.length > 1 ? " (" + (snap.passes_done + 1) + " of " + snap.passes.length + ")" : "") + ": " : "";
    switch (snap.state) {
      case "done": return "Done";
      case "failed": return "Failed: " + (snap.reason || "no reason given");
      case "cancelled": return "Cancelled" + (snap.reason ? ": " + snap.reason : "");
    }
    if (snap.reason) return snap.reason;  // an active job waiting for the quota
    if (cur && live.generation === cur.generation) {
      if (live.tokens > 0) return label + "generating (" + live.tokens + " of at most " + snap.max_tokens + " tokens)";
      if (live.evalTotal) return label + "evaluating the prompt, " + live.evaluated.toLocaleString() + " of " + live.evalTotal.toLocaleString() + " tokens";
      if (live.started) return label + "evaluating the prompt (" + cur.prompt_tokens.toLocaleString() + " tokens)";
    }
    if (snap.phase === "queued") return label + "queued" + (snap.position ? ", position " + snap.position : "");
    if (snap.phase === "evaluating") return label + "evaluating the prompt (" + (cur ? cur.prompt_tokens.toLocaleString() : "?") + " tokens)";
    if (snap.phase === "generating") return label + "generating";
    return snap.phase;
  }

  function render() {
    root.dataset.state = snap.state;
    el("job-phase").textContent = phaseText();
    const p = progress();
    el("job-bar").value = p;
    el("job-percent").textContent = Math.round(p * 100) + "%";
    const start = snap.queued_at ? Date.parse(snap.queued_at) : null;
    const end = snap.finished_at ? Date.parse(snap.finished_at) : Date.now();
    const elapsed = start ? (end - start) / 1000 : null;
    el("job-elapsed").textContent = fmtDuration(elapsed);
    let eta = "–";
    if (snap.state === "queued" || snap.state === "running") {
      const left = timeLeft();
      eta = left == null ? "estimating…" : "about " + fmtDuration(left);
    }
    el("job-eta").textContent = eta;
    const cancel = el("job-cancel");
    if (cancel) cancel.hidden = !(snap.state === "queued" || snap.state === "running");
    renderPasses();
    renderResult();
  }

  function renderPasses() {
    const body = el("job-passes");
    body.textContent = "";
    // Each cell carries its column's name: on a phone the rows stack (jobs.css).
    const labels = Array.from(body.closest("table").querySelectorAll("thead th"), function (th) { return th.textContent; });
    const byGen = {};
    snap.metrics.forEach(function (m) { byGen[m.generation] = m; });
    snap.passes.forEach(function (p) {
      const tr = document.createElement("tr");
      const m = p.generation ? byGen[p.generation] : null;
      const mm = m && m.metrics;
      const cells = [
        p.label,
        p.state === "running" && live.generation === p.generation && live.tokens ? "generating" :
          p.cut ? p.state + ", cut at the token limit" : p.state,
        p.prompt_tokens ? p.prompt_tokens.toLocaleString() : "–",
        mm ? mm.completion_tokens : "–",
        mm && mm.prompt_eval_ms != null ? (mm.prompt_eval_ms / 1000).toFixed(1) + " s" : "–",
        mm && mm.decode_tokens_per_s != null ? mm.decode_tokens_per_s.toFixed(1) : "–",
        mm && mm.vram_process_peak_bytes != null ? (mm.vram_process_peak_bytes / 1e9).toFixed(2) + " GB" : "–",
        p.attempts > 1 ? p.attempts : "",
      ];
      cells.forEach(function (text, i) {
        const td = document.createElement("td");
        td.dataset.label = labels[i];
        td.textContent = text;
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
  }

  function renderResult() {
    const box = el("job-result");
    const tools = el("job-result-tools");
    el("job-result-cut").hidden = !snap.result_cut;
    if (snap.state !== "done") {
      box.hidden = true;
      tools.hidden = true;
      return;
    }
    box.hidden = false;
    tools.hidden = false;
    if (renderedResult !== snap.result) {
      box.innerHTML = Markdown.render(snap.result);
      Markdown.decorate(box);
      renderedResult = snap.result;
    }
  }

  function onFrame(frame) {
    if (frame.job === snap.job && (frame.type === "job.snapshot" || frame.type === "job.progress")) {
      snap = frame;
      const cur = currentPass();
      if (!cur || cur.generation !== live.generation) {
        live = { generation: cur ? cur.generation : null, evaluated: null, evalTotal: null, tokens: 0 };
      }
      if (snap.state === "done" || snap.state === "failed" || snap.state === "cancelled") {
        if (root.dataset.owner === "1") JobSocket.send({ type: "job.seen", job: snap.job });
      }
      return render();
    }
    if (frame.generation == null || frame.generation !== live.generation) return;
    if (frame.type === "generation.started") live.started = true;
    if (frame.type === "generation.progress") {
      live.started = true;
      live.evaluated = frame.evaluated;
      live.evalTotal = frame.total;
    }
    if (frame.type === "generation.token") {
      if (!live.tokens) live.firstTokenAt = Date.now();
      live.tokens += (frame.produced_at || [1]).length;
    }
    render();
  }

  JobSocket.on(onFrame);
  JobSocket.onOpen(function () { JobSocket.send({ type: "job.subscribe", job: snap.job }); });
  let ticks = 0;
  setInterval(function () {
    if (snap.state !== "queued" && snap.state !== "running") return;
    render();
    // The queue moves without telling this job: refresh the position now and then.
    if (snap.phase === "queued" && ++ticks % 10 === 0) JobSocket.send({ type: "job.subscribe", job: snap.job });
  }, 1000);
  const cur = currentPass();
  live.generation = cur ? cur.generation : null;
  render();
})();
