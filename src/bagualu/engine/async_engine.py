"""``AsyncEngine``: an ``EngineCore`` on one background thread, fed and read from asyncio.

``EngineCore`` is not thread-safe, so one thread owns it — it builds it (loading happens there, so a
server can listen and say "loading" meanwhile), applies submissions and aborts between steps, and
loops ``step()`` while there is work, sleeping on a condition variable when there is none (no busy
loop). Callers on any event loop talk to it through a locked inbox; outputs come back through
``loop.call_soon_threadsafe`` into one asyncio queue per request.

    engine = AsyncEngine(lambda: EngineCore(model, tok, cfg), max_waiting=64)
    engine.start()
    async for out in engine.generate("req-1", "Hello", SamplingParams(max_tokens=8)):
        print(out.outputs[0].text)          # cumulative; a consumer that stops early aborts the request
    await engine.shutdown(timeout=30)        # drain, then abort the rest

    submit ──► inbox (lock) ──► engine thread: add/abort ─► step() ─► call_soon_threadsafe ─► queue ─► consumer

Errors are scoped: a bad request (``RequestError``, ``ValueError``) fails that request only; an
exception from ``step()`` kills the loop — it is recorded, every in-flight request gets
``EngineDeadError``, ``healthy`` turns false and new submissions are refused. Outputs are cumulative,
so a slow consumer skips to the newest one instead of queueing every step's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from bagualu.engine.core import EngineCore, RequestError
from bagualu.engine.outputs import RequestOutput
from bagualu.engine.params import SamplingParams
from bagualu.utils.logging import get_logger

log = get_logger(__name__)


class EngineUnavailableError(RuntimeError):
    """The engine cannot take requests now (a server answers 503). ``reason``: loading, overloaded,
    draining, dead or stopped."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class EngineOverloadedError(EngineUnavailableError):
    def __init__(self, message: str):
        super().__init__("overloaded", message)


class EngineDeadError(RuntimeError):
    """The engine loop died; in-flight requests fail with this, and so does every new one."""


class EngineShutdownError(RuntimeError):
    """The request was still running when the shutdown drain timed out, and was aborted."""


@dataclass(eq=False)
class _Stream:
    request_id: str
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False

    # called on the stream's event loop (through call_soon_threadsafe)
    def _accept(self, error: BaseException | None) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(error) if error is not None else self.accepted.set_result(None)

    def _put(self, item: RequestOutput | BaseException) -> None:
        self.queue.put_nowait(item)


class RequestStream:
    """The cumulative outputs of one accepted request; iterate it, and ``close()`` it if you stop early
    (closing an unfinished stream aborts the request and frees its KV blocks)."""

    def __init__(self, engine: AsyncEngine, stream: _Stream):
        self._engine, self._s = engine, stream

    @property
    def request_id(self) -> str:
        return self._s.request_id

    @property
    def finished(self) -> bool:
        return self._s.finished

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        s = self._s
        if s.finished:
            raise StopAsyncIteration
        item = await s.queue.get()
        while not isinstance(item, BaseException) and not item.finished and not s.queue.empty():
            item = s.queue.get_nowait()  # outputs are cumulative: skip to the newest
        if isinstance(item, BaseException):
            s.finished = True
            raise item
        if item.finished:
            s.finished = True
        return item

    def close(self) -> None:
        if not self._s.finished:
            self._s.finished = True
            self._engine.abort(self._s.request_id)


class AsyncEngine:
    def __init__(self, factory: Callable[[], EngineCore], *, max_waiting: int | None = None,
                 on_dead: Callable[[BaseException], None] | None = None):
        """``factory`` builds the core on the engine thread. ``max_waiting``: most sequences that may wait
        for a place in the running batch (``max_num_seqs``) before submissions are refused with
        ``EngineOverloadedError`` (None = unbounded).
        ``on_dead(error)`` is called on the engine thread if loading or the loop fails."""
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"max_waiting={max_waiting} must be >= 1 (or None for no bound)")
        self._factory = factory
        self.max_waiting = max_waiting
        self.on_dead = on_dead
        self._cond = threading.Condition()
        self._inbox: list[tuple] = []  # ("add", stream, prompt, params) | ("abort", request_id)
        self._pending_adds = 0  # adds in the inbox, counted against max_waiting
        self._num_waiting = 0  # the scheduler's waiting sequences, as of the engine thread's last look
        self._free_slots = 0  # max_num_seqs - running sequences, likewise
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._stop = False
        self._deadline: float | None = None  # drain deadline (monotonic); past it, abort everything
        self._draining = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.core: EngineCore | None = None
        self.error: BaseException | None = None
        self.load_failed = False
        self.rejected: dict[str, int] = {"overloaded": 0, "loading": 0, "draining": 0, "dead": 0, "stopped": 0}

    @classmethod
    def from_core(cls, core: EngineCore, **kwargs) -> AsyncEngine:
        return cls(lambda: core, **kwargs)

    # ---- state -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine.start() was already called")
        self._thread = threading.Thread(target=self._run, name="bagualu-engine", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def state(self) -> str:
        """loading | ready | draining | dead | stopped"""
        if self.error is not None:
            return "dead"
        if self._thread is None or (not self._thread.is_alive() and self._ready.is_set()):
            return "stopped" if self._ready.is_set() else "loading"
        if not self._ready.is_set():
            return "loading"
        return "draining" if self._draining else "ready"

    @property
    def healthy(self) -> bool:
        """True while the loop runs and takes requests (not loading, draining, stopped or dead)."""
        return self.state == "ready" and self._thread is not None and self._thread.is_alive()

    async def wait_ready(self, timeout: float | None = None) -> None:
        ok = await asyncio.to_thread(self._ready.wait, timeout)
        if self.error is not None:
            raise EngineDeadError(f"the engine failed: {self.error!r}") from self.error
        if not ok:
            raise TimeoutError(f"the engine was not ready within {timeout} s")

    @property
    def metrics(self):
        """The core's ``EngineMetrics`` (written by the engine thread; read them as a snapshot), or None
        while loading."""
        return self.core.metrics if self.core is not None else None

    # ---- submission (any thread / event loop) ----------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        """Queue a request; returns once the engine accepted it (raises ``RequestError`` & co. for a bad
        request, ``EngineUnavailableError`` when it cannot take requests now)."""
        loop = asyncio.get_running_loop()
        s = _Stream(request_id, loop, loop.create_future())
        with self._cond:
            self._check_open()
            # sequences that would wait: queued ones beyond the free places in the running batch
            queued = self._pending_adds + self._num_waiting - self._free_slots
            if self.max_waiting is not None and queued + params.n > self.max_waiting:
                self.rejected["overloaded"] += 1
                raise EngineOverloadedError(f"the server is overloaded: {max(queued, 0)} sequences are waiting "
                                            f"for a place in the batch (max_waiting={self.max_waiting}); "
                                            f"retry later")
            self._inbox.append(("add", s, prompt, params))
            self._pending_adds += params.n
            self._cond.notify()
        stream = RequestStream(self, s)
        try:
            await s.accepted
        except asyncio.CancelledError:
            stream.close()
            raise
        return stream

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs until the request finishes; closing the generator early aborts it."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, idempotent): its KV blocks are freed before the next step."""
        with self._cond:
            self._inbox.append(("abort", request_id))
            self._cond.notify()

    def _check_open(self) -> None:
        state = self.state
        if state == "ready":
            return
        if state in self.rejected:
            self.rejected[state] += 1
        if state == "dead":
            raise EngineUnavailableError("dead", f"the engine loop died ({self.error!r}); restart the server")
        messages = {"loading": "the model is still loading; retry shortly",
                    "draining": "the server is shutting down and takes no new requests",
                    "stopped": "the engine has stopped"}
        raise EngineUnavailableError(state, messages[state])

    # ---- shutdown --------------------------------------------------------------------------------
    def begin_drain(self, timeout: float) -> None:
        """Refuse new requests from now on; abort whatever is still running ``timeout`` s from now
        (thread-safe and signal-safe: takes no lock that the caller may hold)."""
        self._draining = True
        deadline = time.monotonic() + timeout
        if self._deadline is None or deadline < self._deadline:
            self._deadline = deadline

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Drain in-flight requests for up to ``timeout`` s, abort the rest, stop the thread, close the core."""
        self.begin_drain(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None and self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    # ---- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            core = self._factory()
        except BaseException as e:
            log.exception("engine: loading failed")
            self.load_failed = True
            self._die(e)
            self._ready.set()
            return
        self.core = core
        with self._cond:
            self._count(core, after_step=True)
        self._ready.set()
        try:
            self._loop(core)
        except BaseException as e:
            log.exception("engine: the loop died; failing every in-flight request")
            self._die(e)
        finally:
            try:
                core.close()
            except Exception:
                log.exception("engine: closing the core failed")

    def _loop(self, core: EngineCore) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._stop or core.has_unfinished()):
                    self._cond.wait()
                items, self._inbox = self._inbox, []
                stop = self._stop
            for item in items:
                self._apply(core, item)
            if self._deadline is not None and time.monotonic() >= self._deadline and core.has_unfinished():
                self._abort_all(core, EngineShutdownError(
                    "the server shut down before this request finished (drain timeout); retry elsewhere"))
            if core.has_unfinished():
                outs = core.step()
                with self._cond:  # before the outputs go out: a consumer may act on them at once
                    self._count(core, after_step=True)
                self._dispatch(outs)
            elif stop:
                return

    def _count(self, core: EngineCore, after_step: bool = False) -> None:
        """Refresh the overload bound's inputs (under the lock). Places in the batch count as free only
        if the last step left nothing waiting: a step that kept requests waiting despite free places
        was held back by KV blocks or the admission policy, and those places are not really free."""
        waiting, running, max_seqs = core.queue_state()
        self._num_waiting = waiting
        if after_step:
            self._free_slots = 0 if waiting else max(max_seqs - running, 0)

    def _apply(self, core: EngineCore, item: tuple) -> None:
        if item[0] == "abort":
            core.abort(item[1])
            s = self._streams.pop(item[1], None)
            if s is not None:  # the consumer is gone; nothing more to deliver
                s.finished = True
            return
        _, s, prompt, params = item
        error = None
        try:
            core.add_request(s.request_id, prompt, params)
        except RequestError as e:  # the client's fault; the loop goes on
            error = e
        except Exception as e:  # still scoped to this request: never let one request kill the loop
            log.exception("engine: add_request(%r) failed", s.request_id)
            error = e
            core.abort(s.request_id)
        else:
            self._streams[s.request_id] = s
        with self._cond:  # it moved from the inbox into the scheduler's queue (or was refused)
            self._pending_adds -= params.n
            self._count(core)
        self._post(s, s._accept, error)

    def _dispatch(self, outs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            s = self._streams.get(out.request_id)
            if s is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop.setdefault(s.loop, []).append((s, out))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, pairs)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def _abort_all(self, core: EngineCore, error: BaseException) -> None:
        for rid, s in list(self._streams.items()):
            core.abort(rid)
            self._post(s, s._put, error)
        self._streams.clear()

    def _die(self, error: BaseException) -> None:
        with self._cond:  # under the lock, so no submission slips in after the inbox is emptied
            self.error = error
            items, self._inbox = self._inbox, []
            self._pending_adds = 0
        for s in list(self._streams.values()):
            self._post(s, s._put, EngineDeadError(f"the engine loop died: {error!r}"))
        self._streams.clear()
        for item in items:
            if item[0] == "add":
                s = item[1]
                self._post(s, s._accept, EngineUnavailableError("dead", f"the engine loop died: {error!r}"))
        if self.on_dead is not None:
            try:
                self.on_dead(error)
            except Exception:
                log.exception("engine: the on_dead callback failed")

    @staticmethod
    def _post(s: _Stream, fn, arg) -> None:
        try:
            s.loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            pass


def _deliver(pairs: list[tuple[_Stream, RequestOutput]]) -> None:
    for s, out in pairs:
        s._put(out)
