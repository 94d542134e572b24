// Copy to the clipboard. The Clipboard API exists only in secure contexts (HTTPS,
// localhost), so a page opened over plain HTTP across a LAN falls back to the older
// way: select the text in a hidden textarea and execCommand("copy").
(function () {
  "use strict";

  function fallbackCopy(text) {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.top = "-1000px";
    area.style.opacity = "0";
    const focused = document.activeElement;
    document.body.append(area);
    area.select();
    let copied = false;
    try { copied = document.execCommand("copy"); } catch (e) { copied = false; }
    area.remove();
    if (focused && focused.focus) focused.focus();
    return copied ? Promise.resolve() : Promise.reject(new Error("copy refused"));
  }

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).catch(function () { return fallbackCopy(text); });
    }
    return fallbackCopy(text);
  }

  // A copy button says whether it worked, then goes back to its label.
  function copyWith(button, text) {
    const label = button.textContent;
    copyText(text).then(
      function () { button.textContent = "Copied"; },
      function () { button.textContent = "Select and copy by hand"; }
    );
    setTimeout(function () { button.textContent = label; }, 1500);
  }

  // <button data-copy="#id">: copies that element's text.
  document.addEventListener("click", function (event) {
    const button = event.target.closest("button[data-copy]");
    if (!button) return;
    const source = document.querySelector(button.dataset.copy);
    if (source) copyWith(button, source.innerText);
  });

  window.Copy = { text: copyText, withButton: copyWith };
})();
