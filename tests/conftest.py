"""Test tiers by directory (unit / dist / gpu / e2e) and visible skips for the GPU tier."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/hf_models.py and other shared helpers

# PowerFusion's Triton code generator is tested on CPU tensors by Triton's interpreter, which must be
# switched on before triton is first imported (Triton decides then whether its own library is
# interpreted). A machine with a GPU runs the kernels for real.
if os.environ.get("TRITON_INTERPRET") is None and not Path("/dev/nvidiactl").exists():
    os.environ["TRITON_INTERPRET"] = "1"

TIERS = ("unit", "dist", "gpu", "e2e")


def _has_accelerator() -> tuple[bool, str]:
    from bagualu.platform import usable_platforms

    accel = [p.name for p in usable_platforms() if p.device_type != "cpu"]
    return (True, ", ".join(accel)) if accel else (False, "no accelerator platform is available on this machine")


def pytest_collection_modifyitems(config, items):
    gpu_skip = None
    for item in items:
        tier = Path(item.fspath).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        if tier == "gpu" or item.get_closest_marker("gpu"):
            if gpu_skip is None:
                ok, why = _has_accelerator()
                gpu_skip = None if ok else pytest.mark.skip(reason=f"gpu tier: {why}")
                gpu_skip = gpu_skip or False
            if gpu_skip:
                item.add_marker(gpu_skip)


@pytest.fixture(scope="module")
def powerfusion_env(tmp_path_factory):
    """The compiler suites' environment (``pytestmark = pytest.mark.usefixtures("powerfusion_env")``): one
    kernel cache for the session, the platform's table figures (no measuring: decisions do not depend on
    the machine's load), no autotuning, and Dynamo's caches reset."""
    import torch

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BAGUALU_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "pf-cache"))
        mp.setenv("BAGUALU_NO_MEASURE", "1")
        mp.delenv("BAGUALU_COMPILER_AUTOTUNE", raising=False)
        torch._dynamo.reset()
        yield


@pytest.fixture
def compile_streamed(monkeypatch):
    """``run(fn, args, stream) -> (output, kernel reports)``: ``fn`` compiled by PowerFusion under the mappings
    its model picks with only ``Mapping.stream`` forced, so two runs differ in nothing else (vector width,
    materialisation and so on decide summation order)."""
    import dataclasses

    import torch

    from bagualu.compiler import graph as G
    from bagualu.compiler import search

    def run(fn, args, stream: bool):
        choose = search.choose

        def forced(k, gen):
            c = choose(k, gen)
            return dataclasses.replace(c, mapping=dataclasses.replace(c.mapping, stream=stream))

        with monkeypatch.context() as mp:
            mp.setattr(search, "choose", forced)
            torch._dynamo.reset()
            start = G.SEQ[0]
            out = torch.compile(fn, backend="powerfusion")(*args)
        return out, [k for r in G.REPORTS if r.seq >= start for k in r.kernels]

    return run
