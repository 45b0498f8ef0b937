"""``EngineCore``: requests in, one ``step()`` at a time, outputs out — scheduler + runner + sampler.

One step: the scheduler picks ``{request: n_tokens}`` under the token budget (and preempts if KV blocks
ran out) → the batch is split into micro-batches (two with R-workers, balanced in tokens and KV) and
flattened → the runner runs the model, the R-part through the attention back-end → requests whose
tokens are all computed sample their next token → stop checks and incremental detokenisation →
finished requests free their blocks.

A user request with ``n > 1`` becomes ``n`` sequences ``{id}#{i}`` that share the prompt (and, through
the prefix cache, its KV blocks once the first has computed them); outputs are grouped back by id.
Not thread-safe: ``AsyncEngine`` drives it from one thread.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import os
import time
from dataclasses import dataclass, field

import torch

from bagualu.engine.attention import KVSpec, LocalAttention
from bagualu.engine.batch import StepInputs, build_inputs
from bagualu.engine.config import EngineConfig
from bagualu.engine.detokenizer import Detokenizer
from bagualu.engine.kv_manager import KVManager
from bagualu.engine.metrics import EngineMetrics
from bagualu.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from bagualu.engine.params import SamplingParams
from bagualu.engine.request import Request
from bagualu.engine.runner import ModelRunner, check_supported, fp32_activation_steps
from bagualu.engine.sampler import sample
from bagualu.engine.scheduler import ScheduledBatch, Scheduler
from bagualu.engine.speculative import PromptLookup
from bagualu.engine.structured import GrammarError, Grammars
from bagualu.memory.host_allocator import describe as describe_allocator
from bagualu.memory.host_allocator import tune_glibc_malloc
from bagualu.memory.weight_arena import pack_module
from bagualu.ops.threads import small_step
from bagualu.utils.logging import get_logger

log = get_logger(__name__)

DEFAULT_KV_MEMORY_CAP = 4 << 30
# Steps of at most this many tokens run torch's own ops single-threaded (ops.threads.small_step); the fast
# kernels keep every thread. Up to a few decode rows nothing but the GEMMs gains from a second thread.
SMALL_STEP_TOKENS = 16
# A half model on a platform with fast half GEMMs runs steps of at most this many tokens with fp32
# activations over its half weights (engine.runner: the GEMV that reads them as stored), larger ones with half
# operands in the layer operator where the platform multiplies them natively, else in its dtype. Measured on
# a Zen 5 (~110M Llama, bf16, ms per decode step, fp32 activations vs bf16): 1 row 6.1 vs 16.6, 8 rows 15.1 vs
# 20.7, 16 rows 21.1 vs 24.8, 24 rows 28.7 vs 25.8, 32 rows 32.8 vs 30.1.
FP32_ACTIVATION_ROWS = 16


class RequestError(ValueError):
    """A request the engine refuses (too long, bad parameters, duplicate id): the client's error.

    ``param`` names the offending field (``prompt``, ``max_tokens``, ``request_id``) and ``code`` says what is
    wrong with it (``context_length_exceeded``, ``invalid_value``, ``duplicate_id``), as OpenAI's error body does.
    """

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Request]
    detoks: list[Detokenizer]
    arrival_time: float
    num_cached_tokens: int = 0
    done: bool = False
    changed: bool = field(default=False)


def _kv_spec(model, cfg: EngineConfig, num_blocks: int) -> KVSpec:
    mc = model.config
    return KVSpec(num_layers=mc.num_layers, num_blocks=num_blocks, block_size=cfg.block_size,
                  num_kv_heads=mc.num_kv_heads, head_dim=mc.dim_head, dtype=_kv_dtype(model, cfg),
                  windows=tuple(layer.window for layer in model.model.layers),
                  scale=model.model.layers[0].self_attn.scale)


def _kv_dtype(model, cfg: EngineConfig) -> torch.dtype:
    if cfg.kv_cache_dtype is None:
        return model.dtype
    from bagualu.models.hf.load import resolve_dtype

    return resolve_dtype(cfg.kv_cache_dtype, "float32")


def _num_blocks(model, cfg: EngineConfig, num_pools: int, device: torch.device) -> int:
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    per_block = _kv_spec(model, cfg, 1).bytes_per_block
    total = cfg.kv_cache_memory
    if total is None:
        from bagualu.platform import current_platform

        kv_device = torch.device("cpu") if cfg.r_workers else device
        plat = current_platform()
        free, _ = plat.memory_info() if kv_device.type == plat.device_type else (0, 0)
        if kv_device.type == "cpu" and not free:
            from bagualu.platform.cpu import host_memory

            free = host_memory()[0]
        total = min(free // 4, DEFAULT_KV_MEMORY_CAP)
        # never more than every sequence at full context could use
        max_len = min(cfg.max_model_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        total = min(total, cfg.max_num_seqs * -(-max_len // cfg.block_size) * per_block)
    n = total // num_pools // per_block
    if n < 1:
        raise ValueError(f"kv_cache_memory={total} bytes holds no KV block of {per_block} bytes per pool; "
                         f"raise kv_cache_memory or lower block_size")
    return n


_frozen_by = 0  # engines alive that froze the collector's view (_gc_freeze)


def _gc_freeze() -> None:
    """What is alive when an engine is built (torch, the model, the tokenizer: ~200k objects in `bagualu
    serve`) lives as long as the engine. Moved out of the collector's generations, a full collection in the
    step loop scans only what was made since; else each pauses every running request for ~150 ms here."""
    global _frozen_by
    if _frozen_by == 0:
        atexit.unregister(_gc_release)
        atexit.register(_gc_release, at_exit=True)
    _frozen_by += 1
    gc.collect()
    gc.freeze()


def _gc_release(at_exit: bool = False) -> None:
    """Back to the generations when the last engine closes, or at exit: frozen objects are never finalised,
    and nanobind (Triton's bindings) reports what was never finalised as leaks."""
    global _frozen_by
    _frozen_by = 0 if at_exit else max(_frozen_by - 1, 0)
    if _frozen_by == 0:
        gc.unfreeze()


def _score_prompt(logits_QV: torch.Tensor, spans) -> None:
    """Prompt logprobs: row j of a span scores the prompt token after its position (rows in span order).
    Written by position, so a recompute after preemption rewrites the same entries."""
    lp_QV = torch.log_softmax(logits_QV, dim=-1)
    q = 0
    for req, p0, c in spans:
        ids = req.prompt_token_ids[p0 + 1:p0 + 1 + c]
        lp = lp_QV[q:q + c]
        chosen = lp.gather(1, torch.tensor(ids, dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
        k = req.params.prompt_logprobs
        top = lp.topk(k, dim=-1) if k else None
        for j in range(c):
            d = dict(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else {}
            d[ids[j]] = chosen[j]
            req.prompt_logprobs[p0 + 1 + j] = d
        q += c


def _usable_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or ``taskset``'s share), not the
    host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class EngineCore:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.config = cfg = config or EngineConfig()
        check_supported(model)
        self.model = model
        self.tokenizer = tokenizer
        mc = model.config
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        num_pools = max(cfg.r_workers, 1)
        self.num_blocks = _num_blocks(model, cfg, num_pools, model.device)
        self.kv_spec = _kv_spec(model, cfg, self.num_blocks)
        fp32_rows = FP32_ACTIVATION_ROWS if cfg.gemm_dtype == "auto" else -1
        s_on_cpu = model.device.type == "cpu"
        self.num_micro_batches = cfg.num_micro_batches(s_on_cpu)
        if cfg.r_workers:
            from bagualu.engine.rworkers import RWorkerAttention

            self.backend = RWorkerAttention(
                self.kv_spec, cfg.r_workers, heads=mc.num_heads, max_tokens=cfg.max_num_batched_tokens,
                max_seqs=cfg.max_num_seqs, max_blocks_per_seq=-(-self.max_model_len // cfg.block_size),
                micro_batches=self.num_micro_batches, threads=cfg.r_worker_thread_count(s_on_cpu, _usable_cores()),
                device=model.device,
                # fp32 q/k/v/out where a half model's small steps run with fp32 activations (exact either way)
                act_dtype=torch.float32 if fp32_activation_steps(model, fp32_rows) else model.dtype)
        else:
            self.backend = LocalAttention(self.kv_spec, model.device)
        self.kv = KVManager(num_pools, self.num_blocks, cfg.block_size, prefix_caching=cfg.prefix_caching)
        self.scheduler = Scheduler(cfg.scheduler_config(), self.kv)
        if model.device.type == "cpu" and tune_glibc_malloc():
            # a prefill step's activations (tens of MiB each) are reused, not page-faulted in on every step, as
            # glibc's defaults do above 32 MiB: fp32 ~110M Llama, 32 prompts x 128, prefill 2.18-2.39 -> 2.05-2.12 s
            log.info("engine: %s", describe_allocator())
        self.weight_arena = self.huge_pages = None
        if cfg.huge_pages and model.device.type == "cpu":  # the fused projections are what the steps read
            model.fuse_projections()
            self.weight_arena = pack_module(model)
            self.huge_pages = hp = self.weight_arena.huge_pages
            log.info("engine: weights packed in decode order, %.0f MiB; on huge pages: %.0f MiB (THP mode %s%s)",
                     self.weight_arena.nbytes / 2**20, hp.collapsed_bytes / 2**20, hp.mode,
                     f"; collapse: {hp.collapse_error}" if hp.collapse_error else "")
        self.runner = ModelRunner(model, self.backend, fused_layers=cfg.fused_layers, fp32_activation_rows=fp32_rows,
                                  packed_weights=cfg.packed_weights)
        self.metrics = EngineMetrics()
        self.generator = torch.Generator(device=model.device).manual_seed(cfg.seed)
        eos = mc.eos_token_id if mc.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        self._groups: dict[str, _Group] = {}
        self.grammars = Grammars(tokenizer, mc.vocab_size, self.eos_token_ids)
        self.lookup = (PromptLookup(cfg.speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min)
                       if cfg.speculative_tokens else None)
        self._group_of: dict[str, _Group] = {}  # sequence id -> its user request
        log.info("engine: %s %s (KV %s), KV %d blocks x %d tokens per pool, %d pool(s) (%s), %.1f MiB of KV",
                 mc.arch, model.dtype, self.kv_spec.dtype, self.num_blocks, cfg.block_size, num_pools, cfg.attention_mode,
                 self.num_blocks * num_pools * self.kv_spec.bytes_per_block / 2**20)
        _gc_freeze()
        self._frozen = True

    # ---- requests ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    *, arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self._groups:
            raise RequestError(f"request id {request_id!r} is already in use", param="request_id", code="duplicate_id")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise RequestError("the prompt is empty; give at least one token", param="prompt")
        V = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise RequestError(f"prompt token ids must lie in [0, {V}); got {min(ids)}..{max(ids)}", param="prompt")
        if params.logit_bias and max(params.logit_bias) >= V:
            raise RequestError(f"logit_bias token ids must lie in [0, {V}); got {max(params.logit_bias)}",
                               param="logit_bias")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens but the model's context is {self.max_model_len}; "
                               f"shorten the prompt", param="prompt", code="context_length_exceeded")
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError(f"max_tokens={params.max_tokens} plus the prompt's {len(ids)} tokens exceeds the "
                               f"model's context of {self.max_model_len}; lower max_tokens or the prompt",
                               param="max_tokens", code="context_length_exceeded")
        pool_tokens = self.num_blocks * self.config.block_size
        if len(ids) + 1 > pool_tokens:
            raise RequestError(f"the prompt has {len(ids)} tokens but a KV pool holds only {pool_tokens}; "
                               f"give the engine more KV memory (kv_cache_memory / num_kv_blocks)",
                               param="prompt", code="context_length_exceeded")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs, detoks = [], []
        for i in range(params.n):
            p = params
            if params.n > 1 and params.seed is not None:
                p = dataclasses.replace(p, seed=params.seed + i)
            if i > 0 and params.prompt_logprobs is not None:  # the first sequence scores the shared prompt
                p = dataclasses.replace(p, prompt_logprobs=None)
            sid = request_id if params.n == 1 else f"{request_id}#{i}"
            seqs.append(Request(request_id=sid, prompt_token_ids=list(ids), params=p,
                                eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len,
                                arrival_time=arrival))
            if params.structured_output is not None:
                try:
                    seqs[-1].matcher = self.grammars.matcher(params.structured_output)
                except GrammarError as e:
                    raise RequestError(str(e), param="response_format") from None
            detoks.append(Detokenizer(self.tokenizer, stop=params.stop,
                                      include_stop=params.include_stop_str_in_output,
                                      skip_special_tokens=params.skip_special_tokens))
        g = _Group(request_id, text, list(ids), seqs, detoks, arrival)
        self._groups[request_id] = g
        for s in seqs:
            self._group_of[s.request_id] = g
            self.scheduler.add(s)
        self.metrics.prompt_tokens += len(ids) * params.n

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if it is unknown or already finished."""
        g = self._groups.get(request_id)
        if g is None or g.done or all(s.finished for s in g.seqs):
            return False
        for s in g.seqs:
            if not s.finished:
                self.scheduler.abort(s)
                self.metrics.requests_finished["abort"] += 1
        g.changed = True
        return True

    def queue_state(self) -> tuple[int, int, int]:
        """(waiting sequences, running sequences, max running sequences): what an admission bound reads."""
        s = self.scheduler
        return len(s.waiting), len(s.running), s.config.max_num_seqs

    def has_unfinished(self) -> bool:
        return any(not g.done for g in self._groups.values())

    @property
    def num_requests(self) -> int:
        return sum(not g.done for g in self._groups.values())

    # ---- one step ------------------------------------------------------------------------------------
    def step(self, *, finished_only: bool = False) -> list[RequestOutput]:
        """Schedule, run, sample; returns the outputs of requests that changed (finished ones once), or with
        ``finished_only`` those of the requests that finished (what an offline caller reads: building every
        running request's output each step cost ~0.13 ms of a ~12 ms step at 32 requests)."""
        if self.lookup is not None:  # drafts for this step (none in a large batch: see speculative_max_seqs)
            on = len(self.scheduler.running) <= self.config.speculative_max_seqs
            for r in self.scheduler.running:
                r.draft = self.lookup.propose(r) if on and self.lookup.eligible(r) else []
        batch = self.scheduler.schedule()
        self.metrics.preemptions += len(batch.preempted)
        if batch.requests:
            mbs = self._micro_batches(batch)
            # a decode-sized step, or one whose work is the platform's kernels, runs torch's few ops on one thread
            # (ops.threads: a second OpenMP thread would spin on the core the kernels' helper thread needs)
            small = batch.total_tokens <= SMALL_STEP_TOKENS or self.runner.native_step(batch.total_tokens)
            with small_step() if small else contextlib.nullcontext():
                logits = self.runner.execute(mbs)
                due = self.scheduler.advance(batch)
                self.metrics.computed_tokens += batch.total_tokens
                rows = [lg[:len(st.logits_rows)] for lg, st in zip(logits, mbs) if lg is not None and st.logits_rows]
                for lg, st in zip(logits, mbs):
                    if st.prompt_spans:
                        _score_prompt(lg[len(st.logits_rows):], st.prompt_spans)
                due_order = [r for st in mbs for r in st.due]  # a speculative step's request: once per row
                assert len(due_order) == len(due) + sum(len(r.draft) for r in due)
                sampled = (sample(torch.cat(rows) if len(rows) > 1 else rows[0], due_order, self.generator,
                                  self.grammars) if rows else [])
            now = time.monotonic()
            j = 0
            while j < len(due_order):
                req = due_order[j]
                k = len(req.draft)
                self._accept_run(req, sampled[j:j + k + 1], now) if k else self._accept(req, sampled[j], now)
                j += k + 1
        self._update_gauges()
        return self._collect(finished_only)

    def _micro_batches(self, batch: ScheduledBatch) -> list[StepInputs]:
        n_mb = min(self.num_micro_batches, len(batch))
        order = list(range(len(batch)))
        groups: list[list[int]] = [[] for _ in range(n_mb)]
        if n_mb == 1:
            groups[0] = order
        else:  # balance tokens (S-part) first, then keys read (R-part)
            load = [(0, 0)] * n_mb
            order.sort(key=lambda i: (batch.num_tokens[i], batch.start[i]), reverse=True)
            for i in order:
                m = min(range(n_mb), key=lambda j: load[j])
                groups[m].append(i)
                load[m] = (load[m][0] + batch.num_tokens[i], load[m][1] + batch.start[i] + batch.num_tokens[i])
        out = []
        for g in groups:
            g.sort(key=lambda i: (batch.requests[i].pool, i))
            reqs = [batch.requests[i] for i in g]
            out.append(build_inputs(reqs, [batch.start[i] for i in g], [batch.num_tokens[i] for i in g],
                                    [self.kv.block_ids(r.request_id) for r in reqs], len(self.kv.pools),
                                    self.config.block_size, self.model.device))
        return out

    def _accept_run(self, req: Request, run, now: float) -> None:
        """A speculative step's tokens, one per row: accepted while each equals the next draft (each match
        makes that draft's KV valid); the first mismatch, or the token after the last draft, ends the run."""
        draft = req.draft
        req.draft = []
        self.metrics.spec_draft_tokens += len(draft)
        for i, s in enumerate(run):
            self._accept(req, s, now)
            if req.finished or i == len(draft) or s.token != draft[i]:
                break
            req.num_computed_tokens += 1
            self.metrics.spec_accepted_tokens += 1
        if not req.finished:
            self.kv.cache_full_blocks(req)

    def _accept(self, req: Request, s, now: float) -> None:
        req.append_token(s.token, now)
        self.metrics.generation_tokens += 1
        if req.params.logprobs is not None:
            req.sampled_logprobs.append(s.logprob)
            top = dict(s.top or {})
            top.setdefault(s.token, s.logprob)
            req.logprobs.append(top)
        g = self._group_of[req.request_id]
        g.changed = True
        finished = req.check_stop_token()
        if req.matcher is not None and not finished:
            req.matcher.accept_token(s.token)
            if req.matcher.is_terminated():  # the grammar is complete: its end token was drawn
                finished = req.finish("stop", s.token)
        det = g.detoks[g.seqs.index(req)]
        hit = det.update(req.output_token_ids, final=finished)
        if hit is not None and not finished:
            req.finish("stop", hit)
            finished = True
        if finished:
            self.scheduler.finish(req)
            self.metrics.requests_finished[req.finish_reason] += 1
            self._observe(req, now)

    def _observe(self, req: Request, now: float) -> None:
        m = self.metrics
        if req.first_token_time is not None:
            m.ttft.observe(req.first_token_time - req.arrival_time)
            n = len(req.output_token_ids)
            if n > 1:
                m.tpot.observe((req.last_token_time - req.first_token_time) / (n - 1))
        m.e2e.observe(now - req.arrival_time)

    def _update_gauges(self) -> None:
        m, s = self.metrics, self.scheduler
        m.num_running, m.num_waiting = len(s.running), len(s.waiting)
        m.kv_usage = self.kv.usage()
        m.prefix_cache_hit_rate = self.kv.prefix_hit_rate()
        m.record_step(s.live_kv_tokens())

    def _collect(self, finished_only: bool = False) -> list[RequestOutput]:
        outs = []
        for rid, g in list(self._groups.items()):
            if not g.changed:
                continue
            g.changed = False
            if finished_only and not all(s.finished for s in g.seqs):
                continue
            out = self._output(g)
            outs.append(out)
            if out.finished:
                g.done = True
                del self._groups[rid]
                for s in g.seqs:
                    self._group_of.pop(s.request_id, None)
        return outs

    def _output(self, g: _Group) -> RequestOutput:
        comps = []
        for i, (s, d) in enumerate(zip(g.seqs, g.detoks)):
            want_lp = s.params.logprobs is not None
            comps.append(CompletionOutput(
                index=i, text=d.text, token_ids=list(s.output_token_ids), finish_reason=s.finish_reason,
                stop_reason=s.stop_reason, logprobs=list(s.logprobs) if want_lp else None,
                token_logprobs=list(s.sampled_logprobs) if want_lp else None, stream_upto=d.stream_upto(s.finished)))
        first = [s.first_token_time for s in g.seqs if s.first_token_time is not None]
        finished = all(s.finished for s in g.seqs)
        metrics = RequestMetrics(arrival_time=g.arrival_time, first_token_time=min(first) if first else None,
                                 finished_time=time.monotonic() if finished else None,
                                 num_preemptions=sum(s.num_preemptions for s in g.seqs))
        plp = g.seqs[0].prompt_logprobs
        if plp is not None and len(plp) > 1 and plp[-1] is None:  # scored once the whole prompt is computed
            plp = None
        return RequestOutput(request_id=g.request_id, prompt=g.prompt, prompt_token_ids=g.prompt_token_ids,
                             outputs=comps, finished=finished, metrics=metrics,
                             prompt_logprobs=list(plp) if plp is not None else None)

    def close(self) -> None:
        self.backend.close()
        if self._frozen:
            self._frozen = False
            _gc_release()
