// The web chat page: posts the conversation to /v1/chat/completions with "stream": true and appends
// each streamed delta to the reply as it arrives. Plain JS, no build step. Model text is only ever set
// with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];     // {role, content} of the conversation so far (the system prompt is added per request)
let controller = null;       // aborts the reply being streamed

const keyStore = window.sessionStorage;
$("api-key").value = keyStore.getItem("lathe-api-key") || "";
$("api-key").addEventListener("change", () => { keyStore.setItem("lathe-api-key", $("api-key").value); loadModels(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
  if (/api key/i.test(message)) $("settings").open = true;
}

async function errorMessage(response) {
  try { return (await response.json()).error.message; } catch { return `HTTP ${response.status}`; }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { showError(await errorMessage(response)); return; }
  showError("");
  const select = $("model"), chosen = select.value;
  select.replaceChildren(...(await response.json()).data.map((m) => new Option(m.id, m.id)));
  if (chosen) select.value = chosen;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// Server-sent events: blank-line separated events whose "data:" lines carry one JSON chunk each.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

function requestBody() {
  const system = $("system").value.trim();
  const body = {
    model: $("model").value,
    messages: (system ? [{ role: "system", content: system }] : []).concat(conversation),
    stream: true,
    temperature: Number($("temperature").value),
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

async function streamReply(bubble) {
  controller = new AbortController();
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  let chunks = 0;
  for await (const data of sseData(response)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(chunk.error.message);
    const choice = chunk.choices[0];
    if (!choice) continue;
    if (choice.delta.content) {
      bubble.textContent += choice.delta.content;
      bubble.dataset.chunks = String(++chunks);   // read by the browser test: the reply really streamed
      bubble.scrollIntoView({ block: "end" });
    }
    if (choice.finish_reason) bubble.dataset.finish = choice.finish_reason;
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  showError("");
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  setBusy(true);
  try {
    await streamReply(bubble);
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    // keep what arrived, even if stopped: the next turn sees the same conversation the page shows
    if (bubble.textContent) conversation.push({ role: "assistant", content: bubble.textContent });
    else if (conversation.at(-1).role === "user") conversation.pop(), bubble.remove();
    bubble.dataset.done = "true";
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  if (!busy) { controller = null; $("input").focus(); }
}

$("composer").addEventListener("submit", send);
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) $("composer").requestSubmit();
  if (e.key === "Enter" && !e.shiftKey) e.preventDefault();
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").replaceChildren();
  showError("");
});

loadModels();
