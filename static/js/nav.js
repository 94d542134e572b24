// The navigation menu on narrow screens: the Menu button opens and closes the
// links (aria-expanded says which); Escape or a click elsewhere closes them.
(function () {
  "use strict";
  const toggle = document.getElementById("nav-toggle");
  const nav = document.getElementById("topnav");
  if (!toggle || !nav) return;

  function setOpen(open) {
    toggle.setAttribute("aria-expanded", String(open));
    nav.classList.toggle("open", open);
  }

  toggle.addEventListener("click", function () {
    setOpen(toggle.getAttribute("aria-expanded") !== "true");
  });
  document.addEventListener("keydown", function (event) {
    if (event.key !== "Escape" || !nav.classList.contains("open")) return;
    setOpen(false);
    toggle.focus();
  });
  document.addEventListener("click", function (event) {
    if (nav.classList.contains("open") && !nav.contains(event.target) && !toggle.contains(event.target)) {
      setOpen(false);
    }
  });
})();
