// Renders untrusted model output: markdown → HTML → DOMPurify. No script, event
// handler or javascript: URL survives; links open in a new tab without an opener.
(function () {
  "use strict";
  marked.setOptions({ gfm: true, breaks: false });
  DOMPurify.addHook("afterSanitizeAttributes", function (node) {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });
  const PURIFY = {
    USE_PROFILES: { html: true },
    FORBID_TAGS: ["style", "form", "input", "button", "iframe", "object", "embed", "img"],
    FORBID_ATTR: ["style"],
  };

  function render(text) {
    return DOMPurify.sanitize(marked.parse(text || ""), PURIFY);
  }

  function decorate(container) {
    container.querySelectorAll("pre > code").forEach(function (code) {
      if (code.dataset.done) return;
      code.dataset.done = "1";
      try { hljs.highlightElement(code); } catch (e) { /* unknown language */ }
      const button = document.createElement("button");
      button.type = "button";
      button.className = "copy";
      button.textContent = "Copy";
      button.addEventListener("click", function () { Copy.withButton(button, code.innerText); });
      code.parentElement.appendChild(button);
    });
  }

  // An answer still being written, rendered as it grows. Markdown blocks before the
  // last one are finished (a block ends only where the next begins), so their HTML
  // is kept and only the last, growing block is parsed again: the work per frame
  // stays about one block long instead of growing with the whole answer. The
  // finished answer is rendered whole once (render), which also settles anything a
  // later block can change (a link reference defined at the end).
  function Stream(container) {
    this.container = container;
    this.doneChars = 0; // characters of the text already rendered as finished blocks
    this.text = "";
    container.innerHTML = "";
    this.done = document.createElement("div");
    this.live = document.createElement("div");
    this.done.className = this.live.className = "md-part";
    this.cursor = document.createElement("span");
    this.cursor.className = "cursor";
    this.cursor.setAttribute("aria-hidden", "true");
    container.append(this.done, this.live);
  }

  Stream.prototype.update = function (text) {
    if (!text.startsWith(this.text.slice(0, this.doneChars))) {
      // The text was replaced, not extended (a newer snapshot): start again.
      this.doneChars = 0;
      this.done.innerHTML = "";
    }
    this.text = text;
    const tail = text.slice(this.doneChars);
    const tokens = marked.lexer(tail);
    let last = tokens.length - 1;
    while (last > 0 && tokens[last].type === "space") last--;
    const finished = tokens.slice(0, Math.max(0, last));
    const finishedRaw = finished.map(function (t) { return t.raw; }).join("");
    if (finished.length && tail.startsWith(finishedRaw)) {
      finished.links = tokens.links;
      this.done.insertAdjacentHTML("beforeend", DOMPurify.sanitize(marked.parser(finished), PURIFY));
      this.doneChars += finishedRaw.length;
    }
    this.live.innerHTML = render(text.slice(this.doneChars));
    // The cursor goes at the end of the text, inside the last block, not below it.
    // (marked puts a line break after each block: blank text is passed over).
    let end = this.live;
    for (;;) {
      let child = end.lastChild;
      while (child && child.nodeType === Node.TEXT_NODE && !child.textContent.trim()) {
        child = child.previousSibling;
      }
      if (!child || child.nodeType !== Node.ELEMENT_NODE || /^(BR|HR)$/.test(child.tagName)) break;
      end = child;
    }
    end.append(this.cursor);
  };

  window.Markdown = { render: render, decorate: decorate, Stream: Stream };
})();
