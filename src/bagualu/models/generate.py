"""Reference generation: the whole sequence is recomputed every step (no KV cache).

This is the oracle, not the fast path — the serving engine (``bagualu.engine``) is. It keeps the
demo and tests honest: any faster decoder must produce the same greedy tokens.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, seed: int | None = None, eos_token_id: int | None = None) -> list[int]:
    """New token ids after ``prompt_ids``; greedy when ``temperature == 0``."""
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    g = torch.Generator(device=model.device)
    if seed is not None:
        g.manual_seed(seed)
    ids = torch.tensor([prompt_ids], device=model.device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids)[0, -1].float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        out.append(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
    return out
