// Keeps the jobs list current: every 2 s the server renders the table's rows again (escaped
// HTML, like the page) and they replace the old ones. No other script runs on these pages.
"use strict";
(function () {
  const body = document.querySelector("[data-refresh]");
  if (!body) return;
  const url = body.getAttribute("data-refresh");
  async function refresh() {
    if (document.hidden) return;
    try {
      const answer = await fetch(url, {credentials: "same-origin", headers: {Accept: "text/html"}});
      if (answer.ok) body.innerHTML = await answer.text();
    } catch (e) {
      // The server went away for a moment: the next round tries again.
    }
  }
  setInterval(refresh, 2000);
})();
