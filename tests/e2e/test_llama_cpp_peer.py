"""The llama.cpp peer of benchmarks/serve.py computes the same model: the random Hugging Face checkpoint
written as GGUF (``llama_cpp_peer.write_gguf``) and run by llama.cpp generates, greedily, what
``transformers`` generates from the checkpoint (fp32, Llama and Mixtral layouts: permuted Q/K rows, stacked
experts, the rope base from ``rope_parameters``). Skipped where ``llama-cpp-python`` and ``gguf`` are not
installed (``pip install -e '.[peers]'``; the CI does not build llama.cpp).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e
pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import llama_cpp_peer  # noqa: E402

from bagualu.models.byte_tokenizer import byte_level_tokenizer  # noqa: E402

TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=256, initializer_range=0.3)
# initializer_range: large enough weights that attention scores, hence the rotary layout, decide the tokens


def _model(tmp_path: Path, arch: str) -> Path:
    if arch == "llama":
        cfg = transformers.LlamaConfig(**TINY)
    else:
        cfg = transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    path = tmp_path / arch
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    byte_level_tokenizer().save(path)
    return path


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_llama_cpp_generates_what_transformers_does(tmp_path, arch):
    path = _model(tmp_path, arch)
    gguf = llama_cpp_peer.write_gguf(path, tmp_path / f"{arch}.gguf", torch.float32)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (12, 20)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = [hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            for p in prompts]
    peer = llama_cpp_peer.LlamaCpp(gguf, max_seqs=2, max_len=64, threads=1)
    try:
        got = peer.generate(prompts, 8)  # both prompts in one batch, as the benchmark runs them
    finally:
        peer.close()
    assert got == want
    assert llama_cpp_peer.agreement(want[0], got[0]) == 8


def test_gguf_is_written_once_and_atomically(tmp_path):
    path = _model(tmp_path, "llama")
    out = tmp_path / "m.gguf"
    llama_cpp_peer.write_gguf(path, out, torch.bfloat16)
    stamp = out.stat().st_mtime_ns
    assert llama_cpp_peer.write_gguf(path, out, torch.bfloat16) == out and out.stat().st_mtime_ns == stamp
    assert not out.with_suffix(".tmp").exists()
