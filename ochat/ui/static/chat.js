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
  const select = $("model");
  select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  const settings = loadJSON(SETTINGS, {});
  if (models.some((m) => m.id === settings.model)) select.value = settings.model;
  onModelChange();
  return true;
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
    model: $("model").value, condition: $("condition").value,
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

function messageElement(m) {
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

async function generate(conv) {
  if (controller) return;
  clearError();
  const settings = readSettings();
  saveSettings();
  const messages = [];
  if ((conv.system || "").trim()) messages.push({ role: "system", content: conv.system });
  for (const m of conv.messages) messages.push({ role: m.role, content: m.content });
  const reply = { role: "assistant", content: "", condition: settings.condition || undefined };
  conv.messages.push(reply);
  renderMessages();
  const box = $("messages");
  let el = box.lastElementChild;
  el.classList.add("streaming");

  let pending = false;
  const update = () => {  // at most one Markdown render per animation frame
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      if (conv.id !== currentId || !el.isConnected) return;
      renderMarkdown(el.querySelector(".content"), reply.content);
      box.scrollTop = box.scrollHeight;
    });
  };

  const body = { model: settings.model || undefined, messages, stream: true, stream_options: { include_usage: true },
                 temperature: settings.temperature, top_p: settings.top_p, max_tokens: settings.max_tokens };
  if (settings.condition) body.condition = settings.condition;
  controller = new AbortController();
  setBusy(true);
  let firstTokenAt = null, lastTokenAt = null;
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: authHeaders(),
                                                       body: JSON.stringify(body), signal: controller.signal });
    if (!resp.ok) {
      const message = await errorMessage(resp);
      if (resp.status === 401) needApiKey(message); else showError(message);
      return;
    }
    await readEvents(resp, (event) => {
      if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
      if (event.usage) reply.usage = event.usage;
      for (const choice of event.choices || []) {
        const text = (choice.delta && choice.delta.content) || "";
        if (text) {
          lastTokenAt = performance.now();
          if (firstTokenAt === null) firstTokenAt = lastTokenAt;
          reply.content += text;
          update();
        }
        if (choice.finish_reason) reply.finish_reason = choice.finish_reason;
      }
    });
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else showError("Generation failed: " + e.message);
  } finally {
    controller = null;
    setBusy(false);
    const generated = reply.usage ? reply.usage.completion_tokens : null;
    if (generated > 1 && lastTokenAt > firstTokenAt) reply.tokensPerSecond = (generated - 1) * 1000 / (lastTokenAt - firstTokenAt);
    if (!reply.content && !reply.stopped) conv.messages.splice(conv.messages.indexOf(reply), 1);
    save();
    if (conv.id === currentId) renderMessages();
  }
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
  generate(conv);
}

function regenerate() {
  const conv = current();
  if (!conv || controller) return;
  while (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
  if (!conv.messages.length) return;
  generate(conv);
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
  for (const id of ["condition", "temperature", "top_p", "max_tokens"]) $(id).onchange = saveSettings;
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
