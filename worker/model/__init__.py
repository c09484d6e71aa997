"""The model: the Llama/Mistral/Qwen2 decoder with LoRA-aware linears (``decoder``), its
loader from Hugging Face folders, the per-step context, and the catalog of real models
lorafleet prepares by name (torch-free, read by the queue worker and the CLI).

May import: ``kernels``, the producer's wire types.
"""
