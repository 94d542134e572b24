// The chat page: one websocket, reconnecting with backoff. The server's snapshot
// is the truth; token frames carry their character offset, so a frame already
// covered by a snapshot is trimmed instead of duplicated.
(function () {
  "use strict";
  const root = document.getElementById("chat");
  const list = document.getElementById("messages");
  const input = document.getElementById("input");
  const form = document.getElementById("composer");
  const stopButton = document.getElementById("stop");
  const sendButton = document.getElementById("send");
  const errorBox = document.getElementById("error");
  const status = document.getElementById("conn-status");
  const title = document.getElementById("chat-title");
  const answerStatus = document.getElementById("answer-status");

  let conversationId = root.dataset.conversation ? Number(root.dataset.conversation) : null;
  let nCtx = null;
  let socket = null;
  let backoffMs = 500;
  const messages = new Map(); // message id -> {el, role}
  const gens = new Map(); // generation id -> {text, state, el, metrics}
  let renderQueued = new Set();
  let opened = false; // the first snapshot has been shown
  let stickToEnd = false; // scroll to the end after the next render
  let nextRequestId = 1;
  const pending = new Map(); // request_id -> frame, until accepted or refused
  const overflowBox = document.getElementById("overflow");
  const meter = document.getElementById("context-meter");
  const modelStatus = document.getElementById("model-status");
  const modelSelect = document.getElementById("model");
  // The model whose status is shown: the one picked in the settings (for a
  // conversation, the one its next answer goes to), else the conversation's.
  let statusModel = (modelSelect && modelSelect.value) || root.dataset.model || "";
  let statusAt = 0; // when the shown status was read: an older one that arrives later is dropped

  // ---------- socket ----------
  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(scheme + "://" + location.host + "/ws/chat/");
    status.textContent = "connecting…";
    socket.onopen = function () {
      backoffMs = 500;
      status.textContent = "";
      status.className = "status ok";
      if (conversationId) send({ type: "conversation.open", conversation: conversationId });
      watchStatus(statusModel);
    };
    socket.onmessage = function (event) { handle(JSON.parse(event.data)); };
    socket.onclose = function (event) {
      // 4401: not logged in; 4403: logged out or deactivated elsewhere.
      if (event.code === 4401 || event.code === 4403) { location.href = "/login/?next=" + encodeURIComponent(location.pathname); return; }
      // 1009: the server refused a frame over its size limit (WS_FRAME_MAX_BYTES).
      if (event.code === 1009) showError("That was too large to send; nothing was saved.");
      status.textContent = event.code === 4429 ? "too many tabs open: retrying in 30 s" : "reconnecting…";
      status.className = "status warn";
      setTimeout(connect, event.code === 4429 ? 30000 : backoffMs);
      backoffMs = Math.min(backoffMs * 2, 10000);
    };
  }

  function send(frame) {
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      showError("Not connected yet — trying again shortly.");
      return false;
    }
    socket.send(JSON.stringify(frame));
    return true;
  }

  // A request whose answer we wait for: the input is kept until it is accepted.
  function request(frame) {
    frame.request_id = nextRequestId++;
    pending.set(frame.request_id, frame);
    return send(frame);
  }

  // ---------- frames ----------
  function handle(frame) {
    switch (frame.type) {
      case "conversation.snapshot": return onSnapshot(frame);
      case "conversation.turn": return frame.messages.forEach(addMessage);
      case "chat.accepted": return onAccepted(frame);
      case "generation.snapshot": return onGenerationSnapshot(frame);
      case "generation.started": return setState(frame.generation, "running");
      case "generation.progress": return onProgress(frame);
      case "generation.token": return onToken(frame);
      case "generation.final": return onFinal(frame);
      case "conversation.changed": return send({ type: "conversation.open", conversation: frame.conversation });
      case "conversation.watchers": return onWatchers(frame);
      case "error": return onError(frame);
      case "access.lost": return onAccessLost(frame);
      case "access.revoked": return showError(frame.message);
      case "model.status": return onModelStatus(frame);
    }
  }

  // ---------- the chosen model's status ----------
  // The server sends it once on status.watch, then at each change (nothing polls).
  function watchStatus(name) {
    if (name !== statusModel) {
      statusModel = name;
      statusAt = 0;
    }
    if (statusModel && socket && socket.readyState === WebSocket.OPEN) {
      send({ type: "status.watch", model: statusModel });
    }
  }

  function statusText(s) {
    if (s.state === "ready") return "Ready";
    if (s.state === "loading") return "Loading " + Math.floor(100 * (s.progress || 0)) + " %";
    if (s.state === "down") return "Down";
    const parts = ["Busy"];
    if (s.waiting) parts.push(s.waiting + " waiting");
    if (s.eta_s != null) parts.push("about " + Math.max(1, Math.round(s.eta_s)) + " s");
    if (parts.length === 1) parts.push(s.running + " answering");
    return parts.join(" · ");
  }

  // Spoken (politely) only when the model becomes available or unavailable: not at
  // every answer's busy and ready, nor at each step of loading.
  const SPOKEN_STATUS = {
    ready: "is ready.", busy: "is ready.", loading: "is loading.", down: "is down: nothing can answer.",
  };

  function onModelStatus(frame) {
    if (frame.model !== statusModel || frame.at < statusAt) return;
    statusAt = frame.at;
    const before = modelStatus.dataset.state || "ready";
    modelStatus.dataset.state = frame.state;
    modelStatus.hidden = false;
    document.getElementById("model-status-name").textContent = frame.model + ": ";
    document.getElementById("model-status-text").textContent = statusText(frame);
    if (SPOKEN_STATUS[before] !== SPOKEN_STATUS[frame.state]) {
      document.getElementById("model-status-spoken").textContent =
        frame.model + " " + SPOKEN_STATUS[frame.state];
    }
  }

  function onSnapshot(frame) {
    conversationId = frame.conversation.id;
    // Who may not change the settings sees the model the conversation has now.
    const fields = document.querySelector("#chat-settings fieldset");
    if ((!fields || fields.disabled) && frame.conversation.model !== statusModel) {
      watchStatus(frame.conversation.model);
    }
    nCtx = frame.conversation.n_ctx;
    title.textContent = frame.conversation.title;
    list.innerHTML = "";
    messages.clear();
    gens.clear();
    frame.messages.forEach(addMessage);
    updateControls();
    if (!opened) {
      // A conversation opens at its latest answer, once that answer is drawn.
      opened = true;
      stickToEnd = true;
    }
  }

  // Who else has this (shared) conversation open now.
  function onWatchers(frame) {
    const box = document.getElementById("watchers");
    if (!box || frame.conversation !== conversationId) return;
    const users = frame.users;
    box.textContent = users.length === 0 ? "" : "· " +
      (users.length === 1 ? users[0] + " is" :
        users.slice(0, -1).join(", ") + " and " + users[users.length - 1] + " are") + " here";
  }

  // The conversation open here is no longer ours to see (unshared, deleted, or we
  // left its team): say so and stop showing it.
  function onAccessLost(frame) {
    if (frame.conversation !== conversationId) return;
    showError("This conversation is no longer shared with you.");
    location.href = "/";
  }

  function onError(frame) {
    const request = pending.get(frame.request_id);
    pending.delete(frame.request_id);
    showError(frame.message);
    if (frame.code === "context_overflow" && request) {
      overflowBox.hidden = false;
      overflowBox.dataset.request = JSON.stringify(request);
    }
  }

  function onAccepted(frame) {
    const request = pending.get(frame.request_id);
    pending.delete(frame.request_id);
    if (request && request.type === "chat.send") input.value = "";
    overflowBox.hidden = true;
    errorBox.hidden = true;
    if (!conversationId) {
      conversationId = frame.conversation;
      history.replaceState(null, "", root.dataset.conversationUrl + conversationId + "/");
      // Titled by the server (services.title_from), as a reload will show it.
      title.textContent = frame.title;
      addToSidebar(conversationId, frame.title);
      const settings = document.getElementById("chat-settings");
      if (settings) {
        settings.open = false;
        settings.querySelector("summary").textContent = "Settings for the next answer";
      }
      refreshHeader();
    } else if (request && request.model && request.model !== root.dataset.model) {
      refreshHeader();  // the model line names the model that now answers
    }
    if (request && request.model) root.dataset.model = request.model;
  }

  // A new conversation's model line, Manage menu and tab title, as its own page
  // renders them (one template, not a copy in script), without a reload.
  function refreshHeader() {
    fetch(location.pathname, { credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (!html) return;
        const page = new DOMParser().parseFromString(html, "text/html");
        const fresh = page.querySelector(".conv-bar");
        const bar = document.querySelector(".conv-bar");
        if (fresh && bar) {
          // The live context meter stays: it already shows this conversation.
          const placeholder = fresh.querySelector("#context-meter");
          if (placeholder && meter) placeholder.replaceWith(meter);
          bar.replaceWith(fresh);
        }
        if (page.title) document.title = page.title;
      })
      .catch(function () { /* the next reload shows it */ });
  }

  function addToSidebar(id, text) {
    const mine = document.getElementById("my-conversations");
    if (!mine) return;
    mine.querySelectorAll("li.muted").forEach(function (li) { li.remove(); });
    mine.querySelectorAll("li.active").forEach(function (li) { li.classList.remove("active"); });
    const li = document.createElement("li");
    li.className = "active";
    const a = document.createElement("a");
    a.href = root.dataset.conversationUrl + id + "/";
    a.textContent = text;
    li.append(a);
    mine.prepend(li);
  }

  function onGenerationSnapshot(frame) {
    const gen = gens.get(frame.generation);
    if (!gen) return;
    if (frame.text.length >= gen.text.length) gen.text = frame.text;
    gen.state = frame.state;
    gen.position = frame.position;
    gen.eta_s = frame.eta_s;
    gen.stranded = frame.stranded;
    if (frame.metrics) gen.metrics = frame.metrics;
    if (frame.reason) gen.reason = frame.reason;
    gen.stopped_by = frame.stopped_by;
    gen.finish_reason = frame.finish_reason;
    gen.max_tokens = frame.max_tokens;
    queueRender(frame.generation);
  }

  function onProgress(frame) {
    const gen = gens.get(frame.generation);
    if (!gen) return;
    gen.state = "running";
    gen.progress = frame;
    queueRender(frame.generation);
  }

  function onToken(frame) {
    const gen = gens.get(frame.generation);
    if (!gen) return;
    const have = gen.text.length;
    if (frame.offset > have) {
      // A gap: ask for a fresh snapshot rather than show a hole.
      send({ type: "conversation.open", conversation: conversationId });
      return;
    }
    gen.text += frame.text.slice(have - frame.offset);
    gen.state = "running";
    queueRender(frame.generation);
  }

  function onFinal(frame) {
    const gen = gens.get(frame.generation);
    if (!gen) return;
    gen.text = frame.text;
    gen.state = frame.state;
    gen.reason = frame.reason;
    gen.stopped_by = frame.stopped_by;
    gen.metrics = frame.metrics;
    gen.finish_reason = frame.finish_reason;
    gen.max_tokens = frame.max_tokens;
    queueRender(frame.generation);
  }

  function setState(id, state) {
    const gen = gens.get(id);
    if (gen) { gen.state = state; queueRender(id); }
  }

  // ---------- rendering ----------
  function addMessage(m) {
    if (messages.has(m.id)) return;
    const li = document.createElement("li");
    li.className = "msg " + m.role;
    li.dataset.id = m.id;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = m.role === "user" ? (m.author || "user") : "assistant";
    if (m.edited) addTag(meta, "edited — later turns replaced");
    if (m.dropped_from_context) {
      li.classList.add("dropped");
      addTag(meta, "dropped from context");
    }
    const body = document.createElement("div");
    body.className = "body";
    li.append(meta, body);
    const actions = document.createElement("div");
    actions.className = "actions";
    if (m.role === "user") {
      body.textContent = m.text;
      li.append(actions);
      const edit = actionButton("Edit", function () { startEdit(li, m); });
      edit.className = "edit";
      actions.append(edit);
    } else {
      const footer = document.createElement("div");
      footer.className = "footer";
      li.append(footer, actions);
      const regen = actionButton("Regenerate", function () {
        request({ type: "chat.regenerate", conversation: conversationId });
      });
      regen.className = "regenerate";
      regen.hidden = true;
      const more = actionButton("Continue", function () {
        request({ type: "chat.continue", conversation: conversationId });
      });
      more.className = "continue";
      more.hidden = true;
      actions.append(more, regen);
      const g = m.generation || {};
      li.dataset.generation = g.generation;
      gens.set(g.generation, {
        text: m.text || "", state: g.state, announced: g.state, metrics: g.metrics, reason: g.reason,
        finish_reason: g.finish_reason, max_tokens: g.max_tokens, stopped_by: g.stopped_by,
        position: g.position, eta_s: g.eta_s, stranded: g.stranded, el: li,
      });
      queueRender(g.generation);
    }
    messages.set(m.id, { el: li, role: m.role });
    list.append(li);
    scrollDown();
  }

  function addTag(parent, text) {
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = text;
    parent.append(tag);
  }

  function actionButton(label, onClick) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "link";
    button.textContent = label;
    button.addEventListener("click", onClick);
    return button;
  }

  function startEdit(li, m) {
    if (li.querySelector(".edit-box")) return;
    const box = document.createElement("div");
    box.className = "edit-box";
    const area = document.createElement("textarea");
    area.value = m.text;
    area.rows = 3;
    const save = document.createElement("button");
    save.type = "button";
    save.className = "primary";
    save.textContent = "Save and send";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.textContent = "Cancel";
    const note = document.createElement("p");
    note.className = "muted small";
    note.textContent = "Sending replaces this message and every turn after it.";
    box.append(area, note, save, cancel);
    li.append(box);
    area.focus();
    cancel.addEventListener("click", function () { box.remove(); });
    save.addEventListener("click", function () {
      if (area.value.trim()) request({ type: "chat.edit", message: m.id, content: area.value });
    });
  }

  function queueRender(id) {
    if (renderQueued.size === 0) requestAnimationFrame(flushRender);
    renderQueued.add(id);
  }

  function flushRender() {
    const ids = renderQueued;
    renderQueued = new Set();
    ids.forEach(renderGeneration);
    updateControls();
    if (stickToEnd) {
      stickToEnd = false;
      window.scrollTo(0, document.body.scrollHeight);
    } else {
      scrollDown();
    }
  }

  function renderGeneration(id) {
    const gen = gens.get(id);
    if (!gen) return;
    const body = gen.el.querySelector(".body");
    const footer = gen.el.querySelector(".footer");
    announce(gen);
    gen.el.dataset.state = gen.state;
    const streaming = Boolean(gen.text) && gen.state === "running";
    if (!streaming) gen.stream = null; // whatever replaces the body ends the stream
    if (streaming) {
      if (!gen.stream) gen.stream = new Markdown.Stream(body);
      gen.stream.update(gen.text);
    } else if (gen.text) {
      body.innerHTML = Markdown.render(gen.text);
      Markdown.decorate(body);
    } else if (gen.state === "queued") {
      body.innerHTML = "";
      let text = "queued";
      if (gen.position) text += " — position " + gen.position;
      if (gen.stranded) {
        // Its task was lost: the server sends it again shortly, or ends it with why.
        text += "; its place in the queue was lost, sending it again";
      } else if (gen.eta_s != null) {
        text += ", about " + Math.max(1, Math.round(gen.eta_s)) + " s";
      }
      body.textContent = text + "…";
    } else if (gen.state === "running" && gen.progress) {
      const p = gen.progress;
      body.textContent = "reading the prompt: " + p.evaluated.toLocaleString() + " of " +
        p.total.toLocaleString() + " tokens (" + Math.floor(100 * p.evaluated / p.total) + "%)…";
    } else if (gen.state === "running") {
      body.textContent = "thinking…";
    } else {
      // Ended without a word (stopped or failed before its first token): nothing of
      // the waiting line stays; a stopped answer says why in its place (the
      // server's reason, e.g. "Stopped before it started."), a failed one in its footer.
      body.textContent = gen.state === "cancelled" ? (gen.reason || "Stopped.") : "";
    }
    footer.textContent = footerText(gen);
  }

  // Screen readers hear the answer's state changes from one status line, not the
  // whole message list read again at every token.
  const SPOKEN = {
    queued: "Answer queued.", running: "Answering…", done: "Answer finished.",
    cancelled: "Answer stopped.", failed: "Answer failed.",
  };

  function announce(gen) {
    if (gen.announced === gen.state || !answerStatus) return;
    gen.announced = gen.state;
    answerStatus.textContent = SPOKEN[gen.state] || "";
  }

  function footerText(gen) {
    const parts = [];
    if (gen.state === "failed") parts.push("failed: " + (gen.reason || "unknown reason"));
    // Who stopped it: in a shared conversation it may be a team-mate.
    if (gen.state === "cancelled") {
      const by = gen.stopped_by && gen.stopped_by !== root.dataset.user ? " by " + gen.stopped_by : "";
      parts.push("stopped" + by);
    }
    if (gen.finish_reason === "length") {
      parts.push(atTokenLimit(gen) ? "stopped at the " + gen.max_tokens.toLocaleString() +
        "-token limit" : "stopped at the end of the model's context");
    }
    const m = gen.metrics;
    if (m) {
      parts.push(m.completion_tokens + " tokens");
      if (m.ttft_ms != null) parts.push("TTFT " + Math.round(m.ttft_ms) + " ms");
      if (m.decode_tokens_per_s != null) parts.push(m.decode_tokens_per_s.toFixed(1) + " tok/s");
      if (m.n_ctx) parts.push("context " + m.context_used + " / " + m.n_ctx);
      if (m.cached_tokens) parts.push(m.cached_tokens + " cached");
    }
    return parts.join(" · ");
  }

  // Cut off by max_tokens (not by the end of the context, where no room is left).
  function atTokenLimit(gen) {
    return gen.finish_reason === "length" && gen.max_tokens != null &&
      !(gen.metrics && gen.metrics.completion_tokens < gen.max_tokens);
  }

  function activeGeneration() {
    for (const [id, gen] of gens) {
      if (gen.state === "queued" || gen.state === "running") return id;
    }
    return null;
  }

  function updateControls() {
    const busy = activeGeneration() !== null;
    stopButton.hidden = !busy;
    sendButton.disabled = busy;
    list.querySelectorAll(".msg .edit").forEach(function (b) { b.hidden = busy; });
    // Regenerate is offered on the last answer only, once it has ended; Continue
    // too, when that answer stopped at its token limit.
    const answers = list.querySelectorAll(".msg.assistant");
    answers.forEach(function (li, i) {
      const latest = !busy && i === answers.length - 1;
      const button = li.querySelector(".regenerate");
      if (button) button.hidden = !latest;
      const more = li.querySelector(".continue");
      const gen = gens.get(Number(li.dataset.generation));
      if (more) more.hidden = !(latest && gen && atTokenLimit(gen));
    });
    updateMeter();
  }

  function updateMeter() {
    if (!meter) return;
    let latest = null;
    gens.forEach(function (gen) { if (gen.metrics && gen.metrics.n_ctx) latest = gen.metrics; });
    if (!latest) return;
    const share = latest.context_used / latest.n_ctx;
    meter.hidden = false;
    meter.classList.toggle("warn", share > 0.8);
    document.getElementById("context-fill").style.width = Math.min(100, share * 100) + "%";
    document.getElementById("context-label").textContent =
      "context " + latest.context_used.toLocaleString() + " / " + latest.n_ctx.toLocaleString();
  }

  function scrollDown() {
    const nearBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 200;
    if (nearBottom) window.scrollTo(0, document.body.scrollHeight);
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    clearTimeout(showError.timer);
    showError.timer = setTimeout(function () { errorBox.hidden = true; }, 8000);
  }

  // ---------- user actions ----------
  function params() {
    const out = {};
    ["temperature", "top_p", "max_tokens", "seed"].forEach(function (name) {
      const el = document.getElementById("p-" + name);
      if (el && el.value !== "") out[name] = Number(el.value);
    });
    return out;
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    const content = input.value;
    if (!content.trim() || activeGeneration() !== null) return;
    const frame = { type: "chat.send", content: content, conversation: conversationId };
    // The settings go with every message (only their owner may change them; the
    // server keeps a conversation's settings when a message carries none).
    const settings = document.querySelector("#chat-settings fieldset");
    if (settings && !settings.disabled) {
      frame.model = document.getElementById("model").value;
      frame.system_prompt = document.getElementById("system-prompt").value;
      frame.params = params();
    }
    request(frame);
  });

  document.getElementById("drop-oldest").addEventListener("click", function () {
    const frame = JSON.parse(overflowBox.dataset.request || "null");
    if (!frame) return;
    delete frame.request_id;
    frame.overflow = "drop_oldest";
    overflowBox.hidden = true;
    request(frame);
  });

  input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  function stop() {
    const id = activeGeneration();
    if (id === null) return; // an Escape with nothing to stop leaves the focus alone
    send({ type: "generation.stop", generation: id });
    // Stop disappears once the answer ends: focus goes back to the message box.
    input.focus();
  }
  stopButton.addEventListener("click", stop);
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape") stop();
  });

  // The skip link puts the keyboard in the message box (a fragment link alone
  // scrolls there without focusing it).
  document.querySelector(".skip-link").addEventListener("click", function (event) {
    event.preventDefault();
    input.focus();
  });

  if (modelSelect) {
    modelSelect.addEventListener("change", function () { watchStatus(modelSelect.value); });
  }

  // ---------- presets ----------
  // Choosing one fills the settings (the next message sends them, as any change);
  // its data is the page's json_script block.
  const presetSelect = document.getElementById("preset");
  const presetBlock = document.getElementById("preset-data");
  const presets = presetBlock ? JSON.parse(presetBlock.textContent) : {};

  function applyPreset(id) {
    const p = presets[id];
    if (!p) return;
    document.getElementById("system-prompt").value = p.system_prompt || "";
    ["temperature", "top_p", "max_tokens", "seed"].forEach(function (name) {
      const el = document.getElementById("p-" + name);
      const value = p.params ? p.params[name] : null;
      if (el) el.value = value === null || value === undefined ? "" : value;
    });
    let note = "";
    if (p.model && modelSelect && modelSelect.value !== p.model) {
      const served = Array.from(modelSelect.options).some(function (o) { return o.value === p.model; });
      if (served) {
        modelSelect.value = p.model;
        modelSelect.dispatchEvent(new Event("change"));
      } else {
        note = "“" + p.name + "” names the model " + p.model +
          ", which no worker serves now: the model picked stays.";
      }
    }
    document.getElementById("preset-note").textContent = note;
  }

  if (presetSelect) {
    presetSelect.addEventListener("change", function () { applyPreset(presetSelect.value); });
    // Just saved (?preset=) or restored by the browser: its values are the fields'.
    if (presetSelect.value && !presetSelect.matches(":disabled")) applyPreset(presetSelect.value);
    // A field changed by hand no longer says what the preset says: none is shown.
    presetSelect.closest("fieldset").addEventListener("input", function (event) {
      if (event.target !== presetSelect && !event.target.closest("#preset-save")) {
        presetSelect.value = "";
        document.getElementById("preset-note").textContent = "";
      }
    });
  }

  // Save as preset: posted here without leaving the page (a plain form post also
  // works, and comes back to this page).
  const saveForm = document.getElementById("preset-save");
  if (saveForm && presetSelect) {
    saveForm.addEventListener("submit", function (event) {
      event.preventDefault();
      const saveStatus = document.getElementById("preset-save-status");
      saveStatus.textContent = "Saving…";
      fetch(saveForm.action, {
        method: "POST",
        body: new FormData(saveForm), // with the settings fields (their form= attribute)
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      })
        .then(function (response) {
          return response.json().then(function (data) { return { ok: response.ok, data: data }; });
        })
        .then(function (result) {
          if (!result.ok) {
            saveStatus.textContent = result.data.error || "Not saved.";
            return;
          }
          const p = result.data;
          presets[String(p.id)] = p;
          const option = document.createElement("option");
          option.value = String(p.id);
          option.textContent = p.name + (p.team ? " · shared with " + p.team : "");
          document.getElementById("my-presets").append(option);
          presetSelect.value = option.value;
          saveForm.querySelector("input[name=name]").value = "";
          saveStatus.textContent = "Saved “" + p.name + "”.";
        })
        .catch(function () {
          saveStatus.textContent = "Not saved: reload the page and try again.";
        });
    });
  }

  const toggle = document.getElementById("sidebar-toggle");
  toggle.addEventListener("click", function () {
    document.getElementById("sidebar").classList.toggle("open");
  });

  connect();
})();
