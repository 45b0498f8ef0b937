"""Training step: bagualu's loop (``bagualu.train.loop.train_step``) vs ``transformers``' MixtralForCausalLM
with a plain PyTorch loop — same model, same weights, same batch, one process run, interleaved steps.

One step on each side = forward, cross-entropy + MoE aux loss, backward, global-norm clipping to 1.0,
AdamW (weight decay on matrices) and a schedule step; fp32, and bf16 autocast over fp32 master weights.
Ours is the model ``bagualu train`` builds (``from_config`` → ``parallelize`` on a 1-rank mesh); the
peer is that model saved in the Hugging Face layout and loaded by ``transformers`` (its default experts
implementation unless ``--hf-experts`` names others: each is a peer, the ratio is over the best one).
Before timing, the fp32 losses of both are checked to agree. Reported: median step time, tokens/s,
and our ratio.

    python benchmarks/train_step.py                          # tiny-moe recipe, 16 × 128 tokens
    python benchmarks/train_step.py --shape mixtral-140m     # ~140M Mixtral, batch 8 × 512 (the issue's)
    python benchmarks/train_step.py --batch 2 --seq 32 --reps 1 --layers 1 --json out.json   # a smoke run
    python benchmarks/train_step.py --compile powerfusion    # also ours with train.compile=powerfusion

With ``--compile``, a second copy of our model (same weights) runs compiled as ``bagualu train
--train.compile=...`` does; its row has its own ratio, the headline stays the eager one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile

from bagualu.utils.openmp import tune_openmp_spin

tune_openmp_spin()  # as the bagualu command does, before torch loads libgomp (both sides of the run get it)

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, machine_facts, print_table, write_json  # noqa: E402

from bagualu.comm import make_mesh  # noqa: E402
from bagualu.models import ModelConfig, MoEConfig, RopeConfig, from_config  # noqa: E402
from bagualu.parallel import parallelize  # noqa: E402
from bagualu.train.compile import BACKENDS, compile_model  # noqa: E402
from bagualu.train.config import TrainConfig  # noqa: E402
from bagualu.train.loop import lm_loss, make_optimizer, train_step  # noqa: E402
from bagualu.train.recipes import tiny_moe  # noqa: E402


def shape(name: str) -> tuple[ModelConfig, int, int]:
    """(model config, batch, seq) of a named shape."""
    if name == "tiny-moe":
        run = tiny_moe()
        return run.model, run.train.global_batch, run.train.seq_len
    if name == "mixtral-140m":  # 8 layers × 8 experts of 3·512·1024 + attention + 32k-vocab embeddings ≈ 141M
        return ModelConfig(arch="mixtral", vocab_size=32000, hidden_size=512, intermediate_size=1024, num_layers=8,
                           num_heads=8, num_kv_heads=8, max_position_embeddings=2048, rope=RopeConfig(theta=1e6),
                           moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=1024)), 8, 512
    raise SystemExit(f"unknown --shape {name!r}; known: tiny-moe, mixtral-140m")


def autocast_for(dtype_name: str):
    if dtype_name == "bfloat16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def build(cfg: ModelConfig, t: TrainConfig, hf_impls: list[str]):
    """Ours (as the loop builds it) and one transformers model per experts implementation, same weights."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ours = from_config(cfg, device="cpu", dtype="float32", seed=0)
    peers = {}
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        for impl in hf_impls:
            kw = {} if impl == "default" else {"experts_implementation": impl}
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, **kw).train()
            peers[f"transformers ({impl if impl != 'default' else _impl_name(hf)})"] = hf
    mesh = make_mesh(dp=1, ep=1)
    ours = parallelize(ours, mesh).train()
    return ours, mesh, peers


def _impl_name(hf) -> str:
    return str(getattr(hf.config, "_experts_implementation", None) or "eager") + ", default"


def hf_loss(hf, ids, coef: float):
    out = hf(input_ids=ids[:, :-1], output_router_logits=True)
    ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    return ce, coef * out.aux_loss


def hf_step_fn(hf, ids, t: TrainConfig, autocast):
    """A plain PyTorch loop: torch's default AdamW (same hyperparameters and decay groups as ours)."""
    decay = [p for p in hf.parameters() if p.dim() >= 2]
    no_decay = [p for p in hf.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / t.warmup))

    def step():
        with autocast():
            ce, aux = hf_loss(hf, ids, t.aux_loss_coef)
        (ce + aux).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return step


def our_step_fn(model, mesh, ids, t: TrainConfig, autocast):
    opt, sched = make_optimizer(model, t)
    return lambda: train_step(model, lambda: ids, opt, sched, t, mesh, autocast)


@torch.no_grad()
def check_losses(ours, peers, ids, t) -> float:
    """Max relative difference of the fp32 cross-entropy (same weights, same batch) before any step."""
    ce, _ = lm_loss(ours, ids, t)
    worst = 0.0
    for hf in peers.values():
        hce, _ = hf_loss(hf, ids, 0.0)
        worst = max(worst, abs(float(hce) - float(ce)) / float(ce))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny-moe", help="tiny-moe (default) or mixtral-140m")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: the shape's)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the shape's)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers (smoke runs)")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per side and dtype (median reported)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--hf-experts", default="default",
                    help="transformers experts implementations to compare with (default, eager, grouped_mm, ...)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--compile", default="none", choices=BACKENDS,
                    help="also time ours compiled with this torch.compile back-end (train.compile)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from bagualu.memory.host_allocator import tune_glibc_malloc

    tune_glibc_malloc()  # as bagualu train does; process-wide, so the peer gets it too
    cfg, batch, seq = shape(args.shape)
    batch, seq = args.batch or batch, args.seq or seq
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    facts = machine_facts()
    print("machine:", facts)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    rows, ratios = [], {}
    for dtype_name in args.dtypes.split(","):
        t = TrainConfig(steps=1000, warmup=10, global_batch=batch, seq_len=seq, dtype=dtype_name)
        ours, mesh, peers = build(cfg, t, args.hf_experts.split(","))
        if dtype_name == "float32":
            diff = check_losses(ours, peers, ids, t)
            print(f"fp32 loss check (same weights, same batch): max relative difference {diff:.1e}")
            if diff > 1e-4:
                raise SystemExit(f"the models disagree (relative loss difference {diff:.1e}); not timing them")
        autocast = autocast_for(dtype_name)
        fns = {"bagualu": our_step_fn(ours, mesh, ids, t, autocast)}
        ours_c = f"bagualu ({args.compile})"
        if args.compile != "none":
            comp = parallelize(from_config(cfg, device="cpu", dtype="float32", seed=0), make_mesh(dp=1, ep=1)).train()
            compile_model(comp, args.compile)
            fns[ours_c] = our_step_fn(comp, mesh, ids, t, autocast)
        fns.update({name: hf_step_fn(hf, ids, t, autocast) for name, hf in peers.items()})
        times = interleaved(fns, reps=args.reps, warmup=2)
        best = min((k for k in times if not k.startswith("bagualu")), key=times.get)
        ratios[dtype_name] = times[best] / times["bagualu"]
        n_params = sum(p.numel() for p in ours.parameters())
        for k, s in times.items():
            rows.append({"shape": args.shape, "params_M": n_params / 1e6, "batch": f"{batch}x{seq}",
                         "dtype": dtype_name if dtype_name == "float32" else "bf16 autocast", "impl": k,
                         "step_ms": s * 1e3, "tokens_per_s": batch * seq / s,
                         "ratio": times[best] / s if k.startswith("bagualu") else None,
                         "note": "best peer" if k == best else ""})
        print_table(rows[-len(times):], ["shape", "dtype", "impl", "step_ms", "tokens_per_s", "ratio", "note"])
        del ours, peers, fns
    print()
    cols = ["shape", "params_M", "batch", "dtype", "impl", "step_ms", "tokens_per_s", "ratio", "note"]
    print_table(rows, cols)
    geo = torch.tensor(list(ratios.values())).log().mean().exp().item()
    parts = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
    print(f"\nheadline: bagualu train step vs transformers + AdamW ({args.shape}, {batch}x{seq} tokens): "
          f"{geo:.2f}x geometric mean ({parts}); target >= 1.3x")
    write_json(args.json, {"machine": facts, "shape": args.shape, "batch": batch, "seq": seq, "rows": rows,
                           "ratios": ratios, "geomean_ratio": geo})


if __name__ == "__main__":
    main()
