"""Streams chat and completions through a gateway with the official openai SDK, usage
included, and sends token-id prompts; prints what came back as JSON.

Runs in .venv-openai: the SDK needs h11 >= 0.16, mitmproxy 11.0.2 pins h11 <= 0.14.
Usage: python openai_client.py BASE_URL SPEC_JSON
SPEC_JSON: {"model", "system", "question", "prompt", "token_ids", "max_tokens"}
"""

import json
import sys
import time
from pathlib import Path

import openai

base, spec = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
model, n = spec["model"], spec["max_tokens"]
fixed = {"max_tokens": n, "temperature": 0, "extra_body": {"ignore_eos": True}}
usage_opt = {"stream_options": {"include_usage": True}}
out = {}


def headers(raw):
    return {k: raw.headers.get(k) for k in ("x-kvcache-endpoint", "x-kvcache-route",
                                            "x-kvcache-matched-tokens")}


def chat_stream(messages):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, stream=True, **usage_opt, **fixed)
    parts, usage, chunks = [], None, 0
    for event in raw.parse():
        chunks += 1
        if event.choices:
            parts.append(event.choices[0].delta.content or "")
        if event.usage:
            usage = event.usage
    details = usage.prompt_tokens_details if usage else None
    return {"text": "".join(parts), "chunks": chunks, **headers(raw),
            "usage": None if usage is None else {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "cached_tokens": details.cached_tokens if details else None}}


def completion_stream(prompt):
    raw = client.completions.with_raw_response.create(
        model=model, prompt=prompt, stream=True, **usage_opt, **fixed)
    parts, usage, chunks = [], None, 0
    for event in raw.parse():
        chunks += 1
        if event.choices:
            parts.append(event.choices[0].text)
        if event.usage:
            usage = event.usage
    return {"text": "".join(parts), "chunks": chunks, **headers(raw),
            "usage": None if usage is None else {"prompt_tokens": usage.prompt_tokens,
                                                 "completion_tokens": usage.completion_tokens}}


history = [{"role": "system", "content": spec["system"]},
           {"role": "user", "content": spec["question"]}]
out["chat_1"] = chat_stream(history)
# LMCache tells its controller what it stored asynchronously (batched every 10 ms): a next
# turn sent within a few ms of the answer can find the controller not told yet
time.sleep(0.5)
history += [{"role": "assistant", "content": out["chat_1"]["text"]},
            {"role": "user", "content": "and a second question"}]
out["chat_2"] = chat_stream(history)
out["completion_stream"] = completion_stream(spec["prompt"])
raw = client.completions.with_raw_response.create(model=model, prompt=spec["token_ids"],
                                                  **fixed)
done = raw.parse()
out["token_ids"] = {"text": done.choices[0].text, **headers(raw),
                    "usage": {"prompt_tokens": done.usage.prompt_tokens,
                              "completion_tokens": done.usage.completion_tokens}}
out["token_ids_stream"] = completion_stream(spec["token_ids"])
print(json.dumps(out))
