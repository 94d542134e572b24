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

  window.Markdown = { render: render, decorate: decorate };
})();
