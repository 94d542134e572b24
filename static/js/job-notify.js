// Job notifications on every page: one websocket to /ws/jobs/ that keeps the
// unread badge current and shows a toast when one of the user's jobs finishes.
// The job page reuses the same socket through window.JobSocket.
(function () {
  "use strict";
  const badge = document.getElementById("jobs-unread");
  const listeners = [];
  const openers = [];
  let socket = null;
  let backoffMs = 1000;

  function setBadge(count) {
    if (!badge) return;
    badge.textContent = count > 99 ? "99+" : String(count);
    badge.hidden = !count;
    badge.title = count + " finished job" + (count === 1 ? "" : "s") + " not seen yet";
  }

  const STATE_WORDS = { done: "is done", failed: "failed", cancelled: "was cancelled" };

  // Toasts sit bottom right; on a page with a composer (the chat) they sit above it,
  // so that they never cover Send or the message box, however tall it grows.
  function liftAboveComposer(box) {
    const composer = document.querySelector(".composer");
    if (!composer) return;
    const place = function () { box.style.bottom = "calc(" + composer.offsetHeight + "px + 1rem)"; };
    place();
    if (window.ResizeObserver) new ResizeObserver(place).observe(composer);
  }

  function toast(frame) {
    let box = document.getElementById("toasts");
    if (!box) {
      box = document.createElement("div");
      box.id = "toasts";
      box.className = "toasts";
      box.setAttribute("aria-live", "polite");
      document.body.appendChild(box);
      liftAboveComposer(box);
    }
    const item = document.createElement("div");
    item.className = "toast " + frame.state;
    const link = document.createElement("a");
    link.href = frame.url;
    link.textContent = "Job “" + frame.title + "” " + (STATE_WORDS[frame.state] || frame.state);
    const close = document.createElement("button");
    close.type = "button";
    close.className = "link";
    close.setAttribute("aria-label", "Dismiss");
    close.textContent = "×";
    close.addEventListener("click", function () { item.remove(); });
    item.append(link, close);
    box.appendChild(item);
    setTimeout(function () { item.remove(); }, 10000);
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(scheme + "://" + location.host + "/ws/jobs/");
    socket.onopen = function () {
      backoffMs = 1000;
      openers.forEach(function (fn) { fn(); });
    };
    socket.onmessage = function (event) {
      const frame = JSON.parse(event.data);
      if (frame.type === "jobs.unread") setBadge(frame.count);
      if (frame.type === "job.finished") {
        // A job open on screen is read as it finishes: the job page sends job.seen,
        // and the jobs.unread that answers it sets the badge.
        const watching = window.JobPage && window.JobPage.id === frame.job;
        if (!watching) {
          setBadge(frame.unread);
          toast(frame);
        }
      }
      listeners.forEach(function (fn) { fn(frame); });
    };
    socket.onclose = function (event) {
      if (event.code === 4401 || event.code === 4403) return;
      setTimeout(connect, event.code === 4429 ? 30000 : backoffMs);
      backoffMs = Math.min(backoffMs * 2, 30000);
    };
  }

  window.JobSocket = {
    isOpen: function () { return !!socket && socket.readyState === WebSocket.OPEN; },
    on: function (fn) { listeners.push(fn); },
    onOpen: function (fn) {
      openers.push(fn);
      if (socket && socket.readyState === WebSocket.OPEN) fn();
    },
    send: function (frame) {
      if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(frame));
    },
  };
  connect();
})();
