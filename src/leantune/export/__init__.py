"""Export: a run's adapter merged into its base, written as a Hugging Face directory
(:mod:`.merge`) or as one GGUF file for llama.cpp, Ollama and LM Studio (:mod:`.gguf_file`,
its vocabulary in :mod:`.gguf_vocab`, the Ollama ``Modelfile`` in :mod:`.ollama`), or the
LoRA adapter alone as a llama.cpp adapter GGUF (:mod:`.gguf_lora`)."""

from leantune.export.merge import ExportError, export_run

__all__ = ["GGUF_QUANTS", "ExportError", "export_gguf", "export_gguf_lora", "export_run"]

# GGUF weight types for 2-D weights (norms and biases stay f32); in the 4- and 5-bit
# types the output head stays q8_0 (see gguf_file).
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_0", "q4_1", "q4_0")


def export_gguf(*args, **kwargs):
    """See :func:`leantune.export.gguf_file.export_gguf` (imported on use: it needs gguf-py)."""
    from leantune.export.gguf_file import export_gguf as export

    return export(*args, **kwargs)


def export_gguf_lora(*args, **kwargs):
    """See :func:`leantune.export.gguf_file.export_gguf_lora`."""
    from leantune.export.gguf_file import export_gguf_lora as export

    return export(*args, **kwargs)
