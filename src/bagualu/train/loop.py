"""The training loop: one process of a (possibly distributed) run. Started by ``bagualu train`` directly,
by the elastic launcher (``--nproc``), by ``torchrun`` or under Slurm — it reads its rank from the env.

Per optimizer step: ``grad_accum`` micro-batches (gradient sync only on the last, ``GradSync.no_sync``),
loss = cross-entropy + aux_loss_coef · Σ load-balance + z_loss_coef · Σ z-loss, global-norm clipping
(expert shards' squares summed over the EP group), AdamW with warmup + cosine. Rank 0 shows a progress
bar, appends ``log.jsonl``, and at the end writes the eval loss, ``training.png`` and a Hugging Face
export (``RUN_DIR/hf``) with the experts of every rank merged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bagualu.checkpoint import CheckpointManager, TrainingState
from bagualu.checkpoint.export import checkpoint_files
from bagualu.comm import Axis, make_mesh
from bagualu.comm.mesh import init_distributed
from bagualu.memory.host_allocator import tune_glibc_malloc
from bagualu.models import from_config
from bagualu.moe import MoE
from bagualu.parallel import parallelize
from bagualu.platform import current_platform
from bagualu.storage import TokenDataset, filesystem, is_url, join
from bagualu.train.activation_checkpointing import apply_activation_checkpointing
from bagualu.train.compile import compile_model
from bagualu.train.config import RunConfig, TrainConfig, to_dict
from bagualu.train.data import load_dataset_tokenizer
from bagualu.train.memory import check_fits
from bagualu.train.sampler import TokenSampler
from bagualu.utils.logging import get_logger

log = get_logger(__name__)


def _dist_setup():
    return init_distributed(current_platform().dist_backend)


def _prepare_data(cfg: RunConfig, run_dir: Path, rank: int) -> str:
    """The prepared dataset (a local directory or fsspec URL); the default corpus is prepared on first use."""
    path = cfg.data.path or str(run_dir / "data")
    if rank == 0:
        fs, p = filesystem(path)
        if not fs.exists(join(p, "manifest.json")):
            if cfg.data.path:
                raise FileNotFoundError(f"data.path={cfg.data.path} is not a prepared dataset (no manifest.json); "
                                        f"run `bagualu data prepare FILES... --out {cfg.data.path}`")
            from bagualu.train.corpus import stdlib_files
            from bagualu.train.data import prepare

            log.info("preparing the default corpus (this Python's standard library) into %s", path)
            prepare(stdlib_files(int(cfg.data.corpus_mb * (1 << 20))), path, vocab_size=cfg.data.vocab_size)
    if dist.is_initialized():
        dist.barrier()
    return path


def bf16_pays_off(plat) -> bool:
    """``train.dtype=auto``: bf16 autocast where the platform supports it and its bf16 GEMMs are at least as
    fast as fp32 ones (measured, cached). CPUs without bf16 units run bf16 GEMMs ~100x slower than fp32
    (1.4 vs 137 GFLOP/s measured on an AVX2 EPYC): there autocast would only cost time and precision."""
    return plat.supports_dtype(torch.bfloat16) and plat.peak_flops(torch.bfloat16) >= plat.peak_flops(torch.float32)


def _lr_lambda(t: TrainConfig):
    def f(step: int) -> float:
        if step < t.warmup:
            return (step + 1) / t.warmup
        progress = (step - t.warmup) / max(1, t.steps - t.warmup)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def lm_loss(model, ids: torch.Tensor, t: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cross-entropy, weighted MoE aux losses)`` of one micro-batch ``ids [B, S + 1]``; the step's loss is
    their sum."""
    logits = model(ids[:, :-1])
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    aux = ce.new_zeros(())
    for m in model.modules():
        if isinstance(m, MoE) and m.last_aux_losses:
            aux = aux + t.aux_loss_coef * m.last_aux_losses["load_balance"] + t.z_loss_coef * m.last_aux_losses["z_loss"]
    return ce, aux


def _clip(model, max_norm: float, mesh) -> float:
    """Clip to a global gradient norm; returns the norm. Expert shards differ across the EP group, so their
    squares are summed over it; replicated parameters agree after the gradient sync. Norms come from
    foreach kernels (one pass per tensor list) — one host sync, for the value the log reports."""
    expert = {id(p) for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()}
    grads = [[], []]
    for p in model.parameters():
        if p.grad is not None:
            grads[0 if id(p) in expert else 1].append(p.grad)
    sq = torch.stack([torch.nn.utils.get_total_norm(g).double().square() if g else torch.zeros((), dtype=torch.float64)
                      for g in grads]).cpu()
    if mesh.group(Axis.EP) is not None:
        dist.all_reduce(sq[:1], group=mesh.group(Axis.EP))
    norm = float(sq.sum().sqrt())  # host sync (named): the log reports it and the clip factor needs it
    if max_norm > 0 and norm > max_norm:
        torch._foreach_mul_(grads[0] + grads[1], max_norm / (norm + 1e-6))
    return norm


def _imbalance(model) -> float:
    """max/mean routed tokens per expert, averaged over MoE layers (1.0 = perfectly balanced)."""
    vals = []
    for m in model.modules():
        if isinstance(m, MoE) and m.last_tokens_per_expert is not None:
            c = m.last_tokens_per_expert.double()
            if dist.is_initialized():
                dist.all_reduce(c)
            vals.append(float(c.max() / c.mean().clamp_min(1e-9)))
    return sum(vals) / len(vals) if vals else 1.0


def make_optimizer(model, t: TrainConfig):
    """AdamW (weight decay on matrices only) and the warmup + cosine schedule."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    # fused: one kernel per step over all parameters (the default foreach path makes ~10 passes over memory)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.95), fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(t))


def train_step(model, next_batch, opt, sched, t: TrainConfig, mesh, autocast) -> tuple[torch.Tensor, float]:
    """One optimizer step: ``t.grad_accum`` micro-batches from ``next_batch()`` (gradient sync only on the
    last), global-norm clipping, AdamW, schedule. Returns this rank's mean ``[ce, aux]`` (float64) and the
    global gradient norm."""
    total = torch.zeros(2, dtype=torch.float64)
    for k in range(t.grad_accum):
        ids = next_batch()
        sync = contextlib.nullcontext() if k == t.grad_accum - 1 else model.grad_sync.no_sync()
        with sync:
            with autocast():
                ce, aux = lm_loss(model, ids, t)
            ((ce + aux) / t.grad_accum).backward()
        total += torch.stack([ce.detach(), aux.detach()]).double().cpu() / t.grad_accum
    norm = _clip(model, t.grad_clip, mesh)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return total, norm


def _resume_point(ckpt, state, rank: int) -> int:
    """Load the newest valid checkpoint (chosen and verified by rank 0); returns the step to continue after."""
    path = ckpt.latest() if rank == 0 else None
    if dist.is_initialized():
        box = [path]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
    if path is None:
        log.info("no committed checkpoint to resume from: starting at step 0")
        return 0
    sd = state.state_dict(0)
    ckpt.load(sd, path)
    step = state.apply_loaded(sd)
    log.info("resumed from %s (step %d)", path, step)
    return step


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False) -> dict:
    """Run training; returns the final metrics (on every rank). ``resume``: continue from the newest valid
    checkpoint (also automatic after an elastic restart).

    A process group this call creates it also destroys once training succeeded: left to the interpreter's
    exit, gloo's worker threads can still hold work whose tensors need the GIL during finalisation, and the
    rank aborts ("terminate called without an active exception") after a run that had finished. After a
    failure it is left alone, since destroying it waits for collectives a dead peer may never finish."""
    owns_group = not (dist.is_available() and dist.is_initialized())
    rank, world = _dist_setup()
    result = _train(cfg, run_dir, resume, rank, world)
    if owns_group and dist.is_initialized():
        dist.destroy_process_group()
    return result


def _train(cfg: RunConfig, run_dir: str | Path, resume: bool, rank: int, world: int) -> dict:
    tune_glibc_malloc()  # large activations are reused instead of page-faulted on every step (memory/host_allocator)
    plat = current_platform()
    device = plat.current_device()
    if is_url(run_dir):
        raise ValueError(f"run_dir={run_dir}: the run directory must be local (checkpoint_dir and data.path may be URLs)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    torch.manual_seed(t.seed)
    data_dir = _prepare_data(cfg, run_dir, rank)
    ds = TokenDataset(data_dir)
    vocab = -(-ds.vocab_size // 64) * 64
    tok = load_dataset_tokenizer(data_dir)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    is_moe = model_cfg.moe is not None
    ep = cfg.parallel.ep or (world if is_moe else 1)
    if world % ep:
        raise ValueError(f"parallel.ep={ep} does not divide the world size {world}")
    check_fits(model_cfg, t, ep=ep, platform=plat)
    compute_dtype = torch.bfloat16 if t.dtype == "bfloat16" or (t.dtype == "auto" and bf16_pays_off(plat)) else None
    model = from_config(model_cfg, device=device, dtype="float32", seed=t.seed)
    shadow = int(cfg.parallel.shadow) if cfg.parallel.shadow.isdigit() else cfg.parallel.shadow
    for m in model.modules():
        if isinstance(m, MoE):
            m.shadow, m.schedule = shadow, cfg.parallel.schedule
    mesh = make_mesh(dp=world // ep, ep=ep)
    model = parallelize(model, mesh)
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    compile_model(model, t.compile)
    model.train()
    opt, sched = make_optimizer(model, t)
    micro = t.global_batch // t.grad_accum
    holdout = t.eval_windows
    sampler = TokenSampler(ds, t.seq_len, micro, seed=t.seed, rank=rank, world=world, holdout=holdout)
    ckpt = CheckpointManager(t.checkpoint_dir or run_dir / "checkpoints", keep=t.checkpoint_keep,
                             async_save=t.checkpoint_async) if t.checkpoint_every else None
    if ckpt is not None:
        ckpt.guard(opt)  # an async save's staging copy overlaps the next step until the optimizer writes
    state = TrainingState(model, opt, sched, sampler, mesh)
    ckpt_files = checkpoint_files(model_cfg, tok) if ckpt is not None and rank == 0 else None
    start = 0
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if ckpt is not None and (resume or restarted):
        start = _resume_point(ckpt, state, rank)
    if rank == 0:
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str) + "\n")
        n_params = sum(p.numel() for p in model.parameters())
        log.info("training %s: %.1fM parameters on rank 0 (ep=%d, dp=%d, world=%d), %s, %d steps of %d × %d tokens",
                 model_cfg.arch, n_params / 1e6, ep, world // ep, world,
                 "bf16 autocast" if compute_dtype else "fp32", t.steps, t.global_batch, t.seq_len)
    autocast = (lambda: torch.autocast(device.type, dtype=compute_dtype)) if compute_dtype else contextlib.nullcontext
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    log_f = open(run_dir / "log.jsonl", "a") if rank == 0 else None
    history = []
    tokens_per_step = t.global_batch * t.seq_len
    for step in range(start, t.steps):
        t0 = time.perf_counter()
        total, norm = train_step(model, lambda: sampler.next_batch().to(device), opt, sched, t, mesh, autocast)
        if dist.is_initialized():
            dist.all_reduce(total)
            total /= world
        dt = time.perf_counter() - t0
        rec = {"step": step + 1, "loss": float(total[0]), "aux_loss": float(total[1]), "lr": sched.get_last_lr()[0],
               "grad_norm": norm, "tokens_per_s": tokens_per_step / dt, "step_s": dt}
        if is_moe and (step % t.log_every == 0 or step == t.steps - 1):
            rec["expert_imbalance"] = _imbalance(model)
        history.append(rec)
        if rank == 0:
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                            imbalance=f"{rec.get('expert_imbalance', 1.0):.2f}", refresh=False)
            bar.update(1)
        if ckpt is not None and ((step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps):
            ckpt.save(step + 1, state.state_dict(step + 1), files=ckpt_files)
    if ckpt is not None:
        ckpt.close()
    if bar is not None:
        bar.close()
    eval_loss = evaluate(model, ds, t, holdout, rank, world, device, autocast)
    result = {"final_loss": history[-1]["loss"] if history else float("nan"), "eval_loss": eval_loss, "steps": t.steps,
              "tokens_per_s": sum(h["tokens_per_s"] for h in history[1:]) / max(1, len(history) - 1)}
    from bagualu.train.export import export_hf

    export_hf(model, mesh, model_cfg, tok, run_dir / "hf", rank)
    if rank == 0:
        log_f.write(json.dumps({"eval_loss": eval_loss, **result}) + "\n")
        log_f.close()
        from bagualu.train.plot import plot_history

        plot_history(history, run_dir / "training.png", title=f"{model_cfg.arch}, eval loss {eval_loss:.3f}")
        log.info("done: final loss %.4f, eval loss %.4f, %.0f tokens/s; run dir %s", result["final_loss"],
                 eval_loss, result["tokens_per_s"], run_dir)
    return result


@torch.no_grad()
def evaluate(model, ds, t, holdout, rank, world, device, autocast) -> float:
    """Mean cross-entropy over the held-out windows (the same set whatever the world size)."""
    model.eval()
    per_rank = max(1, holdout // world)
    sampler = TokenSampler(ds, t.seq_len, per_rank * world, rank=rank, world=world, holdout=holdout, split="eval")
    with autocast():
        ce, _ = lm_loss(model, sampler.next_batch().to(device), t)
    loss = torch.tensor([float(ce)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(loss)
        loss /= world
    model.train()
    return float(loss)
