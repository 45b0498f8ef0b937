"""FasterMoE's smart schedule: the token exchange split by peer, overlapped with expert compute.

Legend: ep ranks, r this rank; round i pairs r with dst = r + i (I send it my rows for its experts) and
src = r − i (it sends me its rows for mine); round 0 is the local part and moves nothing.

    round:      0            1            2          ...
    exchange:   (local)   [x ↔ r±1]    [x ↔ r±2]
    compute:    src=r     src=r−1      src=r−2           ← round i+1's exchange is already in flight
    return:     (local)   [y ↔ r±1]    [y ↔ r±2]         ← asynchronous, waited for at the end

Each message is a P2P ``isend``/``irecv`` on the EP group with a tag per (round, phase), so messages
between the same pair in different rounds never cross. Backward runs the same rounds with gradients.
The expert math is ``experts_forward``/``experts_backward``, so results equal the all-to-all path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bagualu.comm.timing import blocked
from bagualu.moe.ep_plan import EPPlan
from bagualu.moe.experts import experts_backward, experts_forward, release_when_freed


def _offsets(sizes: list[int]) -> list[int]:
    out, s = [], 0
    for n in sizes:
        out.append(s)
        s += n
    return out


def _swap(send_t, dst, recv_t, src, group, tag):
    """Post one send and one receive (either may be empty); returns the work handles."""
    ops = []
    if send_t.shape[0]:
        ops.append(dist.P2POp(dist.isend, send_t.contiguous(), dist.get_global_rank(group, dst), group, tag))
    if recv_t.shape[0]:
        ops.append(dist.P2POp(dist.irecv, recv_t, dist.get_global_rank(group, src), group, tag))
    return dist.batch_isend_irecv(ops) if ops else []


def _rounds(plan: EPPlan, a_send, make_recv, compute, tag0: int, group):
    """Run the rounds: exchange ``a_send`` chunks, ``compute(src, received)`` → chunk to return; returns
    the chunks returned to me, laid out like ``a_send``. ``compute`` runs while the next round's
    exchange is in flight."""
    ep, r = plan.ep, plan.rank
    send_sizes = [sum(plan.send_counts(d)) for d in range(ep)]
    off = _offsets(send_sizes)
    back = None

    def post(i):
        dst, src = (r + i) % ep, (r - i) % ep
        send_chunk = a_send[off[dst]:off[dst] + send_sizes[dst]]
        if i == 0:
            return send_chunk, []
        recv = make_recv(src)
        return recv, _swap(send_chunk, dst, recv, src, group, tag0 + 2 * i)

    pending, works_back = post(0), []
    for i in range(ep):
        dst, src = (r + i) % ep, (r - i) % ep
        recv, works = pending
        if i + 1 < ep:
            pending = post(i + 1)
        with blocked():
            for w in works:
                w.wait()
        out = compute(src, recv)
        if back is None:
            back = out.new_empty(a_send.shape[0], *out.shape[1:])
        mine = back[off[dst]:off[dst] + send_sizes[dst]]
        if i == 0:
            mine.copy_(out)
        else:
            works_back += _swap(out, src, mine, dst, group, tag0 + 2 * i + 1)
    with blocked():
        for w in works_back:
            w.wait()
    return back


class PipelinedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_send_ND, w_gate, w_up, w_down, plan: EPPlan, group):
        D = x_send_ND.shape[1]
        saved = {}

        def compute(src, x_recv):
            y, saved[src] = experts_forward(x_recv, w_gate, w_up, w_down, plan.recv_counts(src))
            return y

        def make_recv(src):
            return x_send_ND.new_empty(sum(plan.recv_counts(src)), D)

        y_send = _rounds(plan, x_send_ND, make_recv, compute, 0, group)
        ctx.plan, ctx.group, ctx.saved = plan, group, saved
        release_when_freed(ctx, *[t for sv in saved.values() for t in sv[1:]])
        ctx.save_for_backward(w_gate, w_up, w_down)
        return y_send if y_send is not None else x_send_ND.new_empty(0, D)

    @staticmethod
    def backward(ctx, dy_send_ND):
        w_gate, w_up, w_down = ctx.saved_tensors
        plan, group = ctx.plan, ctx.group
        D = dy_send_ND.shape[1]
        dw = [torch.zeros_like(w_gate), torch.zeros_like(w_up), torch.zeros_like(w_down)]

        def compute(src, dy_recv):
            dx, *g = experts_backward(ctx.saved[src], w_gate, w_up, w_down, plan.recv_counts(src), dy_recv)
            for acc, gi in zip(dw, g):
                acc += gi
            return dx

        def make_recv(src):
            return dy_send_ND.new_empty(sum(plan.recv_counts(src)), D)

        dx_send = _rounds(plan, dy_send_ND.contiguous(), make_recv, compute, 4 * plan.ep, group)
        return dx_send, *dw, None, None
