"""GGUF files for llama.cpp, Ollama and LM Studio: a merged model (:mod:`.writer`, its
vocabulary in :mod:`.vocab`, the Ollama ``Modelfile`` in :mod:`.ollama`) or a LoRA adapter
alone (:mod:`.lora`). gguf-py is imported on use."""

# GGUF weight types for 2-D weights (norms and biases stay f32); in the 4- and 5-bit
# types the output head stays q8_0 (see :mod:`.writer`).
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_0", "q4_1", "q4_0")
