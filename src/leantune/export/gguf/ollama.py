"""An Ollama ``Modelfile`` for an exported GGUF (``ollama create NAME -f FILE``).

Ollama renders prompts with Go templates, not Jinja, so a Hugging Face chat template is
translated only where its format is known: ChatML (``<|im_start|>role\\n…<|im_end|>``,
SmolLM2's and Qwen2/3's). For any other the ``Modelfile`` says so in a comment, and Ollama
falls back to what it reads from the GGUF's ``tokenizer.chat_template``.
"""

from __future__ import annotations

CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def is_chatml(chat_template: str | None) -> bool:
    return bool(chat_template) and "<|im_start|>" in chat_template and \
        "<|im_end|>" in chat_template


def default_system(tokenizer) -> str | None:
    """The system message a ChatML template puts in when the chat has none (SmolLM2's
    "You are a helpful AI assistant named SmolLM, ..."), or None."""
    if not is_chatml(tokenizer.chat_template):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    head = "<|im_start|>system\n"
    return text[len(head):text.index("<|im_end|>")] if text.startswith(head) else None


def ollama_modelfile(gguf_name: str, chat_template: str | None, stops: list[str],
                     system: str | None = None) -> str:
    """The text of a ``Modelfile`` beside ``gguf_name``: ``FROM ./<gguf_name>``, a ChatML
    ``TEMPLATE`` (or a note), the template's default ``SYSTEM`` message if it has one
    (Ollama sends it when a chat brings none, as the Jinja template does), and one
    ``PARAMETER stop`` per distinct non-empty stop."""
    lines = [f"FROM ./{gguf_name}"]
    if is_chatml(chat_template):
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# No TEMPLATE: this chat template is not ChatML, the one format this "
                     "writer translates; Ollama reads tokenizer.chat_template from the GGUF.")
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops) if s]
    return "\n".join(lines) + "\n"
