// The JavaScript clients against a real Tessera server (TESSERA_URL), run by
// integration-tests/test_node_clients.py with `node --test`.
//
// ChatUI's `tgi` endpoint type (src/lib/server/endpoints/tgi/endpointTgi.ts) calls
// `textGenerationStream` with the server's URL as `model`: a POST to `/` with `stream: true`,
// read as TGI's SSE. @huggingface/inference 2.x is the line that does this (3.x and 4.x refuse
// model URLs before sending anything, so ChatUI's TGI type needs 2.x), and it is tested here
// under the alias `hf-inference-chatui`. 4.x with `endpointUrl` sends text generation to the
// OpenAI routes instead. Both are tested, as is the `openai` package (ChatUI's `openai`
// endpoint type and most Node apps).
import { test } from "node:test";
import assert from "node:assert/strict";
import { InferenceClient } from "@huggingface/inference";
import { textGenerationStream as chatUiTextGenerationStream } from "hf-inference-chatui";
import OpenAI from "openai";

const url = process.env.TESSERA_URL;
assert.ok(url, "TESSERA_URL must point at the server");
const hf = new InferenceClient(undefined, { endpointUrl: url });
const openai = new OpenAI({ baseURL: `${url}/v1`, apiKey: "-" });
const PROMPT = "What is the capital of France?";

async function post(path, body) {
  const r = await fetch(`${url}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  assert.equal(r.status, 200);
  return r.json();
}

test("ChatUI's TGI endpoint: textGenerationStream (2.x) over POST / streams the greedy answer", async () => {
  // ChatUI renders the conversation with the model's chat template (here SmolLM2's) itself.
  const inputs = `<|im_start|>user\n${PROMPT}<|im_end|>\n<|im_start|>assistant\n`;
  const called = [];
  const tokens = [];
  let last;
  // As endpointTgi.ts calls it, with a fetch wrapper (which ChatUI uses to add headers).
  for await (const out of chatUiTextGenerationStream(
    { parameters: { max_new_tokens: 12, stop: ["<|im_end|>"], return_full_text: false }, model: url, inputs },
    { use_cache: false, fetch: async (u, info) => { called.push([u, JSON.parse(info.body)]); return fetch(u, info); } },
  )) {
    tokens.push(out.token);
    last = out;
  }
  assert.equal(called.length, 1);
  assert.equal(called[0][0].replace(/\/$/, ""), url);
  assert.equal(called[0][1].stream, true);
  assert.ok(tokens.length >= 2, "more than one event");
  assert.equal(typeof last.generated_text, "string");
  assert.equal(tokens.filter((t) => !t.special).map((t) => t.text).join(""), last.generated_text);
  assert.ok(last.generated_text.includes("Paris"), last.generated_text);
  const direct = await post("/generate", { inputs, parameters: { max_new_tokens: 12, stop: ["<|im_end|>"] } });
  assert.equal(last.generated_text, direct.generated_text, "the stream equals /generate (both greedy)");
});

test("@huggingface/inference 4.x: textGeneration and textGenerationStream (OpenAI completions)", async () => {
  const parameters = { max_new_tokens: 12, temperature: 0 };
  const prompt = "The capital of France is";
  const reference = await post("/v1/completions", { prompt, max_tokens: 12, temperature: 0 });
  assert.ok(reference.usage.completion_tokens >= 2);
  const out = await hf.textGeneration({ inputs: prompt, parameters });
  assert.equal(out.generated_text, reference.choices[0].text);
  let text = "";
  let chunks = 0;
  for await (const chunk of hf.textGenerationStream({ inputs: prompt, parameters })) {
    chunks += 1;
    text += chunk.choices?.[0]?.text ?? chunk.token?.text ?? "";
  }
  assert.ok(chunks >= 2);
  assert.equal(text, reference.choices[0].text);
});

test("chatCompletionStream of @huggingface/inference", async () => {
  let text = "";
  let chunks = 0;
  let finish;
  for await (const chunk of hf.chatCompletionStream({
    messages: [{ role: "user", content: PROMPT }],
    max_tokens: 16,
    temperature: 0,
  })) {
    chunks += 1;
    text += chunk.choices[0]?.delta?.content ?? "";
    finish = chunk.choices[0]?.finish_reason ?? finish;
  }
  assert.ok(chunks >= 2 && text.length > 0);
  assert.ok(["stop", "length"].includes(finish));
});

test("openai: chat completion, streamed and not, give the same greedy text", async () => {
  const messages = [{ role: "user", content: PROMPT }];
  const full = await openai.chat.completions.create({ model: "tgi", messages, max_tokens: 16, temperature: 0 });
  const answer = full.choices[0].message.content;
  assert.ok(answer.length > 0);
  assert.ok(answer.includes("Paris"), answer);
  assert.equal(full.usage.completion_tokens > 0, true);
  const stream = await openai.chat.completions.create({
    model: "tgi", messages, max_tokens: 16, temperature: 0, stream: true, stream_options: { include_usage: true },
  });
  let text = "";
  let usage;
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta?.content ?? "";
    usage = chunk.usage ?? usage;
  }
  assert.equal(text, answer);
  assert.equal(usage.completion_tokens, full.usage.completion_tokens);
});

test("openai: legacy completions and model list", async () => {
  const out = await openai.completions.create({ model: "tgi", prompt: "The capital of France is", max_tokens: 5, temperature: 0 });
  assert.ok(out.choices[0].text.length > 0);
  const models = await openai.models.list();
  assert.ok(models.data.length >= 1);
});

test("openai: errors surface as the client's typed errors", async () => {
  await assert.rejects(
    openai.chat.completions.create({ model: "tgi", messages: [{ role: "user", content: "x" }], temperature: -1 }),
    (e) => e instanceof OpenAI.UnprocessableEntityError && e.status === 422,
  );
});
