// OBS Browser Source overlay: live captions of one stream over a transparent page.
//
// URL: /overlay/{stream}?size=42&font=Arial&position=bottom&color=ffffff&bg=000000&bgOpacity=0.5
//                        &lines=2&fade=6&align=center&show=speech
// show: what to show of a stream with speech (its `speech` messages, opted in to over the WebSocket):
//   speech  what is said (the scene captions are not shown)
//   scene   the scene captions only (speech is not even asked for)
//   both    what is said, and the scene caption on its own line below it
//   default: the scene captions until the stream's first speech cue, then speech.
// Every query value is checked against a strict pattern or range; anything else falls back to the
// default. Values reach the page only through the CSSOM (style.setProperty) and text through
// textContent, so a query string can neither inject markup nor add CSS declarations.
"use strict";

(function () {
  const DEFAULTS = {
    size: 42, font: null, position: "bottom", color: "#ffffff", bg: "#000000",
    bgOpacity: 0.5, lines: 2, fade: 8, align: "center", show: "auto",
  };
  const STREAM_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
  const GENERIC_FONTS = new Set(["serif", "sans-serif", "monospace", "cursive", "fantasy", "system-ui"]);
  const RECONNECT_MIN = 0.5, RECONNECT_MAX = 5;  // seconds, doubled each failed attempt, +-20 % jitter
  const PING_EVERY = 15;  // seconds; no message for 2.5x that: the connection is dead, start again
  const REPLAY_WINDOW = 1500;  // ms after hello in which messages may be replayed history

  const body = document.body;
  const box = document.getElementById("box");
  const captionEl = document.getElementById("caption");
  const previousEl = document.getElementById("previous");
  const sceneEl = document.getElementById("scene");

  // -- settings ---------------------------------------------------------------
  function number(value, min, max, fallback, integer) {
    if (value === null || !/^\s*-?\d+(\.\d+)?\s*$/.test(value)) return fallback;
    const n = integer ? parseInt(value, 10) : parseFloat(value);
    return Number.isFinite(n) ? Math.min(max, Math.max(min, n)) : fallback;
  }

  function hexRgba(value) {
    const m = /^#?([0-9a-fA-F]{3,4}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})$/.exec(value || "");
    if (!m) return null;
    let h = m[1];
    if (h.length <= 4) h = h.split("").map((c) => c + c).join("");
    const n = (i) => parseInt(h.slice(i, i + 2), 16);
    return [n(0), n(2), n(4), h.length === 8 ? n(6) / 255 : 1];
  }

  function namedRgba(value) {
    // a CSS colour keyword ("red", "white"): letters only, and the browser must know it
    if (!/^[A-Za-z]{3,30}$/.test(value || "") || !CSS.supports("color", value)) return null;
    const probe = document.createElement("span");
    probe.style.color = value;
    body.appendChild(probe);
    const m = /rgba?\((\d+),\s*(\d+),\s*(\d+)(?:,\s*([\d.]+))?\)/.exec(getComputedStyle(probe).color);
    probe.remove();
    return m ? [+m[1], +m[2], +m[3], m[4] === undefined ? 1 : +m[4]] : null;
  }

  function colour(value, fallback) {
    return hexRgba(value) || namedRgba(value) || hexRgba(fallback);
  }

  function css([r, g, b, a]) {
    return `rgba(${r}, ${g}, ${b}, ${Math.round(a * 1000) / 1000})`;
  }

  function fontFamily(value) {
    if (!value || !/^[A-Za-z0-9 ,_-]{1,120}$/.test(value)) return null;
    const names = value.split(",").map((s) => s.trim()).filter(Boolean);
    if (!names.length) return null;
    const quoted = names.map((n) => (GENERIC_FONTS.has(n.toLowerCase()) ? n.toLowerCase() : `"${n}"`));
    return quoted.concat(["sans-serif"]).join(", ");
  }

  function readSettings(search) {
    const q = new URLSearchParams(search);
    const get = (name) => q.get(name);
    const pick = (name, allowed, fallback) => (allowed.includes(get(name)) ? get(name) : fallback);
    return {
      size: number(get("size"), 8, 300, DEFAULTS.size, true),
      font: fontFamily(get("font")),
      position: pick("position", ["top", "bottom"], DEFAULTS.position),
      color: colour(get("color"), DEFAULTS.color),
      bg: colour(get("bg"), DEFAULTS.bg),
      bgOpacity: number(get("bgOpacity") ?? get("bgopacity"), 0, 1, DEFAULTS.bgOpacity, false),
      lines: number(get("lines"), 1, 10, DEFAULTS.lines, true),
      fade: number(get("fade"), 0, 3600, DEFAULTS.fade, false),  // 0: never fade
      align: pick("align", ["left", "center", "right"], DEFAULTS.align),
      show: pick("show", ["speech", "scene", "both"], DEFAULTS.show),
    };
  }

  const settings = readSettings(location.search);

  function applySettings(s) {
    const st = body.style;
    st.setProperty("--size", `${s.size}px`);
    if (s.font) st.setProperty("--font", s.font);
    st.setProperty("--color", css(s.color));
    const [r, g, b, a] = s.bg;
    st.setProperty("--bg", css([r, g, b, a * s.bgOpacity]));
    st.setProperty("--lines", String(s.lines));
    st.setProperty("--align", s.align);
    st.setProperty("--justify", { left: "flex-start", center: "center", right: "flex-end" }[s.align]);
    body.classList.remove("top", "bottom");
    body.classList.add(s.position);
  }
  applySettings(settings);

  const segments = location.pathname.split("/").filter(Boolean);
  let streamId = "";
  try { streamId = decodeURIComponent(segments[segments.length - 1] || ""); } catch (e) { streamId = ""; }
  if (!STREAM_ID.test(streamId)) {
    body.dataset.state = "disconnected";
    body.dataset.error = "bad stream id";
    return;
  }
  body.dataset.stream = streamId;
  body.dataset.show = settings.show;

  // Which messages fill the caption lines: scene captions, or speech cues (then, with show=both, the
  // scene caption has a line of its own below them).
  let hasSpeech = false;  // this stream sent a speech cue since the page connected
  function linesAreSpeech() {
    return settings.show === "speech" || settings.show === "both" || (settings.show === "auto" && hasSpeech);
  }

  // -- captions ---------------------------------------------------------------
  let current = null;     // newest caption text shown, null when nothing is shown
  let previous = [];      // older captions still on screen (oldest first), at most lines-1
  let scene = "";         // show=both: the scene caption under the speech lines
  let fadeTimer = null, clearTimer = null, speechTimer = null;

  function render() {
    captionEl.textContent = current === null ? "" : current;
    previousEl.replaceChildren(...previous.map((t) => {
      const d = document.createElement("div");
      d.textContent = t;
      return d;
    }));
    sceneEl.textContent = scene;
    const noLines = current === null || (current === "" && previous.length === 0);
    box.classList.toggle("empty", noLines && !scene);
  }

  function clearLines() {
    current = null;
    previous = [];
  }

  function clearCaptions() {
    clearTimeout(fadeTimer);
    clearTimeout(clearTimer);
    clearTimeout(speechTimer);
    fadeTimer = clearTimer = speechTimer = null;
    clearLines();
    scene = "";
    box.classList.remove("faded");
    render();
  }

  function armFade() {
    clearTimeout(fadeTimer);
    clearTimeout(clearTimer);
    clearTimer = null;
    box.classList.remove("faded");
    if (settings.fade <= 0) return;
    fadeTimer = setTimeout(() => {
      box.classList.add("faded");                     // CSS fades the opacity out...
      clearTimer = setTimeout(clearCaptions, 350);    // ...then the text goes: never stale text
    }, settings.fade * 1000);
  }

  function stale(emitTime, received) {
    // History replayed on connect can be old: show it only while it is younger than `fade`.
    return settings.fade > 0 && received - helloAt < REPLAY_WINDOW && typeof emitTime === "number"
      && Date.now() / 1000 - emitTime > settings.fade;
  }

  function showCaption(text, emitTime, received) {
    if (stale(emitTime, received)) return;
    if (text !== current) {
      if (current) previous.push(current);
      previous = previous.slice(Math.max(0, previous.length - (settings.lines - 1)));
      if (settings.lines === 1) previous = [];
      current = text;
      render();
    }
    armFade();  // a repeat of the same text keeps it on screen
  }

  function showScene(text, emitTime, received) {
    // show=both: the scene line under the speech lines; captions come every hop and keep the box up
    if (stale(emitTime, received)) return;
    scene = text;
    render();
    armFade();
  }

  function showSpeech(text) {
    if (!hasSpeech) {
      hasSpeech = true;
      body.dataset.speech = "yes";
      if (settings.show === "auto") clearLines();  // from now on the lines say what is said
    }
    showCaption(text, null, performance.now());
    if (settings.show === "both" && settings.fade > 0) {
      // the scene line keeps the box up: what was said goes `fade` seconds after the last cue
      clearTimeout(speechTimer);
      speechTimer = setTimeout(() => { clearLines(); render(); }, settings.fade * 1000);
    }
  }

  // -- connection ---------------------------------------------------------------
  let ws = null, attempts = 0, retryTimer = null, pingTimer = null;
  let helloAt = -Infinity, lastMessage = 0;

  function wsUrl() {
    const url = new URL("../ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    // all=1: repeats of an unchanged caption keep it from fading while the stream is live
    url.search = `?streams=${encodeURIComponent(streamId)}&all=1`;
    if (settings.show !== "scene") url.search += "&types=speech";  // speech cues are opt-in
    const token = new URLSearchParams(location.search).get("token");  // OBS cannot set headers: viewer rights only
    if (token) url.search += `&token=${encodeURIComponent(token)}`;
    return url.toString();
  }

  function setState(state) {
    body.dataset.state = state;
  }

  function connect() {
    retryTimer = null;
    let socket;
    try {
      socket = new WebSocket(wsUrl());
    } catch (e) {
      scheduleReconnect();
      return;
    }
    ws = socket;
    socket.onmessage = (event) => {
      if (socket !== ws) return;
      const received = performance.now();
      lastMessage = received;
      let msg;
      try { msg = JSON.parse(event.data); } catch (e) { return; }
      if (!msg || typeof msg !== "object") return;
      if (msg.type === "hello") {
        attempts = 0;
        helloAt = received;
        setState("connected");
      } else if (msg.type === "caption" && msg.stream_id === streamId && typeof msg.text === "string") {
        // The stream's stabilizer: a caption it holds back ("shown": false) leaves the shown one on screen,
        // and keeps it from fading, since the stream is live. No field (an older daemon): every caption shows.
        if (settings.show === "both") {
          if (msg.shown === false) {
            if (scene) armFade();
          } else {
            showScene(msg.text, msg.emit_time, received);
          }
        } else if (linesAreSpeech()) {
          // show=speech: the captions are not shown
        } else if (msg.shown === false) {
          if (current !== null) armFade();
        } else {
          showCaption(msg.text, msg.emit_time, received);
        }
      } else if (msg.type === "speech" && msg.stream_id === streamId && typeof msg.text === "string") {
        if (settings.show !== "scene" && msg.text.trim()) showSpeech(msg.text);
      } else if (msg.type === "state" && msg.stream_id === streamId && typeof msg.state === "string") {
        body.dataset.streamState = msg.state.replace(/[^a-z_-]/gi, "").slice(0, 32);
        // A stopped stream sends nothing more: its last caption fades as usual; without fading, clear now.
        if ((msg.state === "stopped" || msg.state === "failed") && settings.fade <= 0) clearCaptions();
      }
    };
    socket.onclose = () => {
      if (socket !== ws) return;
      ws = null;
      disconnected();
      scheduleReconnect();
    };
    socket.onerror = () => { /* onclose follows */ };
  }

  function disconnected() {
    setState("disconnected");
    clearCaptions();  // nothing is known while the daemon is away
  }

  function scheduleReconnect() {
    if (retryTimer !== null) return;
    const base = Math.min(RECONNECT_MAX, RECONNECT_MIN * 2 ** attempts);
    attempts += 1;
    const delay = base * (0.8 + 0.4 * Math.random());
    retryTimer = setTimeout(connect, delay * 1000);
  }

  function heartbeat() {
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    if (performance.now() - lastMessage > PING_EVERY * 2500) {
      // half-open connection (daemon host vanished): drop it and reconnect
      const dead = ws;
      ws = null;
      try { dead.close(); } catch (e) { /* already closing */ }
      disconnected();
      scheduleReconnect();
      return;
    }
    try { ws.send(JSON.stringify({ type: "ping" })); } catch (e) { /* onclose handles it */ }
  }

  render();
  connect();
  pingTimer = setInterval(heartbeat, PING_EVERY * 1000);
})();
