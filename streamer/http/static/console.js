// Operator console: every stream with its state, a thumbnail, its captions and figures;
// add and remove streams. Data: GET /streams and /metrics every 2 s, live captions and
// states over /ws?all=1, thumbnails from /streams/{id}/thumbnail.jpg.
// Text from the API is only ever put into the page with textContent.
"use strict";

(function () {
  const POLL_EVERY = 2000;       // ms: stream list, figures, thumbnails
  const TIMELINE_MAX = 200;      // entries kept per stream
  const LATENCIES_MAX = 50;      // captions the latency figures are taken over
  const RECONNECT_MIN = 0.5, RECONNECT_MAX = 5;

  const $ = (id) => document.getElementById(id);
  const body = document.body;
  const streamsEl = $("streams");
  const template = $("stream-template");
  const errorEl = $("error");

  // id -> {info (GET /streams), state, detail, timeline [{text, time, start, end, latency, n}], latencies, card}
  const streams = new Map();

  function entry(id) {
    let s = streams.get(id);
    if (!s) {
      s = { info: null, state: null, detail: null, timeline: [], latencies: [], card: null, thumbUrl: null,
            thumbBusy: false, windowsDropped: 0, lastEmit: -Infinity, lastIndex: -1 };
      streams.set(id, s);
    }
    return s;
  }

  function api(path) {
    return new URL(path, location.href).toString();
  }

  // A token from the page's address: "#token=..." (never sent to the server) or "?token=".
  // fetch() sends it as a header (its full rights); the WebSocket can only carry it in the
  // query, where the daemon grants viewer rights at most.
  const TOKEN = new URLSearchParams(location.hash.slice(1)).get("token")
    || new URLSearchParams(location.search).get("token") || "";

  function apiFetch(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
    return fetch(api(path), Object.assign({}, options, { headers }));
  }

  // -- errors -------------------------------------------------------------------
  function showError(message) {
    errorEl.textContent = message;
    errorEl.hidden = false;
  }

  function clearError() {
    errorEl.textContent = "";
    errorEl.hidden = true;
  }

  async function errorOf(resp) {
    try {
      const data = await resp.json();
      if (data && data.error && data.error.message) return `${data.error.message} (${resp.status} ${data.error.code})`;
    } catch (e) { /* not JSON */ }
    return `HTTP ${resp.status} ${resp.statusText}`;
  }

  // -- rendering -------------------------------------------------------------------
  function fmtSeconds(v) {
    return typeof v === "number" && Number.isFinite(v) ? `${v.toFixed(2)} s` : "-";
  }

  function clock(unix) {
    const d = new Date(unix * 1000);
    return d.toLocaleTimeString([], { hour12: false });
  }

  function setText(card, selector, text) {
    const el = card.querySelector(selector);
    if (el.textContent !== text) el.textContent = text;
  }

  function makeCard(id, s) {
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.id = id;
    card.querySelector(".id").textContent = id;
    const remove = card.querySelector(".remove");
    let armed = null;
    remove.addEventListener("click", async () => {
      if (!armed) {  // first click arms, second click removes
        remove.classList.add("confirm");
        remove.textContent = "Confirm remove";
        armed = setTimeout(() => { armed = null; remove.classList.remove("confirm"); remove.textContent = "Remove"; }, 4000);
        return;
      }
      clearTimeout(armed);
      armed = null;
      remove.disabled = true;
      remove.textContent = "Removing...";
      try {
        const resp = await apiFetch(`streams/${encodeURIComponent(id)}`, { method: "DELETE" });
        if (resp.ok || resp.status === 404) {
          clearError();
          dropStream(id);
        } else {
          showError(`remove ${id}: ${await errorOf(resp)}`);
        }
      } catch (e) {
        showError(`remove ${id}: ${e.message || e}`);
      } finally {
        remove.disabled = false;
        remove.classList.remove("confirm");
        remove.textContent = "Remove";
      }
    });
    s.card = card;
    // keep cards in id order
    const after = [...streamsEl.children].find((c) => c.dataset.id > id);
    streamsEl.insertBefore(card, after || null);
    $("empty").hidden = true;
    renderTimeline(s);
    renderCard(id, s);
    return card;
  }

  function dropStream(id) {
    const s = streams.get(id);
    if (!s) return;
    if (s.card) s.card.remove();
    if (s.thumbUrl) URL.revokeObjectURL(s.thumbUrl);
    streams.delete(id);
    $("empty").hidden = streamsEl.children.length > 0;
  }

  function renderCard(id, s) {
    const card = s.card;
    if (!card) return;
    const info = s.info || {};
    const state = s.state || info.state || "unknown";
    const badge = card.querySelector(".state");
    badge.textContent = state;
    badge.className = `state badge state-${state.replace(/[^a-z_-]/gi, "")}`;
    card.dataset.state = state;
    setText(card, ".detail", s.detail || info.detail || "");
    setText(card, ".url", [info.kind, info.url].filter(Boolean).join("  "));
    setText(card, ".frames", String(info.frames ?? 0));
    setText(card, ".frames-dropped", String(info.frames_dropped ?? 0));
    setText(card, ".windows", String(info.windows ?? 0));
    setText(card, ".windows-dropped", String(s.windowsDropped));
    setText(card, ".captions", String(info.captions ?? 0));
    const last = s.timeline[s.timeline.length - 1];
    setText(card, ".current", last ? last.text : (info.last_caption || ""));
    const lat = s.latencies;
    setText(card, ".latency-last", lat.length ? fmtSeconds(lat[lat.length - 1]) : "-");
    if (lat.length) {
      const sorted = [...lat].sort((a, b) => a - b);
      setText(card, ".latency-stats", `${fmtSeconds(sorted[Math.floor((sorted.length - 1) / 2)])} / ${fmtSeconds(sorted[sorted.length - 1])}`);
    } else {
      setText(card, ".latency-stats", "-");
    }
  }

  function timelineItem(t) {
    const li = document.createElement("li");
    const time = document.createElement("span");
    time.className = "t";
    time.textContent = `${clock(t.time)}  ${t.start.toFixed(1)}-${t.end.toFixed(1)} s`;
    time.title = `media ${t.start.toFixed(2)}-${t.end.toFixed(2)} s, latency ${fmtSeconds(t.latency)}`;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = t.text;
    const n = document.createElement("span");
    n.className = "n";
    n.textContent = t.n > 1 ? `x${t.n}` : "";
    li.append(time, text, n);
    return li;
  }

  function renderTimeline(s) {
    if (!s.card) return;
    const ol = s.card.querySelector(".timeline");
    ol.replaceChildren(...s.timeline.slice().reverse().map(timelineItem));  // newest first
  }

  // -- live messages ---------------------------------------------------------------
  function onCaption(m) {
    if (typeof m.stream_id !== "string" || typeof m.text !== "string") return;
    const s = entry(m.stream_id);
    // Already shown (history replayed after reconnecting)? Captions of a stream come in
    // (emit_time, index) order; a stream re-created under the same id starts at index 0, later.
    if (m.emit_time < s.lastEmit || (m.emit_time === s.lastEmit && m.index <= s.lastIndex)) return;
    s.lastEmit = m.emit_time;
    s.lastIndex = m.index;
    const last = s.timeline[s.timeline.length - 1];
    if (typeof m.model === "string" && $("model").textContent !== m.model) $("model").textContent = m.model;
    if (typeof m.latency === "number") {
      s.latencies.push(m.latency);
      if (s.latencies.length > LATENCIES_MAX) s.latencies.shift();
    }
    const item = { text: m.text, time: m.emit_time, start: +m.start || 0, end: +m.end || 0, latency: m.latency, index: m.index, n: 1 };
    if (last && last.text === m.text) {
      // the same text again: one timeline entry with a count
      last.n += 1;
      last.index = m.index;
      last.end = item.end;
      last.latency = item.latency;
      if (s.card) {
        const first = s.card.querySelector(".timeline li");
        if (first) first.replaceWith(timelineItem(last)); else renderTimeline(s);
      }
    } else {
      s.timeline.push(item);
      if (s.timeline.length > TIMELINE_MAX) s.timeline.shift();
      if (s.card) {
        const ol = s.card.querySelector(".timeline");
        const atTop = ol.scrollTop < 4;
        ol.prepend(timelineItem(item));
        while (ol.children.length > TIMELINE_MAX) ol.lastElementChild.remove();
        if (!atTop) ol.scrollTop += ol.firstElementChild.offsetHeight;  // reading older entries: stay put
      }
    }
    if (s.card) renderCard(m.stream_id, s); else refreshSoon();
  }

  function onState(m) {
    if (typeof m.stream_id !== "string" || typeof m.state !== "string") return;
    const s = streams.get(m.stream_id);
    if (!s) { refreshSoon(); return; }  // a stream added elsewhere: the list will show it
    s.state = m.state;
    s.detail = m.detail;
    renderCard(m.stream_id, s);
  }

  let ws = null, attempts = 0, retryTimer = null;

  function connect() {
    retryTimer = null;
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = TOKEN ? `?all=1&token=${encodeURIComponent(TOKEN)}` : "?all=1";
    let socket;
    try { socket = new WebSocket(url.toString()); } catch (e) { scheduleReconnect(); return; }
    ws = socket;
    socket.onmessage = (event) => {
      let m;
      try { m = JSON.parse(event.data); } catch (e) { return; }
      if (!m || typeof m !== "object") return;
      if (m.type === "hello") {
        attempts = 0;
        body.dataset.state = "connected";
        $("connection").textContent = "connected";
        $("connection").title = typeof m.server === "string" ? m.server : "";
        refresh();
      } else if (m.type === "caption") {
        onCaption(m);
      } else if (m.type === "state") {
        onState(m);
      }
    };
    socket.onclose = () => {
      if (socket !== ws) return;
      ws = null;
      body.dataset.state = "disconnected";
      $("connection").textContent = "disconnected";
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    if (retryTimer !== null) return;
    const delay = Math.min(RECONNECT_MAX, RECONNECT_MIN * 2 ** attempts) * (0.8 + 0.4 * Math.random());
    attempts += 1;
    retryTimer = setTimeout(connect, delay * 1000);
  }

  // -- polling: stream list, figures, thumbnails -------------------------------------------
  let refreshing = false, refreshTimer = null;

  function refreshSoon() {
    if (refreshTimer === null) refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 200);
  }

  async function refresh() {
    if (refreshing) return;
    refreshing = true;
    try {
      const resp = await apiFetch("streams", { cache: "no-store" });
      if (!resp.ok) return;
      const listed = (await resp.json()).streams || [];
      const ids = new Set();
      for (const info of listed) {
        if (!info || typeof info.id !== "string") continue;
        ids.add(info.id);
        const s = entry(info.id);
        s.info = info;
        s.state = info.state;  // the list is authoritative; /ws fills in between polls
        s.detail = info.detail;
        if (!s.card) makeCard(info.id, s); else renderCard(info.id, s);
      }
      for (const id of [...streams.keys()]) if (!ids.has(id)) dropStream(id);
      await Promise.all([refreshDrops(), ...[...streams.entries()].map(([id, s]) => refreshThumb(id, s))]);
    } catch (e) {
      /* daemon away: the connection badge says so */
    } finally {
      refreshing = false;
    }
  }

  async function refreshDrops() {
    try {
      const resp = await apiFetch("metrics", { cache: "no-store" });
      if (!resp.ok) return;
      const text = await resp.text();
      const re = /^streamer_windows_dropped_total\{stream="([^"]*)"\} (\S+)$/gm;
      let m;
      while ((m = re.exec(text)) !== null) {
        const s = streams.get(m[1]);
        if (s) { s.windowsDropped = Math.round(parseFloat(m[2])) || 0; renderCard(m[1], s); }
      }
    } catch (e) { /* optional figure */ }
  }

  async function refreshThumb(id, s) {
    if (!s.card || s.thumbBusy || !(s.info && s.info.frames > 0)) return;
    s.thumbBusy = true;
    try {
      const resp = await apiFetch(`streams/${encodeURIComponent(id)}/thumbnail.jpg`, { cache: "no-store" });
      if (!resp.ok || !s.card) return;
      const url = URL.createObjectURL(await resp.blob());
      const img = s.card.querySelector(".thumb");
      img.onload = () => {
        s.card && s.card.querySelector(".thumb-box").classList.add("has-frame");
        if (s.thumbUrl && s.thumbUrl !== url) URL.revokeObjectURL(s.thumbUrl);
        s.thumbUrl = url;
      };
      img.src = url;
    } catch (e) {
      /* next round */
    } finally {
      s.thumbBusy = false;
    }
  }

  // -- add a stream ------------------------------------------------------------------
  $("add-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = $("add-submit");
    const body = { id: $("add-id").value.trim(), url: $("add-url").value.trim() };
    for (const name of ["window", "hop"]) {
      const v = $(`add-${name}`).value.trim();
      if (v !== "") body[name] = Number(v);
    }
    if ($("add-loop").checked) body.loop = true;
    button.disabled = true;
    try {
      const resp = await apiFetch("streams", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (resp.status === 201) {
        clearError();
        $("add-form").reset();
        await refresh();
      } else {
        showError(`add ${body.id || "stream"}: ${await errorOf(resp)}`);
      }
    } catch (e) {
      showError(`add ${body.id || "stream"}: ${e.message || e}`);
    } finally {
      button.disabled = false;
    }
  });

  connect();
  refresh();
  setInterval(refresh, POLL_EVERY);
})();
