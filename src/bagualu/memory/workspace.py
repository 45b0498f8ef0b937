"""A workspace pool for large internal activations whose lifetime the owner controls exactly.

Why: with glibc's defaults every fresh tensor above ~32 MiB is mmap'ed and page-faulted on first touch
(2–3 GB/s here, ~10× slower than reused memory); an MoE layer's expert activations are tens of MB and
are allocated and freed every step. Buffers taken here are handed back explicitly by their owner (the
experts' autograd Function, after its backward) and reused by the next step — no process-wide
allocator change, so a peer measured in the same process keeps its own behaviour.

Buffers are kept per (dtype, device) in size classes of 1 MiB steps; at most ``max_cached`` per class.
Only for tensors that never escape to user code.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch

from bagualu.utils.tracing import real_tensors

_STEP = 1 << 20
_lock = threading.Lock()
_free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
max_cached = 8


def _key(nbytes: int, dtype: torch.dtype, device: torch.device) -> tuple:
    return (-(-nbytes // _STEP), dtype, device)


def take(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``shape``; small ones are plain allocations."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < 4 * _STEP:
        return torch.empty(shape, dtype=dtype, device=device)
    k = _key(nbytes, dtype, torch.device(device))
    with _lock:
        base = _free[k].pop() if _free[k] else None
    if base is None:
        base = torch.empty(k[0] * _STEP // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device)
    return base[:numel].view(shape)


def give(*tensors: torch.Tensor | None) -> None:
    """Return tensors obtained from ``take``; the caller must hold no other reference to them.

    The pooled buffer is the tensor's whole storage, seen as a flat tensor: not ``t._base``, which tensors
    made under ``torch.inference_mode`` (the serving engine) do not record.
    """
    for t in tensors:
        if t is None or t.numel() * t.element_size() < 4 * _STEP:
            continue
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes % _STEP:  # ``take``'s buffers are whole size classes
            raise ValueError(f"workspace.give: a {tuple(t.shape)} tensor whose storage ({nbytes} bytes) did not "
                             "come from take()")
        # also called from a finaliser, i.e. whenever the garbage collector runs: possibly in the middle
        # of a torch.compile trace, whose fake-tensor mode would reject this real tensor
        with real_tensors():
            base = t.new_empty(0).set_(storage, 0, (nbytes // t.element_size(),))
        k = _key(nbytes, base.dtype, base.device)
        with _lock:
            if len(_free[k]) < max_cached:
                _free[k].append(base)


def clear() -> None:
    with _lock:
        _free.clear()
