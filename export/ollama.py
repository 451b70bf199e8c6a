"""An Ollama `Modelfile` for an exported GGUF: FROM, the chat TEMPLATE, the default SYSTEM message, stop tokens.

Ollama does not read the Jinja chat template stored in the GGUF; it needs a Go template. Translated: ChatML
templates (SmolLM2, Qwen and others: `<|im_start|>ROLE\\nCONTENT<|im_end|>\\n` per message and
`<|im_start|>assistant\\n` to prompt a reply), with or without a default system message that the template
inserts when the conversation has none (that message becomes SYSTEM, which Ollama inserts the same way).
The template is recognised by rendering it on sample conversations and comparing with ChatML exactly, so a
template that renders anything else (tools, a date, a BOS text) gets a Modelfile without TEMPLATE, and the report
says so. Stop tokens: the end-of-turn token and the end-of-sequence token.
"""

from __future__ import annotations

# One turn of a ChatML conversation; the sentinels are plain words so no template escapes or strips them.
_TURN = "<|im_start|>{role}\n{content}<|im_end|>\n"
_REPLY = "<|im_start|>assistant\n"
_S, _U, _A, _U2 = "SYSTEMTEXTQX", "USERTEXTQX", "ASSISTANTTEXTQX", "SECONDUSERQX"

# Every message as a ChatML turn; a last assistant message is left open (continued), any other last message is
# followed by the reply prompt.
CHATML_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}{{ if not (and $last (eq .Role "assistant")) }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""


def _render(tokenizer, messages: list[dict], reply: bool) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=reply)
    except Exception:  # any template error means "not translatable", never a failed export
        return None


def chatml_system(tokenizer) -> tuple[bool, str | None]:
    """(whether the chat template renders as ChatML, the default system message it inserts or None)."""
    if not getattr(tokenizer, "chat_template", None):
        return False, None
    turns = [("system", _S), ("user", _U), ("assistant", _A), ("user", _U2)]
    full = _render(tokenizer, [{"role": r, "content": c} for r, c in turns], True)
    if full != "".join(_TURN.format(role=r, content=c) for r, c in turns) + _REPLY:
        return False, None
    alone = _render(tokenizer, [{"role": "user", "content": _U}], True)
    plain = _TURN.format(role="user", content=_U) + _REPLY
    if alone == plain:
        return True, None
    head = "<|im_start|>system\n"
    if alone and alone.startswith(head) and alone.endswith("<|im_end|>\n" + plain):
        return True, alone[len(head):-len("<|im_end|>\n" + plain)]
    return False, None


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError("text holds a triple quote")
    return f'"""{text}"""'


def modelfile(gguf_name: str, tokenizer) -> tuple[str, dict]:
    """(the Modelfile text for ./gguf_name, a record of what it holds)."""
    chatml, system = chatml_system(tokenizer)
    lines = [f"FROM ./{gguf_name}"]
    if chatml:
        lines.append(f"TEMPLATE {_quote(CHATML_TEMPLATE)}")
        if system is not None:
            try:
                lines.append(f"SYSTEM {_quote(system)}")
            except ValueError:
                system = None
    else:
        lines.append("# The chat template is not ChatML: no TEMPLATE translated (Ollama sends the raw prompt).")
    stops = []
    for token in ("<|im_end|>" if chatml else None, getattr(tokenizer, "eos_token", None)):
        if token and token not in stops and '"' not in token:
            stops.append(token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n", {"template": "chatml" if chatml else None, "system": system, "stop": stops}
