"""The official OpenAI Python SDK against token-limiter: a 429 raises RateLimitError with our code/type,
and the SDK's own retry waits for retry-after-ms and then succeeds. Prints one JSON line."""
import json
import sys
import time

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="sk-test", max_retries=0, default_headers={"x-team": "py"})
messages = [{"role": "user", "content": "hello from the SDK"}]
ok = 0
while True:
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=20)
        ok += 1
    except openai.RateLimitError as e:
        limited = {"code": e.code, "type": e.type, "status": e.status_code,
                   "retry_after_ms": int(e.response.headers.get("retry-after-ms")),
                   "retry_after": int(e.response.headers.get("retry-after"))}
        break
    if ok > 50:
        print(json.dumps({"error": "never limited"}))
        sys.exit(1)
retrying = client.with_options(max_retries=3)
start = time.monotonic()
resp = retrying.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=20)
elapsed_ms = (time.monotonic() - start) * 1000
print(json.dumps({"admitted": ok, "limited": limited, "elapsed_ms": elapsed_ms, "model": resp.model}))
