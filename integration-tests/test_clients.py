"""Each real client's own parsing accepts our responses: TGI's `text-generation` client, the
async `openai` and `huggingface_hub` clients, and logprobs through `openai`."""
import asyncio

from huggingface_hub import AsyncInferenceClient
from openai import AsyncOpenAI, OpenAI
from text_generation import AsyncClient, Client

MSG = [{"role": "user", "content": "What is the capital of France?"}]


def test_text_generation_client(smollm2):
    client = Client(smollm2.url, timeout=60)
    r = client.generate("The capital of France is", max_new_tokens=6, decoder_input_details=True, top_n_tokens=2)
    assert r.details.generated_tokens == 6 and len(r.details.tokens) == 6
    assert len(r.details.prefill) > 1 and r.details.prefill[0].logprob is None
    assert len(r.details.top_tokens) == 6
    stream = list(client.generate_stream("The capital of France is", max_new_tokens=6))
    assert "".join(s.token.text for s in stream) == r.generated_text
    assert stream[-1].generated_text == r.generated_text and stream[-1].details.finish_reason.value == "length"
    sampled = client.generate("Once", max_new_tokens=4, do_sample=True, best_of=2)
    assert len(sampled.details.best_of_sequences) == 1


def test_text_generation_async_client(smollm2):
    async def run():
        client = AsyncClient(smollm2.url, timeout=60)
        r = await client.generate("Hello", max_new_tokens=3)
        chunks = [c async for c in client.generate_stream("Hello", max_new_tokens=3)]
        return r, chunks

    r, chunks = asyncio.run(run())
    assert r.generated_text == chunks[-1].generated_text


def test_async_openai_and_hub_clients(smollm2):
    async def run():
        oa = AsyncOpenAI(base_url=smollm2.url + "/v1/", api_key="-")
        chat = await oa.chat.completions.create(model="tgi", messages=MSG, max_tokens=12, temperature=0)
        comp = await oa.completions.create(model="tgi", prompt="The capital of France is", max_tokens=4, temperature=0)
        streamed = ""
        async for c in await oa.chat.completions.create(model="tgi", messages=MSG, max_tokens=12, temperature=0, stream=True):
            if c.choices:
                streamed += c.choices[0].delta.content or ""
        hub = AsyncInferenceClient(base_url=smollm2.url)
        hub_chat = await hub.chat_completion(messages=MSG, max_tokens=12, temperature=0)
        tg = await hub.text_generation("The capital of France is", max_new_tokens=4, details=True)
        tg_stream = [t async for t in await hub.text_generation("The capital of France is", max_new_tokens=4,
                                                                   stream=True, details=True)]
        return chat, comp, streamed, hub_chat, tg, tg_stream

    chat, comp, streamed, hub_chat, tg, tg_stream = asyncio.run(run())
    assert "Paris" in chat.choices[0].message.content
    assert streamed == chat.choices[0].message.content == hub_chat.choices[0].message.content
    assert comp.choices[0].text and tg.details.generated_tokens == 4 and len(tg_stream) == 4


def test_openai_logprobs(smollm2):
    client = OpenAI(base_url=smollm2.url + "/v1/", api_key="-")
    r = client.chat.completions.create(model="tgi", messages=MSG, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
