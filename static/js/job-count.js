// The new-job form counts the pasted document as the user types or pastes (400 ms
// after the last change) and says whether it fits the model's context. The Count
// tokens button still makes the draft, and counts an uploaded file.
(function () {
  "use strict";
  const form = document.getElementById("job-form");
  const out = document.getElementById("live-count");
  if (!form || !out) return;
  const DEBOUNCE_MS = 400;
  let timer = null;
  let asked = 0;

  async function count() {
    const text = form.elements.text.value;
    if (!text.trim() || (form.elements.file && form.elements.file.files.length)) {
      out.hidden = true;
      return;
    }
    const ticket = ++asked;
    const body = new FormData();
    ["csrfmiddlewaretoken", "instruction", "text", "model", "max_tokens"].forEach(function (name) {
      if (form.elements[name]) body.append(name, form.elements[name].value);
    });
    out.textContent = "Counting…";
    out.classList.remove("over");
    out.hidden = false;
    let reply;
    try {
      const response = await fetch(form.dataset.countUrl, { method: "POST", body: body, credentials: "same-origin" });
      reply = await response.json();
    } catch (err) {
      reply = { error: "Could not count the tokens: " + err.message };
    }
    if (ticket !== asked) return;  // a later change is being counted
    if (reply.error) {
      out.textContent = reply.error;
      out.classList.add("over");
      return;
    }
    const n = function (x) { return x.toLocaleString("en-US"); };
    out.textContent = "The prompt is " + n(reply.prompt_tokens) + " tokens (the document " +
      n(reply.document_tokens) + ") of the " + n(reply.room) + " the context leaves for it: " +
      (reply.fits ? "it fits." : "over by " + n(reply.prompt_tokens - reply.room) + "; it does not fit in one pass.");
    out.classList.toggle("over", !reply.fits);
  }

  form.addEventListener("input", function (event) {
    if (event.target.name === "title" || event.target.name === "team") return;
    clearTimeout(timer);
    timer = setTimeout(count, DEBOUNCE_MS);
  });
  form.addEventListener("change", function (event) {
    if (event.target.name === "file") count();
  });
})();
