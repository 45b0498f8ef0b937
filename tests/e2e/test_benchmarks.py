"""The benchmark scripts run end to end at toy sizes (they are scripts, so only a run proves they work).

No timing is asserted — only that each prints its table and headline and writes its --json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import llama_cpp_peer  # noqa: E402


def test_moe_layer_benchmark_smoke(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(BENCH / "moe_layer.py"), "--tokens", "64", "--reps", "1", "--shapes",
                        "E64", "--dtypes", "float32", "--impls", "eager,grouped_mm", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "headline: bagualu MoE layer vs best transformers experts implementation" in p.stdout
    res = json.loads(out.read_text())
    assert res["geomean_ratio"] > 0 and {r["impl"] for r in res["rows"]} >= {"bagualu", "hf grouped_mm"}


def test_moe_ep_benchmark_smoke(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(BENCH / "moe_ep.py"), "--tokens", "64", "--reps", "1", "--dim", "64",
                        "--ffn", "128", "--dtypes", "float32", "--no-deepspeed", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "headline float32: bagualu EP=2" in p.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"bagualu (all_to_all)", "bagualu (pipelined)"}
    assert all(r["tokens_per_s"] > 0 for r in rows if r["impl"].startswith("bagualu"))


def test_decode_attention_benchmark_smoke(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(BENCH / "decode_attention.py"), "--cases", "3x40,1x300", "--reps", "1",
                        "--min-mib", "1", "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "headline: bagualu paged decode attention vs" in p.stdout
    res = json.loads(out.read_text())
    assert {r["impl"] for r in res["rows"]} == {"bagualu paged", "gather+SDPA", "SDPA contiguous"}
    assert len(res["rows"]) == 3 * 2 * 2 and all(r["KV GB/s"] > 0 for r in res["rows"])
    assert res["machine"]["copy_GBps_this_run"] > 0 and res["geomean_ratio"] > 0


def test_prefill_attention_benchmark_smoke(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(BENCH / "prefill_attention.py"), "--cases", "2x40,1x70+20", "--reps", "1",
                        "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0 and "C++ kernel is unavailable" in p.stdout + p.stderr:
        pytest.skip("no compiler here: the benchmark has nothing to measure")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "headline: bagualu paged prefill attention vs" in p.stdout
    res = json.loads(out.read_text())
    impls = {r["impl"] for r in res["rows"]}
    assert impls - {"bagualu rows"} == {"bagualu paged", "SDPA contiguous", "gather+SDPA"}  # rows: with a compiler
    assert all(r["GFLOP/s"] > 0 for r in res["rows"]) and res["geomean_vs_sdpa"] > 0
    assert {(r["ctx"], r["queries"]) for r in res["rows"]} == {(40, 40), (70, 20)}


def test_serve_benchmark_smoke(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "r.json"
    # (vLLM's peer has its own environment and test: tests/e2e/test_vllm_peer.py, where it exists)
    p = subprocess.run([sys.executable, str(BENCH / "serve.py"), "--tiny", "--no-hf-continuous", "--no-vllm", "--json",
                        str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "headline: bagualu / transformers static batch" in p.stdout
    res = json.loads(out.read_text())
    engines = {r["engine"] for r in res["offline"]}
    expected = {"bagualu in-process", "bagualu r-workers=1", "transformers static batch"}
    assert engines == expected | ({"llama.cpp"} if llama_cpp_peer.available() else set())
    assert all(r["tokens"] == 4 * 8 for r in res["offline"])
    assert all(0 < r["fraction_of_bound"] for r in res["batch1"])


def test_serve_benchmark_online_smoke(tmp_path):
    """--online: bagualu serve in a subprocess per engine mode, a Poisson load over HTTP, TTFT/TPOT."""
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(BENCH / "serve.py"), "--tiny", "--online", "--rates", "4", "--no-vllm",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads(out.read_text())["online"]
    assert {r["engine"] for r in rows} == {"in-process", "r-workers=1"}
    for r in rows:
        assert r["rate"] == 4 and r["requests"] == 4 and r["tokens_per_s"] > 0
        assert 0 < r["ttft_p50"] <= r["ttft_p99"] and 0 < r["tpot_p50"] <= r["tpot_p99"]


def test_compiler_fusion_benchmark_smoke(tmp_path):
    import os

    out = tmp_path / "r.json"
    env = dict(os.environ, BAGUALU_CACHE_DIR=str(tmp_path / "cache"), BAGUALU_NO_MEASURE="1")
    p = subprocess.run([sys.executable, str(BENCH / "compiler_fusion.py"), "--scale", "0.01", "--reps", "1",
                        "--cases", "rmsnorm,router", "--dtypes", "float32", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "headline: powerfusion vs inductor geomean" in p.stdout and "allocator:" in p.stdout
    res = json.loads(out.read_text())
    assert {r["impl"] for r in res["rows"]} >= {"powerfusion", "inductor", "eager", "copy_"}
    assert res["geomean_vs_inductor"] > 0
    assert all(r["GBps"] > 0 for r in res["rows"])


def test_linear_benchmark_smoke(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(BENCH / "linear.py"), "--rows", "1", "5", "--shapes", "qkv", "--reps", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "headline: bagualu linear vs torch F.linear" in p.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"torch", "ours", "ours bf16 weights", "bf16 widened + torch"} and len(rows) == 8


def test_grouped_gemm_benchmark_smoke(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(BENCH / "grouped_gemm.py"), "--shapes", "E64", "--rows", "8", "--reps", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "headline: grouped GEMM vs torch.mm per expert" in p.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"ours", "torch.mm"} and len(rows) == 12 and all(r["GFLOPs"] > 0 for r in rows)


def test_compiler_cost_model_benchmark_smoke(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(BENCH / "compiler_cost_model.py"), "--scale", "0.02", "--reps", "1",
                        "--cases", "rmsnorm,router", "--dtypes", "float32", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "headline: cost model regret geomean" in p.stdout
    res = json.loads(out.read_text())
    assert {r["case"] for r in res["rows"]} == {"rmsnorm", "router"}
    assert all(r["regret"] >= 1.0 and r["candidates"] >= 1 for r in res["rows"]) and res["geomean_regret"] >= 1.0
