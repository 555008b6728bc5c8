//! The admin dashboard: one self-contained HTML page (no CDN) that polls `/status`.

/// The page. A token, when the admin API needs one, is read from the URL fragment
/// (`/#token=...`) so it never reaches a server log.
pub const HTML: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>palisade</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d232a; background: #f7f8fa; }
  h1 { font-size: 1.3rem; margin: 0 0 .3rem; }
  .meta { color: #5b6672; margin-bottom: 1rem; }
  section { background: #fff; border: 1px solid #dde2e7; border-radius: 8px; padding: .8rem 1rem; margin-bottom: 1rem; }
  h2 { font-size: 1.05rem; margin: 0 0 .5rem; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid #eef1f4; font-variant-numeric: tabular-nums; }
  th { color: #5b6672; font-weight: 600; }
  .up { color: #137333; font-weight: 600; }
  .down { color: #b3261e; font-weight: 600; }
  .panic { background: #fde7e9; color: #b3261e; padding: .1rem .4rem; border-radius: 4px; }
  #error { color: #b3261e; }
</style>
</head>
<body>
<h1>palisade</h1>
<div class="meta" id="meta">loading…</div>
<div class="meta" id="reload"></div>
<div id="error"></div>
<div id="upstreams"></div>
<script>
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const last = {};
function esc(s) { return String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;"}[c])); }
async function refresh() {
  try {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const r = await fetch("/status", { headers, cache: "no-store" });
    if (!r.ok) throw new Error("/status answered " + r.status);
    const s = await r.json();
    const now = Date.now() / 1000;
    document.getElementById("meta").textContent =
      `version ${s.version} · generation ${s.generation} · up ${Math.round(s.uptime_seconds)} s · ` +
      `${s.connections} connections · reloads ${s.reloads.success} ok / ${s.reloads.failure} failed` +
      (s.draining ? " · DRAINING" : "");
    const reload = s.reloads.last;
    document.getElementById("reload").textContent = !reload ? "no reload yet" :
      `last reload ${Math.round(reload.seconds_ago)} s ago: ` +
      (reload.ok ? `ok, generation ${reload.generation}` : `rejected: ${reload.error}`);
    let html = "";
    for (const [name, u] of Object.entries(s.upstreams)) {
      html += `<section data-upstream="${esc(name)}"><h2>${esc(name)} <small>(${esc(u.balance)})</small>` +
        (u.panic ? ` <span class="panic">panic mode</span>` : "") +
        `</h2><table><tr><th>backend</th><th>state</th><th>in flight</th><th>weight</th>` +
        `<th>requests</th><th>req/s</th><th>failures</th><th>err/s</th><th>latency</th></tr>`;
      for (const b of u.backends) {
        const key = name + "/" + b.addr, prev = last[key];
        const dt = prev ? now - prev.t : 0;
        const rate = dt > 0 ? ((b.requests - prev.requests) / dt).toFixed(1) : "–";
        const errs = dt > 0 ? ((b.failures - prev.failures) / dt).toFixed(1) : "–";
        last[key] = { t: now, requests: b.requests, failures: b.failures };
        const state = b.ejected ? `<span class="down">ejected</span>` :
          b.healthy ? `<span class="up">healthy</span>` : `<span class="down">unhealthy</span>`;
        html += `<tr data-backend="${esc(b.addr)}"><td>${esc(b.addr)}</td><td>${state}</td><td>${b.in_flight}</td>` +
          `<td>${b.weight}</td><td>${b.requests}</td><td>${rate}</td><td>${b.failures}</td><td>${errs}</td>` +
          `<td>${b.ewma_ms.toFixed(2)} ms</td></tr>`;
      }
      html += "</table></section>";
    }
    document.getElementById("upstreams").innerHTML = html;
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = String(e);
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"##;
