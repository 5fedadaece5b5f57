"use strict";
// ochat web chat. Talks to the same-origin OpenAI-compatible API under /v1.
// Model output and stored conversations are untrusted: assistant Markdown goes through marked and then
// DOMPurify before it reaches the DOM; user text is only ever set as textContent.

const $ = (id) => document.getElementById(id);
const STORE = "ochat.conversations", CURRENT = "ochat.current", SETTINGS = "ochat.settings", API_KEY = "ochat.apiKey";

let conversations = loadJSON(STORE, []);
let currentId = localStorage.getItem(CURRENT) || null;
let models = [];            // data of GET /v1/models
let controller = null;      // AbortController of the request being generated

function loadJSON(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}
function save() {
  localStorage.setItem(STORE, JSON.stringify(conversations));
  localStorage.setItem(CURRENT, currentId || "");
}
function newId() { return Date.now().toString(36) + Math.random().toString(36).slice(2, 8); }
function current() { return conversations.find((c) => c.id === currentId) || null; }

// ---------- errors and the API key ----------

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}
function clearError() { $("error").hidden = true; $("error-text").textContent = ""; }

async function errorMessage(resp) {
  const text = await resp.text();
  try {
    const body = JSON.parse(text);
    const err = body.error || {};
    if (err.message) return `${resp.status} ${err.type || resp.statusText}: ${err.message}`;
    if (body.detail) return `${resp.status}: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`;
  } catch { /* not JSON: show the text itself */ }
  return `${resp.status} ${resp.statusText}${text ? ": " + text.slice(0, 500) : ""}`;
}

function authHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = localStorage.getItem(API_KEY);
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

function needApiKey(message) {
  $("api-key-form").hidden = false;
  showError(message + (localStorage.getItem(API_KEY) ? "" : " — enter the server's API key on the left."));
  $("api-key").focus();
}

// ---------- models and conditions ----------

async function loadModels() {
  let resp;
  try {
    resp = await fetch("/v1/models", { headers: authHeaders() });
  } catch (e) {
    showError("Cannot reach the server: " + e.message);
    return false;
  }
  if (resp.status === 401) { needApiKey(await errorMessage(resp)); return false; }
  if (!resp.ok) { showError(await errorMessage(resp)); return false; }
  models = (await resp.json()).data || [];
  const select = $("model"), selectB = $("model_b");
  select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  selectB.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  const settings = loadJSON(SETTINGS, {});
  if (models.some((m) => m.id === settings.model)) select.value = settings.model;
  const other = models.find((m) => m.id !== select.value);
  selectB.value = models.some((m) => m.id === settings.model_b && m.id !== select.value) ? settings.model_b
    : (other ? other.id : select.value);
  $("compare-settings").hidden = models.length < 2;
  $("compare").checked = models.length >= 2 && !!settings.compare;
  $("model-b-label").hidden = !$("compare").checked;
  onModelChange();
  return true;
}

function comparing() {
  return $("compare").checked && !$("compare-settings").hidden && $("model_b").value && $("model_b").value !== $("model").value;
}

function onCompareChange() {
  $("model-b-label").hidden = !$("compare").checked;
  saveSettings();
}

function selectedModel() { return models.find((m) => m.id === $("model").value) || models[0] || null; }

function onModelChange() {
  const model = selectedModel();
  const info = (model && model.ochat) || {};
  const conditions = info.conditions || [];
  const select = $("condition");
  select.replaceChildren(...conditions.map((c) => new Option(c, c)));
  select.disabled = conditions.length === 0;
  if (!conditions.length) select.replaceChildren(new Option("(not used by this model)", ""));
  const saved = loadJSON(SETTINGS, {}).condition;
  select.value = conditions.includes(saved) ? saved : (info.default_condition || conditions[0] || "");
  const parts = [info.model_type, info.max_context ? `context ${info.max_context}` : ""].filter(Boolean);
  $("model-info").textContent = parts.join(" · ");
  saveSettings();
}

function readSettings() {
  const num = (id) => { const v = parseFloat($(id).value); return Number.isFinite(v) ? v : undefined; };
  return {
    model: $("model").value, condition: $("condition").value, model_b: $("model_b").value, compare: $("compare").checked,
    temperature: num("temperature"), top_p: num("top_p"), max_tokens: num("max_tokens"),
  };
}
function saveSettings() { localStorage.setItem(SETTINGS, JSON.stringify(readSettings())); }
function restoreSettings() {
  const s = loadJSON(SETTINGS, {});
  for (const id of ["temperature", "top_p", "max_tokens"]) if (s[id] !== undefined) $(id).value = s[id];
}

// ---------- rendering ----------

function renderMarkdown(el, text) {
  const html = marked.parse(text, { gfm: true, breaks: true });
  el.innerHTML = DOMPurify.sanitize(html, { FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
                                            FORBID_ATTR: ["style"] });
  el.querySelectorAll("pre code").forEach((block) => hljs.highlightElement(block));
  el.querySelectorAll("a").forEach((a) => { a.target = "_blank"; a.rel = "noopener noreferrer"; });
}

function metaText(m) {
  const parts = [];
  if (m.condition) parts.push(m.condition);
  if (m.usage) parts.push(`${m.usage.prompt_tokens} prompt tokens`, `${m.usage.completion_tokens} tokens`);
  if (m.tokensPerSecond) parts.push(`${m.tokensPerSecond.toFixed(1)} tokens/s`);
  if (m.stopped) parts.push("stopped");
  else if (m.finish_reason === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

function compareElement(m) {
  // Two answers to one prompt, side by side, and the vote buttons once both have finished.
  const el = document.createElement("div");
  el.className = "msg compare";
  const sides = document.createElement("div");
  sides.className = "sides";
  m.answers.forEach((a, i) => {
    const side = document.createElement("div");
    side.className = "side side-" + "ab"[i] + (m.vote && m.vote === ["model_1", "model_2"][i] ? " winner" : "");
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = `${"AB"[i]}: ${m.models[i]}`;
    const content = document.createElement("div");
    content.className = "content";
    renderMarkdown(content, a.content);
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = metaText(a);
    side.append(role, content, meta);
    sides.append(side);
  });
  const votes = document.createElement("div");
  votes.className = "votes";
  const status = document.createElement("span");
  status.className = "vote-status";
  const labels = { model_1: "A is better", tie: "Tie", model_2: "B is better" };
  for (const [winner, label] of Object.entries(labels)) {
    const b = document.createElement("button");
    b.type = "button"; b.className = "vote vote-" + winner.replace("model_", ""); b.textContent = label;
    b.disabled = !!m.vote;
    b.onclick = () => vote(m, winner);
    votes.append(b);
  }
  if (m.vote) status.textContent = "Vote recorded: " + labels[m.vote];
  votes.append(status);
  votes.hidden = !m.done;
  el.append(sides, votes);
  return el;
}

function messageElement(m) {
  if (m.role === "compare") return compareElement(m);
  const el = document.createElement("div");
  el.className = "msg " + m.role;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = m.role;
  const content = document.createElement("div");
  content.className = "content";
  if (m.role === "assistant") renderMarkdown(content, m.content); else content.textContent = m.content;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = m.role === "assistant" ? metaText(m) : "";
  el.append(role, content, meta);
  return el;
}

function renderMessages() {
  const conv = current();
  const box = $("messages");
  $("title").textContent = conv ? conv.title : "ochat";
  $("system").value = conv ? conv.system || "" : $("system").value;
  if (!conv || !conv.messages.length) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = "Start the conversation below.";
    box.replaceChildren(empty);
    return;
  }
  box.replaceChildren(...conv.messages.map(messageElement));
  box.scrollTop = box.scrollHeight;
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren(...conversations.map((conv) => {
    const li = document.createElement("li");
    li.dataset.id = conv.id;
    if (conv.id === currentId) li.className = "active";
    const title = document.createElement("span");
    title.className = "conv-title";
    title.textContent = conv.title;
    title.title = conv.title;
    title.onclick = () => { currentId = conv.id; save(); renderAll(); };
    const rename = document.createElement("button");
    rename.type = "button"; rename.className = "rename"; rename.textContent = "✎"; rename.title = "Rename";
    rename.onclick = () => startRename(li, conv);
    const del = document.createElement("button");
    del.type = "button"; del.className = "delete"; del.textContent = "✕"; del.title = "Delete";
    del.onclick = () => deleteConversation(conv);
    li.append(title, rename, del);
    return li;
  }));
}

function renderAll() { renderConversations(); renderMessages(); }

// ---------- conversations ----------

function newConversation() {
  const conv = { id: newId(), title: "New chat", system: $("system").value, messages: [], created: Date.now() };
  conversations.unshift(conv);
  currentId = conv.id;
  save();
  renderAll();
  return conv;
}

function startRename(li, conv) {
  const input = document.createElement("input");
  input.value = conv.title;
  input.setAttribute("aria-label", "New title");
  let done = false;
  const finish = (commit) => {
    if (done) return;
    done = true;
    if (commit && input.value.trim()) conv.title = input.value.trim();
    save();
    renderAll();
  };
  input.onkeydown = (e) => { if (e.key === "Enter") finish(true); else if (e.key === "Escape") finish(false); };
  input.onblur = () => finish(true);
  li.replaceChildren(input);
  input.focus();
  input.select();
}

function deleteConversation(conv) {
  if (!confirm(`Delete the conversation "${conv.title}"?`)) return;
  conversations = conversations.filter((c) => c !== conv);
  if (currentId === conv.id) currentId = conversations.length ? conversations[0].id : null;
  save();
  renderAll();
}

// ---------- generation ----------

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("regen").disabled = busy;
}

async function readEvents(resp, onEvent) {
  // Server-sent events: `data: {...}` lines, ended by `data: [DONE]`.
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}

function historyFor(conv, side) {
  // The conversation as model `side` (0 = A, 1 = B) saw it: a compare turn contributes that side's answer.
  const messages = [];
  if ((conv.system || "").trim()) messages.push({ role: "system", content: conv.system });
  for (const m of conv.messages) {
    if (m.role === "compare") messages.push({ role: "assistant", content: m.answers[side].content });
    else messages.push({ role: m.role, content: m.content });
  }
  return messages;
}

function requestBody(settings, model, messages) {
  const body = { model: model || undefined, messages, stream: true, stream_options: { include_usage: true },
                 temperature: settings.temperature, top_p: settings.top_p, max_tokens: settings.max_tokens };
  if (settings.condition) body.condition = settings.condition;
  return body;
}

function frameRenderer(render) {
  // At most one Markdown render per animation frame, however fast the tokens come.
  let pending = false;
  return () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; render(); });
  };
}

async function streamReply(body, signal, reply, onText) {
  // One streaming chat request; fills reply.content, usage, finish_reason and tokensPerSecond.
  // Throws on an HTTP error (with .status), on an error event, and AbortError when stopped.
  const resp = await fetch("/v1/chat/completions", { method: "POST", headers: authHeaders(),
                                                     body: JSON.stringify(body), signal });
  if (!resp.ok) throw Object.assign(new Error(await errorMessage(resp)), { status: resp.status });
  let firstTokenAt = null, lastTokenAt = null;
  try {
    await readEvents(resp, (event) => {
      if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
      if (event.usage) reply.usage = event.usage;
      for (const choice of event.choices || []) {
        const text = (choice.delta && choice.delta.content) || "";
        if (text) {
          lastTokenAt = performance.now();
          if (firstTokenAt === null) firstTokenAt = lastTokenAt;
          reply.content += text;
          onText();
        }
        if (choice.finish_reason) reply.finish_reason = choice.finish_reason;
      }
    });
  } finally {
    const generated = reply.usage ? reply.usage.completion_tokens : null;
    if (generated > 1 && lastTokenAt > firstTokenAt) reply.tokensPerSecond = (generated - 1) * 1000 / (lastTokenAt - firstTokenAt);
  }
}

function reportFailure(e, reply, prefix = "") {
  if (e.name === "AbortError") { reply.stopped = true; return; }
  reply.failed = true;
  if (e.status === 401) needApiKey(prefix + e.message);
  else if (e.status) showError(prefix + e.message);
  else showError(prefix + "Generation failed: " + e.message);
}

async function generate(conv) {
  if (controller) return;
  clearError();
  const settings = readSettings();
  saveSettings();
  const messages = historyFor(conv, 0);
  const reply = { role: "assistant", content: "", condition: settings.condition || undefined };
  conv.messages.push(reply);
  renderMessages();
  const box = $("messages");
  const el = box.lastElementChild;
  el.classList.add("streaming");
  const update = frameRenderer(() => {
    if (conv.id !== currentId || !el.isConnected) return;
    renderMarkdown(el.querySelector(".content"), reply.content);
    box.scrollTop = box.scrollHeight;
  });
  controller = new AbortController();
  setBusy(true);
  try {
    await streamReply(requestBody(settings, settings.model, messages), controller.signal, reply, update);
  } catch (e) {
    reportFailure(e, reply);
  } finally {
    controller = null;
    setBusy(false);
    delete reply.failed;
    if (!reply.content && !reply.stopped) conv.messages.splice(conv.messages.indexOf(reply), 1);
    save();
    if (conv.id === currentId) renderMessages();
  }
}

async function generateCompare(conv) {
  // The same prompt to models A and B at once; both stream side by side, then the user can vote.
  if (controller) return;
  clearError();
  const settings = readSettings();
  saveSettings();
  const names = [settings.model, settings.model_b];
  const histories = [historyFor(conv, 0), historyFor(conv, 1)];
  const condition = settings.condition || undefined;
  const turn = { role: "compare", models: names, answers: [{ content: "", condition }, { content: "", condition }],
                 messages: histories[0], vote: null, done: false };
  conv.messages.push(turn);
  renderMessages();
  const box = $("messages");
  const el = box.lastElementChild;
  const sides = el.querySelectorAll(".side");
  controller = new AbortController();
  setBusy(true);
  await Promise.all(turn.answers.map(async (answer, i) => {
    sides[i].classList.add("streaming");
    const update = frameRenderer(() => {
      if (conv.id !== currentId || !el.isConnected) return;
      renderMarkdown(sides[i].querySelector(".content"), answer.content);
      box.scrollTop = box.scrollHeight;
    });
    try {
      await streamReply(requestBody(settings, names[i], histories[i]), controller.signal, answer, update);
    } catch (e) {
      reportFailure(e, answer, `${"AB"[i]} (${names[i]}): `);
    } finally {
      sides[i].classList.remove("streaming");
    }
  }));
  controller = null;
  setBusy(false);
  turn.done = turn.answers.every((a) => a.content && !a.stopped && !a.failed);
  turn.answers.forEach((a) => delete a.failed);
  if (turn.answers.every((a) => !a.content && !a.stopped)) conv.messages.splice(conv.messages.indexOf(turn), 1);
  save();
  if (conv.id === currentId) renderMessages();
}

async function vote(turn, winner) {
  if (turn.vote) return;
  clearError();
  const body = { model_1: turn.models[0], model_2: turn.models[1], winner, messages: turn.messages,
                 answer_1: turn.answers[0].content, answer_2: turn.answers[1].content };
  let resp;
  try {
    resp = await fetch("/v1/votes", { method: "POST", headers: authHeaders(), body: JSON.stringify(body) });
  } catch (e) {
    showError("Cannot reach the server: " + e.message);
    return;
  }
  if (!resp.ok) {
    const message = await errorMessage(resp);
    if (resp.status === 401) needApiKey(message); else showError(message);
    return;
  }
  turn.vote = winner;
  save();
  renderMessages();
}

function send() {
  const text = $("input").value;
  if (!text.trim() || controller) return;
  const conv = current() || newConversation();
  conv.messages.push({ role: "user", content: text });
  if (conv.title === "New chat") conv.title = text.trim().split("\n")[0].slice(0, 48);
  $("input").value = "";
  save();
  renderAll();
  if (comparing()) generateCompare(conv); else generate(conv);
}

function regenerate() {
  const conv = current();
  if (!conv || controller) return;
  while (conv.messages.length && ["assistant", "compare"].includes(conv.messages[conv.messages.length - 1].role)) {
    conv.messages.pop();
  }
  if (!conv.messages.length) return;
  if (comparing()) generateCompare(conv); else generate(conv);
}

// ---------- wiring ----------

function init() {
  marked.use({ gfm: true });
  restoreSettings();
  $("composer").onsubmit = (e) => { e.preventDefault(); send(); };
  $("input").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  };
  $("stop").onclick = () => { if (controller) controller.abort(); };
  $("regen").onclick = regenerate;
  $("new-chat").onclick = () => { newConversation(); $("input").focus(); };
  $("error-close").onclick = clearError;
  $("model").onchange = onModelChange;
  $("compare").onchange = onCompareChange;
  for (const id of ["condition", "temperature", "top_p", "max_tokens", "model_b"]) $(id).onchange = saveSettings;
  $("system").oninput = () => { const conv = current(); if (conv) { conv.system = $("system").value; save(); } };
  $("api-key-form").onsubmit = async (e) => {
    e.preventDefault();
    localStorage.setItem(API_KEY, $("api-key").value.trim());
    clearError();
    if (await loadModels()) $("api-key-form").hidden = true;
  };
  if (!conversations.some((c) => c.id === currentId)) currentId = conversations.length ? conversations[0].id : null;
  renderAll();
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
