// The web UI (/ui) in Debian's Chromium, headless, through playwright-core; run by
// integration-tests/test_ui.py against a server started with --api-key and
// --max-concurrent-requests 1. Screenshots go to SCREENSHOTS.
//
// The steps share one page and run in order; the last one stops the server.
import { test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const url = process.env.TESSERA_URL;
const key = process.env.TESSERA_API_KEY;
const shots = process.env.SCREENSHOTS;
const launcherPid = Number(process.env.TESSERA_LAUNCHER_PID);
assert.ok(url && key && shots && launcherPid, "TESSERA_URL, TESSERA_API_KEY, SCREENSHOTS, TESSERA_LAUNCHER_PID");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
const auth = { authorization: `Bearer ${key}`, "content-type": "application/json" };

async function metric(name) {
  const text = await (await fetch(`${url}/metrics`)).text();
  const m = text.match(new RegExp(`^${name.replace(/[{}"=]/g, "\\$&")} (\\S+)$`, "m"));
  return m ? Number(m[1]) : 0;
}

/** Records every length the last assistant answer takes while it streams. */
async function watchAnswer() {
  await page.evaluate(() => {
    window.__lengths = [];
    const box = document.getElementById("messages");
    new MutationObserver(() => {
      const answers = box.querySelectorAll(".message.assistant.streaming .content");
      const last = answers[answers.length - 1];
      if (last) window.__lengths.push(last.textContent.length);
    }).observe(box, { childList: true, subtree: true, characterData: true });
  });
}

async function send(text, maxTokens) {
  await page.click("summary");
  await page.fill("#max_tokens", String(maxTokens));
  await page.fill("#temperature", "0");
  await page.click("summary");
  await page.fill("#prompt", text);
  await page.click("#send");
}

test("asks for the API key once, then shows the model", async () => {
  await page.goto(`${url}/ui`);
  await page.waitForSelector("#key-dialog[open]");
  await page.fill("#key-input", key);
  await page.click("#key-save");
  await page.waitForFunction(() => document.getElementById("model").textContent.includes("SmolLM2"));
  assert.equal(await page.evaluate(() => localStorage.getItem("tessera.apiKey")), key);
});

test("chat: the answer streams in token by token, with TTFT and tokens/s", async () => {
  await watchAnswer();
  await send("Write a short poem about the sea.", 48);
  await page.waitForSelector("#send:not([hidden])", { timeout: 120_000 });
  const lengths = await page.evaluate(() => window.__lengths);
  const distinct = [...new Set(lengths)].filter((n) => n > 0);
  assert.ok(distinct.length >= 5, `only ${distinct.length} updates: ${lengths}`);
  for (let i = 1; i < distinct.length; i++) assert.ok(distinct[i] > distinct[i - 1], "the text only grows");
  const stats = await page.textContent(".message.assistant:last-child .stats");
  assert.match(stats, /48 tokens · TTFT \d+ ms · [\d.]+ tokens\/s/);
  await page.screenshot({ path: `${shots}/chat.png`, fullPage: true });
});

test("chat: Stop ends a generation, and the server drops the request", async () => {
  const dropped = await metric('tgi_request_failure{err="dropped"}');
  await send("Tell me a very long story about a lighthouse keeper.", 400);
  await page.waitForFunction(() => {
    const a = document.querySelector(".message.assistant.streaming .content");
    return a && a.textContent.length > 40;
  }, null, { timeout: 60_000 });
  await page.click("#stop");
  await page.waitForSelector("#send:not([hidden])", { timeout: 5_000 });
  const stats = await page.textContent(".message.assistant:last-child .stats");
  assert.match(stats, /stopped/);
  const text = await page.textContent(".message.assistant:last-child .content");
  await page.waitForTimeout(1000);
  assert.equal(await page.textContent(".message.assistant:last-child .content"), text, "nothing arrives after Stop");
  for (let i = 0; i < 50 && (await metric('tgi_request_failure{err="dropped"}')) <= dropped; i++) {
    await page.waitForTimeout(100);
  }
  assert.ok((await metric('tgi_request_failure{err="dropped"}')) > dropped, "the router saw the disconnect");
  // Conversations survive a reload (localStorage).
  await page.reload();
  await page.waitForSelector(".message.assistant");
  assert.equal(await page.locator(".message.user").count(), 2);
});

test("completion view: per-token logprobs and top alternatives", async () => {
  await page.click("nav button[data-tab=complete]");
  await page.click("#run-completion");
  await page.waitForSelector("#heatmap .token", { timeout: 60_000 });
  const tokens = await page.locator("#heatmap .token").count();
  assert.ok(tokens >= 5, `${tokens} tokens`);
  const logprob = Number(await page.getAttribute("#heatmap .token >> nth=0", "data-logprob"));
  assert.ok(logprob <= 0 && Number.isFinite(logprob));
  await page.hover("#heatmap .token >> nth=0");
  assert.ok((await page.locator("#token-detail tr").count()) >= 3, "a header and the top alternatives");
  await page.screenshot({ path: `${shots}/complete.png`, fullPage: true });
});

test("dashboard: the charts show the requests", async () => {
  await page.click("nav button[data-tab=dashboard]");
  await page.waitForFunction(() => Number(document.getElementById("stat-requests").textContent) >= 3, null, { timeout: 10_000 });
  await page.waitForFunction(() => document.getElementById("stat-ttft").textContent.endsWith("ms"));
  assert.equal(await page.locator(".uplot").count(), 3);
  await page.waitForTimeout(2500); // a few one-second points on the charts
  const series = await page.locator(".uplot .u-legend .u-series").count();
  assert.ok(series >= 11, `${series} legend entries`);
  await page.screenshot({ path: `${shots}/dashboard.png`, fullPage: true });
});

test("overloaded: a 429 gets a clear message", async () => {
  const busy = new AbortController();
  const r = await fetch(`${url}/generate_stream`, {
    method: "POST", headers: auth, signal: busy.signal,
    body: JSON.stringify({ inputs: "Count slowly:", parameters: { max_new_tokens: 400, ignore_eos: true } }),
  });
  const reader = r.body.getReader();
  await reader.read(); // the server holds its only slot for this stream
  await page.click("nav button[data-tab=chat]");
  await send("Hello?", 8);
  await page.waitForSelector("#banner:not([hidden])");
  assert.match(await page.textContent("#banner"), /overloaded \(429/);
  await page.screenshot({ path: `${shots}/overloaded.png` });
  busy.abort();
});

test("phone-sized screen: no sideways scrolling, controls reachable", async () => {
  await page.setViewportSize({ width: 390, height: 844 });
  await page.reload();
  await page.waitForSelector("#send");
  assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= 390));
  assert.ok(await page.isVisible("#send"));
  await page.click("nav button[data-tab=dashboard]");
  await page.waitForSelector(".uplot");
  assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= 390));
  await page.screenshot({ path: `${shots}/phone.png`, fullPage: true });
});

test("server down: a clear message", async () => {
  await page.click("nav button[data-tab=chat]");
  process.kill(launcherPid, "SIGTERM");
  for (let i = 0; i < 300; i++) {
    try {
      await fetch(`${url}/health`);
      await new Promise((r) => setTimeout(r, 100));
    } catch {
      break;
    }
  }
  await send("Are you there?", 8);
  await page.waitForFunction(() => document.getElementById("banner").textContent.includes("Cannot reach the server"));
  await page.screenshot({ path: `${shots}/down.png` });
  await browser.close();
});
