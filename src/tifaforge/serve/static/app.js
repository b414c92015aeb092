// The chat page: plain DOM, no build step. Every model or card text goes through textContent,
// never innerHTML, so markup in a card or a reply is shown as text (the CSP blocks the rest).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { system: "", name: "", greeting: "", messages: [], abort: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const r = await fetch(path, body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!r.ok) {
    let msg = r.status + "";
    try { msg += ": " + (await r.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}

function status(text) { $("status").textContent = text || ""; }

// --- cards -------------------------------------------------------------------------------

let cards = [];
async function loadCards() {
  try {
    cards = (await (await api("/api/cards")).json()).cards;
  } catch (e) { status("卡片列表：" + e.message); return; }
  const sel = $("card");
  sel.replaceChildren();
  cards.forEach((c, i) => { const o = document.createElement("option"); o.value = i; o.textContent = c.name; sel.append(o); });
  if (cards.length) await useCard(cards[0].card);
}

async function useCard(card) {
  try {
    const v = await (await api("/api/card", { card, user: $("user").value })).json();
    Object.assign(state, { system: v.system_prompt, name: v.name, greeting: v.first_mes });
    state.messages = v.first_mes ? [{ role: "assistant", content: v.first_mes }] : [];
    status("");
    render();
  } catch (e) { status("角色卡：" + e.message); }
}

// A PNG card keeps its JSON base64-encoded in a tEXt chunk named ccv3 (V3) or chara (V2).
function pngCard(buf) {
  const view = new DataView(buf), found = {};
  for (let at = 8; at + 8 <= buf.byteLength;) {
    const len = view.getUint32(at), type = String.fromCharCode(...new Uint8Array(buf, at + 4, 4));
    if (type === "tEXt") {
      const data = new Uint8Array(buf, at + 8, len), zero = data.indexOf(0);
      const keyword = new TextDecoder("latin1").decode(data.slice(0, zero));
      found[keyword] = new TextDecoder("latin1").decode(data.slice(zero + 1));
    }
    at += 12 + len;
  }
  const b64 = found.ccv3 || found.chara;
  if (!b64) throw new Error("PNG 中没有角色卡数据");
  const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

async function uploadCard(file) {
  try {
    const card = file.name.toLowerCase().endsWith(".png") ? pngCard(await file.arrayBuffer())
      : JSON.parse(await file.text());
    cards.push({ name: (card.data || card).name || file.name, card });
    const o = document.createElement("option");
    o.value = cards.length - 1; o.textContent = cards[cards.length - 1].name;
    $("card").append(o); $("card").value = o.value;
    await useCard(card);
  } catch (e) { status("上传失败：" + e.message); }
}

// --- the conversation --------------------------------------------------------------------

function bubble(m, i) {
  const div = document.createElement("div");
  div.className = "msg " + m.role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = m.role === "user" ? ($("user").value || "你") : (state.name || "助手");
  div.append(who);
  if (m.reasoning) {
    const d = document.createElement("details"), s = document.createElement("summary"), t = document.createElement("div");
    s.textContent = "思考过程"; t.className = "think"; t.textContent = m.reasoning;
    d.append(s, t); div.append(d);
  }
  const body = document.createElement("div");
  body.className = "content"; body.textContent = m.content;
  div.append(body);
  const tools = document.createElement("div");
  tools.className = "tools";
  const edit = document.createElement("button");
  edit.type = "button"; edit.className = "edit"; edit.textContent = "编辑";
  edit.onclick = () => editMessage(i, div, body);
  tools.append(edit); div.append(tools);
  return div;
}

function render() {
  $("log").replaceChildren(...state.messages.map(bubble));
  $("log").scrollTop = $("log").scrollHeight;
}

function editMessage(i, div, body) {
  const area = document.createElement("textarea");
  area.value = state.messages[i].content; area.className = "editor";
  const save = document.createElement("button");
  save.type = "button"; save.className = "save"; save.textContent = "保存";
  save.onclick = () => { state.messages[i].content = area.value; render(); };
  body.replaceWith(area); div.append(save);
  area.focus();
}

async function generate() {
  const history = [{ role: "system", content: state.system },
    ...state.messages.map((m) => ({ role: m.role, content: m.content }))];
  const reply = { role: "assistant", content: "", reasoning: "" };
  state.messages.push(reply);
  render();
  const node = $("log").lastChild;
  state.abort = new AbortController();
  busy(true);
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), signal: state.abort.signal,
      body: JSON.stringify({ messages: history, stream: true }) });
    if (!r.ok) throw new Error(r.status + ": " + ((await r.json()).error || {}).message);
    await readStream(r, (delta) => {
      reply.reasoning += delta.reasoning_content || "";
      reply.content += delta.content || "";
      node.replaceWith(bubble(reply, state.messages.length - 1));
    });
  } catch (e) {
    if (e.name !== "AbortError") status("生成失败：" + e.message);
  } finally {
    busy(false); state.abort = null; render();
  }
}

// Server-sent events over fetch: `data: {...}` lines, ending with `data: [DONE]`.
async function readStream(response, onDelta) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, cut).trim(); buf = buf.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      for (const c of event.choices || []) onDelta(c.delta || {});
    }
  }
}

function busy(on) {
  $("send").disabled = on; $("regen").disabled = on; $("stop").disabled = !on;
  document.body.dataset.busy = on ? "1" : "";
}

function send(ev) {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.abort) return;
  state.messages.push({ role: "user", content: text });
  $("input").value = "";
  generate();
}

function regenerate() {
  if (state.abort) return;
  while (state.messages.length && state.messages[state.messages.length - 1].role === "assistant"
         && state.messages.length > (state.greeting ? 1 : 0)) state.messages.pop();
  if (state.messages.length && state.messages[state.messages.length - 1].role === "user") generate();
}

function exportChat() {
  const data = { character: state.name, user: $("user").value, system: state.system, messages: state.messages };
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
  a.download = "chat-" + (state.name || "tifa") + ".json";
  a.click();
  return data;
}

window.addEventListener("DOMContentLoaded", () => {
  $("key").value = sessionStorage.getItem("tifa-key") || "";
  $("key").onchange = () => { sessionStorage.setItem("tifa-key", $("key").value); loadCards(); };
  $("composer").onsubmit = send;
  $("input").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) send(e); };
  $("regen").onclick = regenerate;
  $("stop").onclick = () => state.abort && state.abort.abort();
  $("export").onclick = exportChat;
  $("card").onchange = () => useCard(cards[$("card").value].card);
  $("upload").onchange = () => $("upload").files[0] && uploadCard($("upload").files[0]);
  busy(false);
  loadCards();
});
