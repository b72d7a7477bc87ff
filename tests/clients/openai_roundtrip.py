"""Drives a gateway with the official openai SDK; prints what came back as JSON.

Runs in .venv-openai: the SDK needs h11 >= 0.16, mitmproxy 11.0.2 pins h11 <= 0.14.
Usage: python openai_roundtrip.py BASE_URL
"""

import json
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30)
history = [{"role": "system", "content": " ".join(f"policy{i}" for i in range(400))},
           {"role": "user", "content": "hello there"}]
out = {}

raw = client.chat.completions.with_raw_response.create(model="sim-8b", messages=history,
                                                        max_tokens=4)
chat = raw.parse()
out["chat"] = {"content": chat.choices[0].message.content, "engine": raw.headers["x-engine-id"],
               "route": raw.headers.get("x-kvcache-route"),
               "prompt_tokens": chat.usage.prompt_tokens}
history += [{"role": "assistant", "content": chat.choices[0].message.content},
            {"role": "user", "content": "and again"}]
stream = client.chat.completions.create(model="sim-8b", messages=history, max_tokens=4,
                                        stream=True, stream_options={"include_usage": True})
parts, usage = [], None
for event in stream:
    if event.choices:
        parts.append(event.choices[0].delta.content or "")
    if event.usage:
        usage = event.usage
out["chat_stream"] = {"content": "".join(parts),
                      "cached_tokens": usage.prompt_tokens_details.cached_tokens}

done = client.completions.create(model="sim-8b", prompt="one two three", max_tokens=3)
out["completion"] = {"text": done.choices[0].text}
text = "".join(e.choices[0].text for e in client.completions.create(
    model="sim-8b", prompt=[5, 6, 7, 8], max_tokens=3, stream=True) if e.choices)
out["completion_stream"] = {"text": text}
print(json.dumps(out))
