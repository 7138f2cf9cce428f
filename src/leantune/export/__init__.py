"""Export: a run's adapter merged into its base, written as a Hugging Face directory
(:mod:`.merge`) or as one GGUF file for llama.cpp, Ollama and LM Studio (:mod:`.gguf_file`,
its vocabulary in :mod:`.gguf_vocab`, the Ollama ``Modelfile`` in :mod:`.ollama`)."""

from leantune.export.merge import ExportError, export_run

__all__ = ["GGUF_QUANTS", "ExportError", "export_gguf", "export_run"]

# GGUF weight types for 2-D weights (norms and biases stay f32).
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")


def export_gguf(*args, **kwargs):
    """See :func:`leantune.export.gguf_file.export_gguf` (imported on use: it needs gguf-py)."""
    from leantune.export.gguf_file import export_gguf as export

    return export(*args, **kwargs)
