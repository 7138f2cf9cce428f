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


def ollama_modelfile(gguf_name: str, chat_template: str | None, stops: list[str]) -> str:
    """The text of a ``Modelfile`` beside ``gguf_name``: ``FROM ./<gguf_name>``, a ChatML
    ``TEMPLATE`` (or a note), and one ``PARAMETER stop`` per distinct non-empty stop."""
    lines = [f"FROM ./{gguf_name}"]
    if is_chatml(chat_template):
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
    else:
        lines.append("# No TEMPLATE: this chat template is not ChatML, the one format this "
                     "writer translates; Ollama reads tokenizer.chat_template from the GGUF.")
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops) if s]
    return "\n".join(lines) + "\n"
