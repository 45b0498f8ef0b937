"""llama.cpp as a peer for ``serve.py``: the same random Hugging Face weights written to GGUF, run through
``llama-cpp-python`` (``pip install llama-cpp-python gguf``: it builds llama.cpp from source with the
system compiler, ``-march=native``).

The weights are written with the ``gguf`` package's writer rather than llama.cpp's
``convert_hf_to_gguf.py``: that script only accepts tokenizers whose pre-tokeniser hash it knows, and
the benchmark's models carry a byte-level tokenizer it does not. The layout is the script's: tensor
names, Q and K rows permuted from the Hugging Face rotate-half order to GGML's adjacent pairs, a Mixtral's
experts stacked per layer, the vocabulary padded with ``[PAD n]`` tokens to the embedding's rows. fp32
weights stay F32; bf16 ones are the values our engine and ``transformers`` load (rounded by torch), as
BF16. ``agreement`` checks the conversion: greedy tokens of llama.cpp against a reference's.

Offline throughput uses llama.cpp's own batched decoding (one context with a KV stream per sequence, a
sequence id per request, every request's next token in one ``llama_decode``; prompts prefilled in
``n_batch``-token chunks), as its ``batched`` example does; greedy picks by llama.cpp's sampler (in C).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def available() -> bool:
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's rotate-half row order of a Q/K projection -> GGML's adjacent pairs (per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: Path, out: Path, dtype: torch.dtype) -> Path:
    """Write the Llama or Mixtral checkpoint in ``model_dir`` as GGUF (F32 or BF16 weights; norms F32)."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    if out.exists():
        return out
    cfg = json.loads((model_dir / "config.json").read_text())
    sd = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        sd.update(load_file(f))
    H, G, L = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    E = cfg.get("num_local_experts", 0)
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(model_dir.name)
    w.add_vocab_size(V)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(G)
    w.add_rope_dimension_count(D // H)
    rope = cfg.get("rope_parameters") or {}  # transformers 5 keeps it there; older versions at the top
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == torch.float32 else gguf.LlamaFileType.MOSTLY_BF16)
    if E:
        w.add_expert_count(E)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    # the tokenizer: its own tokens by id, then padding up to the embedding's rows
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    names = {i: s for s, i in tok["model"]["vocab"].items()}
    special = {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
    names.update(special)
    tokens, types = [], []
    for i in range(V):
        if i in names:
            tokens.append(names[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(tokens[:2])])  # llama.cpp requires the key; the byte vocabulary merges nothing
    if cfg.get("bos_token_id") is not None:
        w.add_bos_token_id(cfg["bos_token_id"])
    if cfg.get("eos_token_id") is not None:
        w.add_eos_token_id(cfg["eos_token_id"])

    def add(name: str, t: torch.Tensor, keep_f32: bool = False):
        t = t.float()
        if dtype == torch.float32 or keep_f32 or t.dim() == 1:
            w.add_tensor(name, t.contiguous().numpy())
        else:
            bits = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
            w.add_tensor(name, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    add("output.weight", sd.get("lm_head.weight", sd["model.embed_tokens.weight"]))
    for i in range(L):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], H))
        add(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], G))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        if E:
            m = p + "block_sparse_moe."
            add(f"blk.{i}.ffn_gate_inp.weight", sd[m + "gate.weight"], keep_f32=True)
            for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                add(f"blk.{i}.ffn_{theirs}_exps.weight",
                    torch.stack([sd[f"{m}experts.{e}.{ours}.weight"] for e in range(E)]))
        else:
            add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
            add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
            add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out


_LOG_CALLBACK = None


def _quiet_logs(lc) -> None:
    """llama.cpp logs every tensor it loads to stderr; keep errors only."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        def log(level, text, _user):
            if level == 4:  # GGML_LOG_LEVEL_ERROR
                print(text.decode(errors="replace"), end="", flush=True)
        _LOG_CALLBACK = lc.llama_log_callback(log)  # kept alive: llama.cpp holds the pointer
        lc.llama_log_set(_LOG_CALLBACK, None)


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: ``run(prompts, out_len)`` -> generated tokens (greedy)."""

    def __init__(self, gguf_path: Path, max_seqs: int, max_len: int, threads: int | None = None):
        import llama_cpp as lc

        self.lc = lc
        threads = threads or torch.get_num_threads()
        _quiet_logs(lc)
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cp = lc.llama_context_default_params()
        self.n_batch = 512
        cp.n_ctx = max_seqs * max_len
        cp.n_batch = self.n_batch
        cp.n_ubatch = self.n_batch
        cp.n_seq_max = max_seqs
        cp.n_threads = threads
        cp.n_threads_batch = threads
        # a KV stream per sequence, llama.cpp's advice for sequences that share no prefix (as these): with one
        # unified buffer every sequence's attention runs over all of them, masked, which made it 1.3-1.6x
        # slower at 32 requests here and 2.4-4.3x at 64
        cp.kv_unified = False
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.max_seqs = max_seqs
        self.batch = lc.llama_batch_init(max(self.n_batch, max_seqs), 0, 1)
        sp = lc.llama_sampler_chain_default_params()
        self.sampler = lc.llama_sampler_chain_init(sp)
        lc.llama_sampler_chain_add(self.sampler, lc.llama_sampler_init_greedy())

    def _fill(self, rows: list[tuple[int, int, int, bool]]):
        b = self.batch
        for j, (tok, pos, seq, logits) in enumerate(rows):
            b.token[j] = tok
            b.pos[j] = pos
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = seq
            b.logits[j] = logits
        b.n_tokens = len(rows)

    def _decode(self, rows):
        self._fill(rows)
        rc = self.lc.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def run(self, prompts: list[list[int]], out_len: int) -> int:
        return sum(len(t) for t in self.generate(prompts, out_len))

    def generate(self, prompts: list[list[int]], out_len: int) -> list[list[int]]:
        lc = self.lc
        if len(prompts) > self.max_seqs:
            raise ValueError(f"{len(prompts)} prompts > {self.max_seqs} sequences")
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        # prefill: every prompt's tokens in n_batch-token chunks, each prompt's first pick from the logits
        # of its last token (sampled right after the chunk that holds it, before the next overwrites them)
        rows = [(t, p, s, p == len(pr) - 1) for s, pr in enumerate(prompts) for p, t in enumerate(pr)]
        out: list[list[int]] = [[] for _ in prompts]
        for c in range(0, len(rows), self.n_batch):
            chunk = rows[c:c + self.n_batch]
            self._decode(chunk)
            for j, (_, _, s, wants) in enumerate(chunk):
                if wants:
                    out[s].append(self._sample(j))
        pos = [len(p) for p in prompts]
        for _ in range(out_len - 1):
            self._decode([(out[s][-1], pos[s], s, True) for s in range(len(prompts))])
            for s in range(len(prompts)):
                out[s].append(self._sample(s))
                pos[s] += 1
        return out

    def _sample(self, j: int) -> int:
        return int(self.lc.llama_sampler_sample(self.sampler, self.ctx, j))

    def close(self):
        lc = self.lc
        lc.llama_sampler_free(self.sampler)
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)


def agreement(ours: list[int], theirs: list[int]) -> int:
    """Length of the common prefix of two greedy continuations."""
    n = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        n += 1
    return n

