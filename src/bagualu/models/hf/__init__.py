"""Hugging Face adapters: config.json dialects, checkpoint tensor names, safetensors I/O, tokenizers."""
