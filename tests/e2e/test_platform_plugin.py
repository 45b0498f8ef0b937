"""An out-of-tree chip, installed as a real package, is discovered, selected and used end to end.

``tests/plugins/bagualu_testchip`` is pip-installed into a temporary ``--target`` directory; each check
runs in a fresh interpreter with that directory on ``PYTHONPATH``, as a vendor's package would be seen.
The test chip is the CPU under another name whose ``rms_norm`` kernel leaves a trace, so the model run
under it must give the very logits of the plain CPU run while proving that its kernel was called.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e

PLUGIN_SRC = Path(__file__).resolve().parents[1] / "plugins" / "bagualu_testchip"
SCRIPT = Path(sys.executable).parent / "bagualu"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The plug-in installed with pip into a private directory (the source tree stays clean)."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = shutil.copytree(PLUGIN_SRC, tmp / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    assert (target / "bagualu_testchip" / "kernels.py").exists()
    return target


def _env(site: Path, tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAGUALU_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["BAGUALU_CACHE_DIR"] = str(tmp_path / "cache")
    env["BAGUALU_NO_MEASURE"] = "1"  # figures are not what is tested here
    env.update(extra)
    return env


def _python(code: str, env: dict, *args: str) -> str:
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"subprocess failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


PLATFORMS = """
import json
from bagualu.platform import available_platforms, current_platform
plats = available_platforms()
print(json.dumps({"names": sorted(plats), "current": current_platform().name,
                  "kernels": current_platform().kernel_backends,
                  "module": plats["testchip"].__module__ if "testchip" in plats else None}))
"""


def test_discovered_but_not_auto_selected(site, tmp_path):
    out = json.loads(_python(PLATFORMS, _env(site, tmp_path)))
    assert {"cpu", "cuda", "testchip"} <= set(out["names"])
    assert out["module"] == "bagualu_testchip.platform"
    assert out["current"] == "cpu"  # priority -10 < cpu's 0


def test_selected_by_env_var(site, tmp_path):
    env = _env(site, tmp_path, BAGUALU_PLATFORM="testchip")
    out = json.loads(_python(PLATFORMS, env))
    assert out["current"] == "testchip"
    assert out["kernels"] == {"rms_norm": "bagualu_testchip.kernels:rms_norm"}

    r = subprocess.run([str(SCRIPT), "info", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["platform"]["name"] == "testchip" and info["selected_by"] == "BAGUALU_PLATFORM=testchip"
    plug = {q["name"]: q for q in info["platforms"]}["testchip"]
    assert plug["origin"] == "plug-in" and plug["selected"] and plug["priority"] == -10
    text = subprocess.run([str(SCRIPT), "info"], env=env, capture_output=True, text=True, check=True).stdout
    assert "platform        testchip" in text and "rms_norm -> bagualu_testchip.kernels:rms_norm" in text


FORWARD = """
import sys, torch
from bagualu.models import from_pretrained
from bagualu.platform import current_platform
model_dir, out_path, expect = sys.argv[1:4]
assert current_platform().name == expect, current_platform().name
model = from_pretrained(model_dir, dtype=torch.float32)
ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = model(ids)
logits = getattr(out, "logits", out)
torch.save(logits, out_path)
"""


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_used_end_to_end(site, tmp_path, tiny_llama):
    chip_trace, cpu_trace = tmp_path / "testchip.trace", tmp_path / "cpu.trace"
    env = _env(site, tmp_path, BAGUALU_PLATFORM="testchip", BAGUALU_TESTCHIP_TRACE=str(chip_trace))
    _python(FORWARD, env, str(tiny_llama), str(tmp_path / "chip.pt"), "testchip")
    env = _env(site, tmp_path, BAGUALU_TESTCHIP_TRACE=str(cpu_trace))
    _python(FORWARD, env, str(tiny_llama), str(tmp_path / "cpu.pt"), "cpu")

    chip, cpu = torch.load(tmp_path / "chip.pt"), torch.load(tmp_path / "cpu.pt")
    assert chip.shape == (2, 7, 128) and chip.dtype == torch.float32
    # 2 layers x (attention norm + MLP norm) + the final norm, at least once each.
    calls = chip_trace.read_text().splitlines() if chip_trace.exists() else []
    assert len(calls) >= 5 and all(c.startswith("rms_norm") for c in calls), calls
    assert not cpu_trace.exists(), "the plug-in kernel ran although the cpu platform was selected"
    torch.testing.assert_close(chip, cpu)
