"""The vLLM peer of benchmarks/serve.py computes the same model: ``vllm_peer.VllmCpu`` (a worker under vLLM's
own environment, driven over a pipe) loads the random Hugging Face checkpoint and generates, greedily, what
``transformers`` generates from it (fp32). Skipped where vLLM's environment (``.venv-vllm``, see
``benchmarks/vllm_peer.py``) is absent; the CI does not install it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import vllm_peer  # noqa: E402

from bagualu.models.byte_tokenizer import byte_level_tokenizer  # noqa: E402

if not vllm_peer.available():
    pytest.skip(f"no vLLM environment at {vllm_peer.DEFAULT_PYTHON}", allow_module_level=True)

# head_dim 64: vLLM's CPU attention takes 32, 64, 80, 96, 112, 128, ... (not the 16 of the other tests' tiny model)
TINY = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=256, max_position_embeddings=256, initializer_range=0.3)


def test_vllm_generates_what_transformers_does(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "llama"
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY)).save_pretrained(path)
    byte_level_tokenizer().save(path)
    prompts = [[5, 17, 200, 33, 9, 41, 300, 7], [100, 2, 3], [64] * 12]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                                 do_sample=False, pad_token_id=0)
            want.append(out[0, len(p):].tolist())
    peer = vllm_peer.VllmCpu(path, "float32", max_seqs=8, max_len=64)
    try:
        assert peer.version
        assert peer.generate(prompts, 12) == want
        assert peer.run(prompts[:1], 5) == 5
    finally:
        peer.close()
    assert peer.proc.returncode == 0
