"""``bagualu --help | --version | info [--json]`` run as a user would: the installed console script."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bagualu.memory.huge_pages import thp_mode

pytestmark = pytest.mark.e2e

SCRIPT = Path(sys.executable).parent / "bagualu"


@pytest.fixture
def env(tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith("BAGUALU_")}
    e["BAGUALU_CACHE_DIR"] = str(tmp_path / "cache")
    return e


def bagualu(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} not found: install the package (pip install -e .) into this environment")
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120, check=check)


def test_help(env):
    out = bagualu("--help", env=env).stdout
    assert "usage: bagualu" in out and "info" in out
    assert bagualu(env=env).stdout.startswith("usage: bagualu")  # no command: help, exit 0


def test_serve_help_lists_every_engine_option(env):
    """``bagualu serve --help`` prints (EngineConfig's docs become its help; one with a '%' had broken it) and
    names every EngineConfig field as an option, booleans with their --no- form."""
    import dataclasses

    from bagualu.engine.config import EngineConfig

    out = bagualu("serve", "--help", env=env).stdout
    assert "usage: bagualu serve" in out and "--packed-weights, --no-packed-weights" in out
    for f in dataclasses.fields(EngineConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name


def test_version(env):
    from bagualu import __version__

    out = bagualu("--version", env=env).stdout
    assert out.startswith(f"bagualu {__version__}") and "torch" in out
    mod = subprocess.run([sys.executable, "-m", "bagualu.cli", "--version"], env=env,
                         capture_output=True, text=True, check=True)
    assert mod.stdout == out


def test_info_text_measures_then_caches(env):
    out = bagualu("info", env=env).stdout
    assert re.search(r"^platform\s+cpu\b", out, re.M), out
    assert "dist backend  gloo" in out and "torch" in out
    m = re.search(r"bandwidth\s+([\d.]+) GB/s\s+\((\w+)", out)
    assert m and float(m.group(1)) > 0 and m.group(2) == "measured", out
    assert re.search(r"GEMM float32\s+[\d.]+ GFLOP/s", out), out
    again = bagualu("info", env=env).stdout
    assert re.search(r"bandwidth\s+[\d.]+ GB/s\s+\(cached\)", again), again


def test_info_json(env):
    info = json.loads(bagualu("info", "--json", env=env).stdout)
    p = info["platform"]
    assert p["name"] == "cpu" and p["device_type"] == "cpu" and p["device_count"] == 1
    assert p["peak_memory_bandwidth"]["bytes_per_s"] > 0
    assert p["peak_flops"]["float32"]["flop_per_s"] > 0
    names = {q["name"]: q for q in info["platforms"]}
    assert names["cpu"]["selected"] and names["cpu"]["origin"] == "built-in"
    assert "cuda" in names
    assert info["versions"]["torch"] and info["versions"]["bagualu"]


def test_info_unavailable_platform_fails_clearly(env):
    env["BAGUALU_PLATFORM"] = "no-such-chip"
    r = bagualu("info", env=env, check=False)
    assert r.returncode == 1 and "unknown platform 'no-such-chip'" in r.stderr and "cpu" in r.stderr


def test_the_command_shortens_openmp_spinning_unless_told_otherwise(env):
    """The ``bagualu`` command sets ``GOMP_SPINCOUNT=10000`` before any command loads torch (utils/openmp.py:
    torch's idle OpenMP workers would spin on the core our kernels' helper threads need); an explicit spin
    count or wait policy stays as given."""
    for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        env.pop(k, None)
    assert json.loads(bagualu("info", "--json", env=env).stdout)["openmp"]["GOMP_SPINCOUNT"] == "10000"
    assert "openmp        GOMP_SPINCOUNT=10000" in bagualu("info", env=env).stdout
    omp = json.loads(bagualu("info", "--json", env={**env, "GOMP_SPINCOUNT": "77"}).stdout)["openmp"]
    assert omp["GOMP_SPINCOUNT"] == "77"
    omp = json.loads(bagualu("info", "--json", env={**env, "OMP_WAIT_POLICY": "active"}).stdout)["openmp"]
    assert omp["GOMP_SPINCOUNT"] is None and omp["OMP_WAIT_POLICY"] == "active"


def test_info_reports_the_transparent_huge_page_mode(env):
    """The kernel's THP mode decides whether the serving engine's weights get huge pages (memory/huge_pages.py)."""
    assert json.loads(bagualu("info", "--json", env=env).stdout)["transparent_huge_pages"] == thp_mode()
    assert f"huge pages    transparent: {thp_mode()}" in bagualu("info", env=env).stdout
