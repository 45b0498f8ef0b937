"""The platform layer: selection, errors that name the fix, CPU description, the figures cache."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from bagualu import platform as P
from bagualu.platform import figures
from bagualu.platform.cpu import CpuPlatform
from bagualu.platform.cuda import CudaPlatform, table_figures_for

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    """Fresh registry, a private cache dir, and no inherited selection for every test."""
    monkeypatch.delenv("BAGUALU_PLATFORM", raising=False)
    monkeypatch.delenv("BAGUALU_NO_MEASURE", raising=False)
    monkeypatch.setenv("BAGUALU_CACHE_DIR", str(tmp_path / "cache"))
    P._reset_for_tests()
    yield
    P._reset_for_tests()


def test_nothing_probed_at_import():
    code = (
        "import bagualu.platform as p, bagualu.platform.registry as r; "
        "assert r._platforms is None and r._current is None; "
        "import sys; assert 'bagualu.platform.cuda' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_detect_is_cpu_here():
    assert P.current_platform() is CpuPlatform
    assert P.current_platform() is P.current_platform()  # cached


def test_env_var_selects(monkeypatch):
    monkeypatch.setenv("BAGUALU_PLATFORM", "CPU")
    assert P.current_platform().name == "cpu"


def test_env_var_read_after_reset(monkeypatch):
    assert P.current_platform() is CpuPlatform
    monkeypatch.setenv("BAGUALU_PLATFORM", "nope")
    assert P.current_platform() is CpuPlatform  # cached until reset
    P._reset_for_tests()
    with pytest.raises(ValueError):
        P.current_platform()


def test_unknown_name_lists_known_and_plugin_hint(monkeypatch):
    with pytest.raises(ValueError) as e:
        P.get_platform("tpu9000")
    msg = str(e.value)
    assert "'tpu9000'" in msg and "cpu" in msg and "cuda" in msg
    assert "bagualu.platforms" in msg and "pip install" in msg
    monkeypatch.setenv("BAGUALU_PLATFORM", "tpu9000")
    with pytest.raises(ValueError, match="known platforms: .*cpu"):
        P.current_platform()


def test_unavailable_platform_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BAGUALU_PLATFORM", "cuda")
    with pytest.raises(RuntimeError, match=r"BAGUALU_PLATFORM='cuda' is not available.*available here: cpu"):
        P.current_platform()


def test_available_platforms_has_builtins():
    plats = P.available_platforms()
    assert plats["cpu"] is CpuPlatform and plats["cuda"] is CudaPlatform
    assert all(issubclass(c, P.Platform) for c in plats.values())
    assert P.usable_platforms()[0] is CpuPlatform


def test_broken_plugin_is_a_warning(monkeypatch, caplog):
    class EP:
        name, value = "broken", "no_such_module_xyz:Chip"

        def load(self):
            raise ImportError("no module named no_such_module_xyz")

    from bagualu.platform import registry

    monkeypatch.setattr(registry, "entry_points", lambda group: [EP()])
    monkeypatch.setattr(logging.getLogger("bagualu"), "propagate", True)  # let caplog see it
    with caplog.at_level("WARNING", logger="bagualu"):
        plats = P.available_platforms()
    assert "broken" not in plats and "cpu" in plats
    assert "broken" in caplog.text and "no_such_module_xyz" in caplog.text


def test_cpu_basics():
    assert CpuPlatform.is_available() and CpuPlatform.device_count() == 1
    assert CpuPlatform.device() == torch.device("cpu") == CpuPlatform.current_device()
    with pytest.raises(ValueError, match="out of range"):
        CpuPlatform.device(1)
    free, total = CpuPlatform.memory_info()
    assert 0 < free <= total
    buf = CpuPlatform.empty_pinned((4, 3), torch.bfloat16)
    assert buf.shape == (4, 3) and buf.dtype == torch.bfloat16 and buf.device.type == "cpu"
    CpuPlatform.synchronize()
    assert CpuPlatform.supports_dtype(torch.bfloat16) and not CpuPlatform.supports_dtype(torch.int8)


def test_cpu_describe_measures_then_caches(tmp_path):
    d = CpuPlatform.describe()
    assert d["name"] == "cpu" and d["device_type"] == "cpu" and d["dist_backend"] == "gloo"
    assert d["device_count"] == 1 and len(d["device_names"]) == len(d["memory"]) == 1
    assert d["peak_memory_bandwidth"]["source"] == "measured"
    assert d["peak_memory_bandwidth"]["bytes_per_s"] > 1e8
    assert d["peak_flops"]["float32"]["flop_per_s"] > 1e8
    json.dumps(d)  # JSON-able

    cache = figures.cache_file(CpuPlatform)
    assert cache.parent == tmp_path / "cache" / "platform" and cache.name.startswith("cpu-")
    stored = json.loads(cache.read_text())
    assert stored["fingerprint"]["platform"] == "cpu"
    assert stored["fingerprint"]["torch"] == torch.__version__
    assert set(stored["figures"]) >= {"copy_bandwidth", "gemm_flops.float32"}

    # A new process (memo cleared) reads the file instead of measuring again.
    stored["figures"]["copy_bandwidth"]["value"] = 123e9
    cache.write_text(json.dumps(stored))
    P._reset_for_tests()
    assert figures.bandwidth(CpuPlatform).source == "cached"
    assert CpuPlatform.peak_memory_bandwidth() == 123e9


def test_fingerprint_change_misses_cache(monkeypatch):
    first = figures.cache_file(CpuPlatform)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(old + 1)
        assert figures.cache_file(CpuPlatform) != first
    finally:
        torch.set_num_threads(old)


def test_no_measure_uses_table(monkeypatch):
    monkeypatch.setenv("BAGUALU_NO_MEASURE", "1")
    fig = figures.bandwidth(CpuPlatform)
    assert fig.source.startswith("table") and "BAGUALU_NO_MEASURE" in fig.source
    assert fig.value == CpuPlatform._table_figures()[0] > 0
    assert CpuPlatform.peak_flops(torch.float32) > 0
    assert not figures.cache_file(CpuPlatform).exists()  # nothing measured, nothing written


def test_failed_measurement_falls_back(monkeypatch):
    def boom(plat):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(figures, "measure_copy_bandwidth", boom)
    fig = figures.bandwidth(CpuPlatform)
    assert fig.source == "table: measurement failed (RuntimeError)" and fig.value > 0


def test_unsupported_dtype_uses_table():
    fig = figures.flops(CpuPlatform, torch.int8)
    assert fig.source.startswith("table") and "unsupported" in fig.source and fig.value > 0


def test_cuda_importable_and_unavailable_here():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the CPU-only path is what is tested here")
    assert CudaPlatform.name == "cuda" and CudaPlatform.dist_backend == "nccl"
    assert CudaPlatform.priority > CpuPlatform.priority
    assert not CudaPlatform.is_available() and CudaPlatform.device_count() == 0
    assert not CudaPlatform.supports_pinned_memory()
    with pytest.raises(RuntimeError, match="not available"):
        CudaPlatform.describe()


def test_cuda_table():
    assert table_figures_for("NVIDIA H100 80GB HBM3")[0] == 3.35e12
    assert table_figures_for("NVIDIA H200")[0] == 4.8e12
    assert table_figures_for("NVIDIA A100-SXM4-80GB")[0] == 2.0e12
    bw, flops = table_figures_for("Some Future GPU")
    assert 0 < bw < 3e12 and flops["bfloat16"] > 0


def test_cuda_logic_with_a_faked_driver(monkeypatch):
    """Rank-to-GPU mapping, names, memory and table figures, with torch.cuda faked as 2 H100s."""
    cuda = torch.cuda
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 2)
    monkeypatch.setattr(cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(cuda, "mem_get_info", lambda d=None: (70 << 30, 80 << 30))
    monkeypatch.setattr(cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("BAGUALU_NO_MEASURE", "1")
    assert CudaPlatform.current_device() == torch.device("cuda", 1)
    assert CudaPlatform.supports_dtype(torch.bfloat16) and CudaPlatform.supports_dtype(torch.float8_e4m3fn)
    assert P.usable_platforms()[0] is CudaPlatform  # priority beats cpu
    d = CudaPlatform.describe()
    assert d["device_count"] == 2 and d["dist_backend"] == "nccl"
    assert d["memory"][1] == {"index": 1, "free_bytes": 70 << 30, "total_bytes": 80 << 30}
    assert d["peak_memory_bandwidth"]["bytes_per_s"] == 3.35e12
    assert d["peak_flops"]["bfloat16"]["flop_per_s"] == 989e12
    assert figures.cache_file(CudaPlatform) != figures.cache_file(CpuPlatform)


def test_figures_measured_on_real_tensors_inside_a_tracer(monkeypatch):
    """The compiler first asks for the figures while tracing on fake tensors; a copy there takes no time,
    and the absurd bandwidth would be cached for every later process. The benchmark runs on real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen = []
    real = figures.measure_copy_bandwidth

    def spy(plat):
        seen.append(type(torch.ones(1)))
        return real(plat)

    monkeypatch.setattr(figures, "measure_copy_bandwidth", spy)
    with FakeTensorMode():
        fig = figures.bandwidth(CpuPlatform)
    assert seen == [torch.Tensor] and fig.source == "measured"
    assert json.loads(figures.cache_file(CpuPlatform).read_text())["figures"]["copy_bandwidth"]["value"] == fig.value
