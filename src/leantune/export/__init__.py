"""Export: a run's adapter merged into its base, written as a Hugging Face directory
(:mod:`.merge`) or as one GGUF file for llama.cpp, Ollama and LM Studio, or the LoRA
adapter alone as a llama.cpp adapter GGUF (:mod:`.gguf`)."""

from leantune.export.gguf import GGUF_QUANTS
from leantune.export.merge import ExportError, export_run

__all__ = ["GGUF_QUANTS", "ExportError", "export_gguf", "export_gguf_lora", "export_run"]


def export_gguf(*args, **kwargs):
    """See :func:`leantune.export.gguf.writer.export_gguf` (imported on use: it needs gguf-py)."""
    from leantune.export.gguf.writer import export_gguf as export

    return export(*args, **kwargs)


def export_gguf_lora(*args, **kwargs):
    """See :func:`leantune.export.gguf.lora.export_gguf_lora`."""
    from leantune.export.gguf.lora import export_gguf_lora as export

    return export(*args, **kwargs)
