"""Drives Ember's generation routes with the official `openai` client library (installed by
scripts/setup_test_python.sh) and prints what the library parsed, as JSON, for
tests/openai_client.rs to check. Usage: openai_client.py BASE_URL MODEL"""
import json
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
messages = [{"role": "user", "content": "Name three colours."}]

whole = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)

parts, finish, usage, roles = [], None, None, []
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=16, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage.model_dump(exclude_none=True)
    for choice in chunk.choices:
        if choice.delta.role:
            roles.append(choice.delta.role)
        if choice.delta.content:
            parts.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason

completion_parts = [
    c.choices[0].text
    for c in client.completions.create(
        model=model, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, stream=True
    )
    if c.choices
]

try:
    client.chat.completions.create(model=model, messages=[], max_tokens=4)
    error = None
except openai.BadRequestError as e:
    error = {"status": e.status_code, "param": e.body.get("param") if isinstance(e.body, dict) else None}

print(json.dumps({
    "version": openai.__version__,
    "whole": whole.choices[0].message.content,
    "whole_finish": whole.choices[0].finish_reason,
    "whole_usage": whole.usage.model_dump(exclude_none=True),
    "streamed": "".join(parts),
    "stream_chunks": len(parts),
    "stream_finish": finish,
    "stream_usage": usage,
    "roles": roles,
    "completion": "".join(completion_parts),
    "error": error,
}))
