// The invitation link selects itself when clicked, ready to copy.
document.querySelectorAll(".select-on-click").forEach((input) => {
  input.addEventListener("click", () => input.select());
});
