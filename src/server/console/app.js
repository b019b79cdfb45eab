// The waltap console: polls GET /v1/console with the key kept in sessionStorage and
// draws what it answers. No framework; every value goes into the DOM as text.
"use strict";
(() => {
  const KEY = "waltap.console.key";
  const PERIOD = 2000;
  const WINDOW = 300; // seconds of rate history drawn
  const $ = (id) => document.getElementById(id);
  let timer = null;
  let failures = 0;
  let started = null;

  const num = (n) => (n == null ? "–" : Number(n).toLocaleString("en-US"));
  function bytes(n) {
    if (n == null) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let v = Number(n), u = 0;
    while (Math.abs(v) >= 1024 && u < units.length - 1) { v /= 1024; u++; }
    return (u ? v.toFixed(1) : String(v)) + " " + units[u];
  }
  function duration(s) {
    if (s == null) return "–";
    if (s < 1) return s <= 0 ? "0 s" : s.toFixed(2) + " s";
    if (s < 90) return s.toFixed(s < 10 ? 1 : 0) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }
  function ago(iso, now) {
    if (!iso) return "never";
    const t = Date.parse(iso) / 1000;
    return isNaN(t) ? iso : duration(Math.max(0, now - t)) + " ago";
  }
  const rate = (r) => (r == null ? "–" : (r < 10 ? r.toFixed(1) : Math.round(r).toLocaleString("en-US")) + "/s");
  function text(id, value, cls) {
    const el = $(id);
    el.textContent = value;
    if (cls !== undefined) el.className = cls;
  }
  function cell(tr, label, value, cls, sub) {
    const td = document.createElement("td");
    td.dataset.label = label;
    const box = document.createElement("div");
    box.className = "value";
    const main = document.createElement("span");
    main.textContent = value;
    if (cls) main.className = cls;
    box.appendChild(main);
    if (sub) {
      const s = document.createElement("span");
      s.className = "sub";
      s.textContent = sub;
      box.appendChild(s);
    }
    td.appendChild(box);
    tr.appendChild(td);
    return td;
  }

  function setConn(state, label) {
    const el = $("conn");
    el.dataset.state = state;
    el.textContent = label;
  }
  function notice(message) {
    const el = $("notice");
    el.hidden = !message;
    el.textContent = message || "";
  }
  function showKeyForm(message) {
    clearTimeout(timer);
    $("panels").hidden = true;
    $("forget").hidden = true;
    $("key-form").hidden = false;
    text("key-error", message || "");
    setConn("idle", "not connected");
    $("key").focus();
  }

  function schedule() {
    clearTimeout(timer);
    const delay = failures ? Math.min(PERIOD * 2 ** (failures - 1), 10000) : PERIOD;
    timer = setTimeout(poll, delay);
  }
  function offline(message) {
    failures++;
    setConn("offline", "reconnecting");
    notice(message + " Retrying; the figures below are from " + $("updated").dataset.at + ".");
    schedule();
  }

  async function poll() {
    const key = sessionStorage.getItem(KEY);
    if (!key) return showKeyForm("");
    let res;
    try {
      res = await fetch("/v1/console", { headers: { Authorization: "Bearer " + key }, cache: "no-store" });
    } catch (e) {
      return offline("The server cannot be reached.");
    }
    if (res.status === 401 || res.status === 403) {
      sessionStorage.removeItem(KEY);
      return showKeyForm(res.status === 401 ? "This key was not accepted." : "This key cannot open the console (a key is needed, not a token).");
    }
    let data = null;
    try { if (res.ok) data = await res.json(); } catch (e) { data = null; }
    if (!data) return offline("The server answered " + res.status + ".");
    failures = 0;
    render(data);
    schedule();
  }

  function render(d) {
    const now = d.server.now;
    $("key-form").hidden = true;
    $("panels").hidden = false;
    $("forget").hidden = false;
    setConn("live", "live");
    text("member", d.server.member + " · " + d.server.role + (d.server.term ? " (term " + d.server.term + ")" : ""));
    const restarted = started !== null && started !== d.server.startedAt;
    started = d.server.startedAt;
    const gaps = d.unavailable.length ? "Not readable right now: " + d.unavailable.join(", ") + "." : "";
    notice([restarted ? "The server restarted: rates start again from now." : "", gaps].filter(Boolean).join(" "));

    const s = d.slot;
    text("slot-name", s ? s.name : "");
    text("slot-connected", s ? (s.connected ? "yes" : "no") : "–", s && !s.connected ? "bad" : "");
    text("slot-lag-bytes", s ? bytes(s.lagBytes) : "–");
    text("slot-lag-seconds", s ? duration(s.lagSeconds) : "–", s && s.lagSeconds > 60 ? "warn" : "");
    text("slot-retained", s ? bytes(s.retainedBytes) : "–");
    text("slot-confirmed", s ? s.confirmedPosition || "–" : "–");
    text("slot-wal-status", s ? s.walStatus || "–" : "–", s && s.walStatus && s.walStatus !== "reserved" ? "warn" : "");
    text("log-bytes", bytes(d.log.bytes));
    const keep = [];
    if (d.log.retentionAgeSeconds != null) keep.push(duration(d.log.retentionAgeSeconds));
    if (d.log.retentionBytes != null) keep.push(bytes(d.log.retentionBytes));
    text("log-retention", keep.length ? "keeps " + keep.join(" / ") : "none (events are kept)");

    const last = d.rates.length ? d.rates[d.rates.length - 1] : null;
    text("rate-in", rate(last && last.eventsIn));
    text("rate-out", rate(last && last.eventsOut));
    text("total-in", num(d.totals.eventsIn));
    text("total-out", num(d.totals.eventsOut));
    text("total-subscribers", num(d.totals.subscribers));
    text("total-errors", num(d.totals.errors));
    const kept = d.rates.filter((r) => r.at >= now - WINDOW);
    text("rates-span", kept.length > 1 ? "last " + duration(now - kept[0].at) : "since the page opened");
    chart($("chart-in"), d.rates, "eventsIn", now);
    chart($("chart-out"), d.rates, "eventsOut", now);

    streams(d.streams, now);
    subscribers(d.subscribers);
    group(Object.assign({ now }, d.group));
    const at = new Date(now * 1000).toLocaleTimeString();
    $("updated").dataset.at = at;
    text("updated", "Updated " + at + " · every " + PERIOD / 1000 + " s");
  }

  // The x axis spans the history there is, up to WINDOW: a page opened a moment ago
  // draws its few samples across the chart rather than in its last pixels.
  function chart(svg, rates, field, now) {
    const ns = "http://www.w3.org/2000/svg";
    const kept = rates.filter((r) => r.at >= now - WINDOW);
    const from = kept.length > 1 ? kept[0].at : now - WINDOW;
    const span = Math.max(now - from, 1);
    const points = kept.map((r) => [((r.at - from) / span) * 300, r[field]]);
    const max = Math.max(1, ...points.map((p) => p[1]));
    const xy = points.map(([x, v]) => x.toFixed(1) + "," + (58 - (v / max) * 54).toFixed(1));
    svg.replaceChildren();
    if (points.length) {
      const area = document.createElementNS(ns, "path");
      area.setAttribute("class", "area");
      area.setAttribute("d", "M" + points[0][0].toFixed(1) + ",58 L" + xy.join(" L") + " L" + points[points.length - 1][0].toFixed(1) + ",58 Z");
      const line = document.createElementNS(ns, "polyline");
      line.setAttribute("class", "line");
      line.setAttribute("points", xy.join(" "));
      svg.append(area, line);
    }
    svg.setAttribute("aria-label", field + " per second, at most " + max.toFixed(1));
  }

  function streams(list, now) {
    const body = $("streams").tBodies[0];
    body.replaceChildren();
    if (list == null) {
      text("streams-note", "This key may not see streams.");
      return;
    }
    text("streams-note", list.length ? "" : "No streams on this source yet.");
    for (const s of list) {
      const tr = document.createElement("tr");
      tr.dataset.stream = s.name;
      cell(tr, "Stream", s.name);
      cell(tr, "Tables", s.tables.join(", "));
      cell(tr, "Cursor", s.cursor).classList.add("cursor");
      let initial = "";
      const init = s.initialState;
      if (init && init.state === "copying" && init.copy) {
        const total = init.copy.estimatedRows;
        initial = "copying initial state: " + num(init.copy.rows) + (total ? " of ~" + num(total) : "") + " rows";
      } else if (init && init.state === "ready") {
        initial = "initial state: " + num(init.acknowledged) + " of " + num(init.rows) + " rows acknowledged";
      } else if (init) {
        initial = "initial state waits for its first consumer";
      }
      cell(tr, "Backlog", num(s.backlog) + (s.backlogCapped ? "+" : ""), "", initial).classList.add("backlog");
      cell(tr, "Held by", s.lease ? s.lease.holder : "nobody", s.lease ? "" : "muted").classList.add("holder");
      cell(tr, "Last ack", ago(s.ackedAt, now)).classList.add("acked");
      const risks = {
        ok: "ok", unbounded: "none (no retention)", watch: "watch", danger: "danger", stale: "stale: reset it",
      };
      const pending = s.oldestPendingSeconds != null ? "oldest unacknowledged event " + duration(s.oldestPendingSeconds) + " old" : "";
      cell(tr, "Retention risk", risks[s.risk] || s.risk, "risk-" + s.risk, pending).classList.add("risk");
      body.appendChild(tr);
    }
  }

  function subscribers(list) {
    const body = $("subscribers").tBodies[0];
    body.replaceChildren();
    text("subscribers-note", list.length ? "" : "No subscriptions or streams.");
    for (const t of list) {
      const tr = document.createElement("tr");
      tr.dataset.table = t.table;
      cell(tr, "Table", t.table);
      cell(tr, "Live subscriptions", num(t.subscriptions)).classList.add("subscriptions");
      cell(tr, "Streams (held)", num(t.streams) + " (" + num(t.streamsHeld) + ")");
      body.appendChild(tr);
    }
  }

  function group(g) {
    const l = g.leader;
    text("group-leader", l ? (l.active ? "Leader: " : "Last leader (none holds the lock now): ") + (l.member || "?") + ", term " + l.term + (l.since ? ", for " + ago(l.since, g.now).replace(" ago", "") : "") : "No member has led yet.", l && !l.active ? "bad" : "");
    const ul = $("members");
    ul.replaceChildren();
    for (const m of g.members || []) {
      const li = document.createElement("li");
      li.textContent = m.member + (m.leader ? " — leader" : " — follower (waiting)") + (m.since ? ", connected " + ago(m.since, g.now) : "");
      ul.appendChild(li);
    }
  }

  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    $("key").value = "";
    text("key-error", "");
    setConn("idle", "connecting");
    poll();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showKeyForm("");
  });
  $("updated").dataset.at = "never";
  poll();
})();
