// The few behaviours of our own, here rather than in inline handlers: the
// Content-Security-Policy (webapp/headers.py) refuses every inline script and on…= attribute.

// A field marked data-select-on-focus (a new API token, shown once) selects its whole value
// when it gets focus, so one copy takes it all. Delegated: it also works on htmx swaps.
document.addEventListener("focusin", (event) => {
  if (event.target instanceof HTMLInputElement && event.target.hasAttribute("data-select-on-focus")) {
    event.target.select();
  }
});
