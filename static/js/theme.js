// Light or dark theme. Loaded without defer at the end of <head> (the policy forbids
// inline scripts), so the theme is set before the first paint: no flash of the
// wrong one. The page follows prefers-color-scheme until the header's button picks
// the other theme; that choice is kept in localStorage, and dropped again when the
// button comes back to what the system prefers.
(function () {
  "use strict";
  const KEY = "theme";
  const root = document.documentElement;
  const system = window.matchMedia("(prefers-color-scheme: dark)");

  function stored() {
    try {
      const value = localStorage.getItem(KEY);
      return value === "dark" || value === "light" ? value : null;
    } catch (e) {
      return null; // storage blocked: follow the system
    }
  }

  function store(theme) {
    try {
      if (theme === (system.matches ? "dark" : "light")) localStorage.removeItem(KEY);
      else localStorage.setItem(KEY, theme);
    } catch (e) {
      // storage blocked: the choice lasts for this page only
    }
  }

  function apply(theme) {
    // app.css picks its colours from color-scheme (light-dark()); the code
    // highlighting has one stylesheet per theme, switched by their media.
    root.dataset.theme = theme;
    document.querySelectorAll("link[data-code-theme]").forEach(function (link) {
      link.media = link.dataset.codeTheme === theme ? "all" : "not all";
    });
    const button = document.getElementById("theme-toggle");
    if (button) button.setAttribute("aria-pressed", String(theme === "dark"));
    document.dispatchEvent(new CustomEvent("themechange", { detail: { theme: theme } }));
  }

  const current = function () {
    return stored() || (system.matches ? "dark" : "light");
  };
  apply(current());
  system.addEventListener("change", function () {
    apply(current());
  });
  // Another tab chose: follow it.
  window.addEventListener("storage", function (event) {
    if (event.key === KEY || event.key === null) apply(current());
  });

  document.addEventListener("DOMContentLoaded", function () {
    const button = document.getElementById("theme-toggle");
    if (!button) return;
    button.setAttribute("aria-pressed", String(root.dataset.theme === "dark"));
    button.addEventListener("click", function () {
      const next = root.dataset.theme === "dark" ? "light" : "dark";
      store(next);
      apply(next);
    });
  });
})();
