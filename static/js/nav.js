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
  // In the capture phase, and no further: an Escape that closes the menu is not
  // also the chat's Escape, which stops the answer.
  document.addEventListener(
    "keydown",
    function (event) {
      if (event.key !== "Escape" || !nav.classList.contains("open")) return;
      event.stopPropagation();
      setOpen(false);
      toggle.focus();
    },
    true
  );
  document.addEventListener("click", function (event) {
    if (nav.classList.contains("open") && !nav.contains(event.target) && !toggle.contains(event.target)) {
      setOpen(false);
    }
  });
})();
