"""Renders chat cases with Python jinja2 exactly as transformers'
apply_chat_template does (ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, loopcontrols, raise_exception) and writes ../chat_golden.json.

    python3 chat.py
"""
import json
import os

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))


def raise_exception(message):
    raise TemplateError(message)


def render(cfg, messages, add_generation_prompt):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    tmpl = env.from_string(cfg["chat_template"])
    special = {}
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = cfg.get(k)
        if isinstance(v, dict):
            v = v["content"]
        special[k] = v
    return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


CASES = [
    [],
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?\nThink {{ not }} {% raw %}."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
     {"role": "system", "content": "Answer in French."}],
    [{"role": "user", "content": "  spaced  \n"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "中文 😀"}],
    [{"role": "user", "content": "Weather?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
         {"type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
     {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "noon"},
     {"role": "assistant", "content": "Sunny at noon."}],
]

out = []
for model in ("deepseek-v2", "deepseek-v3"):
    cfg = json.load(open(os.path.join(HERE, "..", model, "tokenizer_config.json")))
    for i, msgs in enumerate(CASES):
        for gen in (False, True):
            try:
                text = render(cfg, msgs, gen)
            except Exception as e:  # V2's template has no tool branch; record failures too
                text = None
            out.append({"model": model, "messages": msgs, "add_generation_prompt": gen, "text": text})
with open(os.path.join(HERE, "..", "chat_golden.json"), "w") as f:
    json.dump(out, f, ensure_ascii=False, indent=1)
    f.write("\n")
print(len(out), "renders")
