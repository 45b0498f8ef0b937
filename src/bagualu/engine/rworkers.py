"""``RWorkerAttention``: FastDecode's R-part in CPU worker processes that own the KV cache.

Each worker allocates its pool's KV cache in its own memory and runs, per layer, ``write_kv`` +
``paged_attention`` for the sequences placed on it. The S-part (this process, on the platform device)
never holds KV; per step it sends each worker the metadata of its sequences, then per layer only q/k/v.

Data moves through shared memory, control through a pipe per worker:

    shared, per micro-batch m:  q[m] [T_max, H, Dh], k[m]/v[m] [T_max, G, Dh], out[m] [T_max, H, Dh]
    shared, per worker w and m: block tables, context lengths, query starts, slots (its sequences only)

    S (this process)                            R-worker w
    prepare(m): write w's metadata; ("meta", m, n_seq, t0, t1, M) ->   keep views of it
    submit(l, m): q/k/v -> q[m]...; ("attn", l, m) ->   write_kv, attention on rows [t0, t1)
    wait(l, m):                            <- ("done", l, m)   (out[m][t0:t1] written)

Workers write disjoint row ranges of ``out[m]``, so no copy gathers their results. A micro-batch's
buffers are reused by its next layer only after ``wait`` returned, which the runner's order
guarantees. Pipes cost ~20-50 µs a round trip; per step that is layers × micro-batches × workers of
them — small against a step, and blocking (no spinning: the S-part needs the cores too).

A worker that dies or raises makes ``wait`` raise ``RWorkerError``; the engine then stops cleanly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import traceback
import uuid
from multiprocessing.connection import Connection

import torch

from bagualu.engine.attention import KVSpec, allocate_cache, attend
from bagualu.engine.batch import StepInputs
from bagualu.utils.logging import get_logger

log = get_logger(__name__)


class RWorkerError(RuntimeError):
    pass


class Arena:
    """Named tensors carved out of one shared file (``/dev/shm`` when it exists): every process that maps
    the file with the same layout sees the same memory. Rejected: ``torch.multiprocessing`` tensor
    passing, which needs the ``spawn``/``fork`` start methods (spawn re-runs the user's ``__main__``,
    fork is unsafe once OpenMP threads exist)."""

    def __init__(self, path: str, layout: dict[str, tuple[int, tuple[int, ...], torch.dtype]], nbytes: int):
        self.path, self.layout, self.nbytes = path, layout, nbytes
        raw = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        self.t: dict[str, torch.Tensor] = {}
        for name, (off, shape, dt) in layout.items():
            n = 1
            for d in shape:
                n *= d
            elt = torch.empty((), dtype=dt).element_size()
            self.t[name] = raw[off:off + n * elt].view(dt).view(shape)

    @classmethod
    def create(cls, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> "Arena":
        layout, off = {}, 0
        for name, (shape, dt) in shapes.items():
            layout[name] = (off, shape, dt)
            n = torch.empty((), dtype=dt).element_size()
            for d in shape:
                n *= d
            off += -(-n // 64) * 64  # cache-line aligned
        base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        return cls(os.path.join(base, f"bagualu-rworkers-{os.getpid()}-{uuid.uuid4().hex[:8]}"), layout, max(off, 64))

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _worker_loop(conn: Connection) -> None:
    rank, spec, path, layout, nbytes, threads = conn.recv()
    torch.set_num_threads(threads)
    sh = Arena(path, layout, nbytes).t
    cache = allocate_cache(spec, "cpu")
    meta: dict[int, tuple] = {}
    conn.send(("ready", rank))
    with torch.inference_mode():
        while True:
            msg = conn.recv()
            kind = msg[0]
            if kind == "attn":
                _, layer, mb = msg
                n_seq, t0, t1, M = meta[mb]
                attend(cache[layer], spec, layer, sh[f"q{mb}"][t0:t1], sh[f"k{mb}"][t0:t1], sh[f"v{mb}"][t0:t1],
                       sh[f"bt{rank}.{mb}"][:n_seq, :M], sh[f"ctx{rank}.{mb}"][:n_seq],
                       sh[f"qsl{rank}.{mb}"][:n_seq + 1], sh[f"slots{rank}.{mb}"][:t1 - t0],
                       out=sh[f"out{mb}"][t0:t1], platform="cpu")
                conn.send(("done", layer, mb))
            elif kind == "meta":
                _, mb, n_seq, t0, t1, M = msg
                meta[mb] = (n_seq, t0, t1, M)
            elif kind == "close":
                return


def worker_main(fd: int) -> None:
    """Entry point of ``python -m bagualu.engine.rworkers FD``: serve the engine over the socket ``FD``."""
    conn = Connection(fd)
    try:
        _worker_loop(conn)
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass


class RWorkerAttention:
    """The R-part over ``num_workers`` CPU processes, each owning one KV pool of ``spec.num_blocks`` blocks."""

    def __init__(self, spec: KVSpec, num_workers: int, *, heads: int, max_tokens: int, max_seqs: int,
                 max_blocks_per_seq: int, micro_batches: int = 2, threads: int = 1,
                 device: torch.device | str = "cpu", act_dtype: torch.dtype | None = None):
        self.spec = spec
        self.device = torch.device(device)
        self.num_pools = num_workers
        self.threads = threads  # per worker
        G, Dh, dt = spec.num_kv_heads, spec.head_dim, act_dtype or spec.dtype  # q/k/v/out in the S-part's dtype
        T, S, M = max_tokens, max_seqs, max_blocks_per_seq
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for mb in range(micro_batches):
            shapes.update({f"q{mb}": ((T, heads, Dh), dt), f"k{mb}": ((T, G, Dh), dt), f"v{mb}": ((T, G, Dh), dt),
                           f"out{mb}": ((T, heads, Dh), dt)})
            for w in range(num_workers):
                shapes.update({f"bt{w}.{mb}": ((S, M), torch.int32), f"ctx{w}.{mb}": ((S,), torch.int32),
                               f"qsl{w}.{mb}": ((S + 1,), torch.int32), f"slots{w}.{mb}": ((T,), torch.int64)})
        self.arena = Arena.create(shapes)
        self.sh = self.arena.t
        self._conns: list[Connection] = []
        self._procs: list[subprocess.Popen] = []
        try:
            for w in range(num_workers):
                mine, theirs = socket.socketpair()
                env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                p = subprocess.Popen([sys.executable, "-m", "bagualu.engine.rworkers", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], env=env)
                theirs.close()
                conn = Connection(mine.detach())
                conn.send((w, spec, self.arena.path, self.arena.layout, self.arena.nbytes, threads))
                self._conns.append(conn)
                self._procs.append(p)
            for w in range(num_workers):
                self._recv(w, "ready", timeout=120)
        except BaseException:
            self.close()
            raise
        finally:
            self.arena.unlink()  # the mappings stay; nothing is left in /dev/shm when a process dies
        self._active: dict[int, list[int]] = {}
        self._ntok: dict[int, int] = {}
        log.info("R-workers: %d processes x %d threads, %d KV blocks each", num_workers, threads, spec.num_blocks)

    def _recv(self, w: int, expect: str, timeout: float = 600):
        conn, p = self._conns[w], self._procs[w]
        try:
            if not conn.poll(timeout):
                raise RWorkerError(f"R-worker {w} did not answer within {timeout:.0f} s (exit code {p.poll()})")
            msg = conn.recv()
        except (EOFError, OSError) as e:
            raise RWorkerError(f"R-worker {w} died (exit code {p.poll()}): {e!r}") from None
        if msg[0] == "error":
            raise RWorkerError(f"R-worker {w} failed:\n{msg[1]}")
        if msg[0] != expect:
            raise RWorkerError(f"R-worker {w} answered {msg[0]!r}, expected {expect!r}")
        return msg

    def _send(self, w: int, msg) -> None:
        try:
            self._conns[w].send(msg)
        except OSError as e:
            raise RWorkerError(f"R-worker {w} is gone (exit code {self._procs[w].poll()}): {e!r}") from None

    def prepare(self, mb: int, step: StepInputs) -> None:
        """Write each worker's metadata for micro-batch ``mb`` and tell it the row range it owns."""
        active, sh = [], self.sh
        for w, ps in enumerate(step.pools):
            n_seq = ps.seqs[1] - ps.seqs[0]
            if not n_seq:
                continue
            M = ps.block_tables_SM.shape[1]
            sh[f"bt{w}.{mb}"][:n_seq, :M].copy_(ps.block_tables_SM)
            sh[f"ctx{w}.{mb}"][:n_seq].copy_(ps.context_lens_S)
            sh[f"qsl{w}.{mb}"][:n_seq + 1].copy_(ps.query_start_loc_S1)
            sh[f"slots{w}.{mb}"][:ps.num_tokens].copy_(ps.slot_mapping_T)
            t0, t1 = ps.tokens
            self._send(w, ("meta", mb, n_seq, t0, t1, M))
            active.append(w)
        self._active[mb] = active
        self._ntok[mb] = step.num_tokens

    def submit(self, layer: int, mb: int, q_THDh, k_TGDh, v_TGDh) -> None:
        T, sh = self._ntok[mb], self.sh
        sh[f"q{mb}"][:T].copy_(q_THDh)
        sh[f"k{mb}"][:T].copy_(k_TGDh)
        sh[f"v{mb}"][:T].copy_(v_TGDh)
        for w in self._active[mb]:
            self._send(w, ("attn", layer, mb))

    def wait(self, layer: int, mb: int) -> torch.Tensor:
        for w in self._active[mb]:
            self._recv(w, "done")
        return self.sh[f"out{mb}"][:self._ntok[mb]].to(self.device, non_blocking=True)

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def close(self) -> None:
        """Stop the workers (idempotent): ask politely, then kill whoever is left after 5 s."""
        for conn in self._conns:
            try:
                conn.send(("close",))
            except Exception:
                pass
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __del__(self):
        if getattr(self, "_procs", None):
            self.close()


if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
