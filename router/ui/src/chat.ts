// The chat playground: streaming /v1/chat/completions, settings, stop and regenerate, Markdown
// rendering (sanitized: model output is untrusted), TTFT and tokens/s per answer, and
// conversations kept in this browser's localStorage.
import DOMPurify from "dompurify";
import { marked } from "marked";
import { call, events, showError } from "./api";

interface Stats {
  ttftMs: number;
  tokensPerSecond: number;
  tokens: number;
  stopped?: boolean;
}
interface Message {
  role: "user" | "assistant";
  content: string;
  stats?: Stats;
}
interface Conversation {
  id: string;
  title: string;
  messages: Message[];
}

const STORE = "tessera.conversations";
const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

let conversations: Conversation[] = [];
let current: Conversation;
let abort: AbortController | null = null;

function save() {
  localStorage.setItem(STORE, JSON.stringify(conversations));
}

function load() {
  try {
    conversations = JSON.parse(localStorage.getItem(STORE) ?? "[]");
  } catch {
    conversations = [];
  }
  if (!conversations.length) newConversation();
  else current = conversations[0];
}

function newConversation() {
  current = { id: crypto.randomUUID(), title: "New chat", messages: [] };
  conversations.unshift(current);
  save();
}

function renderList() {
  const list = $("conversation-list");
  list.replaceChildren(
    ...conversations.map((c) => {
      const li = document.createElement("li");
      li.textContent = c.title;
      li.classList.toggle("active", c === current);
      li.addEventListener("click", () => {
        if (abort) return;
        current = c;
        render();
      });
      return li;
    }),
  );
}

function markdown(text: string): string {
  return DOMPurify.sanitize(marked.parse(text, { async: false }) as string);
}

function statsLine(s: Stats): string {
  return `${s.tokens} tokens · TTFT ${s.ttftMs.toFixed(0)} ms · ${s.tokensPerSecond.toFixed(1)} tokens/s${s.stopped ? " · stopped" : ""}`;
}

function messageElement(m: Message): HTMLElement {
  const div = document.createElement("div");
  div.className = `message ${m.role}`;
  const body = document.createElement("div");
  body.className = "content";
  if (m.role === "assistant") body.innerHTML = markdown(m.content);
  else body.textContent = m.content;
  div.append(body);
  if (m.stats) {
    const stats = document.createElement("div");
    stats.className = "stats muted";
    stats.textContent = statsLine(m.stats);
    div.append(stats);
  }
  return div;
}

function render() {
  renderList();
  const box = $("messages");
  box.replaceChildren(...current.messages.map(messageElement));
  box.scrollTop = box.scrollHeight;
}

function number(id: string): number | undefined {
  const v = ($(id) as HTMLInputElement).value;
  return v === "" ? undefined : Number(v);
}

async function answer() {
  const system = ($("system") as HTMLTextAreaElement).value.trim();
  const messages = [
    ...(system ? [{ role: "system", content: system }] : []),
    ...current.messages.map(({ role, content }) => ({ role, content })),
  ];
  const reply: Message = { role: "assistant", content: "" };
  current.messages.push(reply);
  const box = $("messages");
  const el = messageElement(reply);
  el.classList.add("streaming");
  box.append(el);
  const content = el.querySelector<HTMLElement>(".content")!;
  abort = new AbortController();
  setBusy(true);
  const start = performance.now();
  let first = 0;
  let tokens = 0;
  let pending = false;
  try {
    const r = await call(
      "POST",
      "/v1/chat/completions",
      {
        model: "tgi",
        messages,
        stream: true,
        stream_options: { include_usage: true },
        temperature: number("temperature"),
        top_p: number("top_p"),
        max_tokens: number("max_tokens"),
        seed: number("seed"),
      },
      abort.signal,
    );
    for await (const data of events(r)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (!delta) continue;
      if (!first) first = performance.now();
      tokens += chunk.usage ? 0 : 1;
      reply.content += delta;
      if (!pending) {
        // Re-render Markdown at most once per frame, however fast tokens arrive.
        pending = true;
        requestAnimationFrame(() => {
          pending = false;
          content.innerHTML = markdown(reply.content);
          box.scrollTop = box.scrollHeight;
        });
      }
    }
  } catch (e) {
    showError(e);
  } finally {
    const stopped = abort?.signal.aborted ?? false;
    const end = performance.now();
    if (first) {
      reply.stats = {
        ttftMs: first - start,
        tokens,
        tokensPerSecond: tokens > 1 ? (tokens - 1) / ((end - first) / 1000) : 0,
        stopped,
      };
    }
    if (!reply.content && !stopped) current.messages.pop();
    abort = null;
    setBusy(false);
    save();
    render();
  }
}

function setBusy(busy: boolean) {
  $("send").hidden = busy;
  $("regenerate").hidden = busy;
  $("stop").hidden = !busy;
}

export function initChat() {
  load();
  render();
  const prompt = $("prompt") as HTMLTextAreaElement;
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = prompt.value.trim();
    if (!text || abort) return;
    prompt.value = "";
    if (!current.messages.length) current.title = text.slice(0, 40);
    current.messages.push({ role: "user", content: text });
    render();
    void answer();
  });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      ($("chat-form") as HTMLFormElement).requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => abort?.abort());
  $("regenerate").addEventListener("click", () => {
    if (abort) return;
    while (current.messages.length && current.messages[current.messages.length - 1].role === "assistant") {
      current.messages.pop();
    }
    if (!current.messages.length) return;
    render();
    void answer();
  });
  $("new-chat").addEventListener("click", () => {
    if (abort) return;
    newConversation();
    render();
  });
}
