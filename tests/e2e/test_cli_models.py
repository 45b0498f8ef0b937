"""``bagualu init-model`` and ``bagualu generate`` as a user runs them, checked against ``transformers``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_models import transformers

import bagualu.models as bm
from bagualu.models.flavours import FLAVOURS
from bagualu.models.generate import generate

pytestmark = pytest.mark.e2e
BAGUALU = str(Path(sys.executable).parent / "bagualu")


def run(*args, check=True):
    p = subprocess.run([BAGUALU, *args], capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"bagualu {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_init_model_then_transformers_loads_it(tmp_path, flavour):
    out = run("init-model", flavour, str(tmp_path), "--seed", "3")
    assert "wrote" in out.stdout and flavour in out.stdout
    ours = bm.from_pretrained(tmp_path, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([bm.load_tokenizer(tmp_path).encode("The furnace of eight trigrams")])
    assert ids[0].tolist() == tok("The furnace of eight trigrams")["input_ids"]
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_reference_greedy_generation_equals_transformers(tmp_path):
    run("init-model", "tiny-qwen2-moe", str(tmp_path))
    ours = bm.from_pretrained(tmp_path, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = bm.load_tokenizer(tmp_path).encode("Hello")
    new = generate(ours, prompt, max_new_tokens=20)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert new == ref


def test_generate_cli_prints_text_and_rate(tmp_path):
    run("init-model", "tiny-llama", str(tmp_path))
    p = run("generate", str(tmp_path), "--prompt", "Hello", "--prompt", "八卦", "--max-tokens", "8")
    assert p.stdout.count("--- prompt:") == 2 and "tokens/s" in p.stdout
    p = run("generate", str(tmp_path), "--prompt", "Hi", "--chat", "--max-tokens", "4", "--temperature", "0.8")
    assert "tokens/s" in p.stdout


def test_generate_cli_engine_equals_the_reference_decoder(tmp_path):
    run("init-model", "tiny-llama", str(tmp_path))
    args = ("generate", str(tmp_path), "--prompt", "def main(", "--prompt", "import os", "--max-tokens", "12")
    engine = run(*args).stdout
    ref = run(*args, "--reference").stdout
    workers = run(*args, "--r-workers", "1").stdout
    spec = run(*args, "--speculative-tokens", "4").stdout
    text = lambda out: [ln for ln in out.splitlines() if not ln.startswith("---")]  # noqa: E731
    assert text(engine) == text(ref) == text(workers) == text(spec)
    assert "engine, in_process" in engine and "engine, r_workers" in workers and "reference decoder" in ref


def test_generate_cli_structured_outputs(tmp_path):
    """--json-schema FILE and --regex constrain what the engine writes; a grammar that does not compile is a
    clear error, not a traceback."""
    import json

    run("init-model", "tiny-llama", str(tmp_path / "m"))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    p = run("generate", str(tmp_path / "m"), "--prompt", "a", "--prompt", "b", "--max-tokens", "20",
            "--json-schema", str(tmp_path / "schema.json"))
    outs = [ln for ln in p.stdout.splitlines() if not ln.startswith("---")]
    assert len(outs) == 2 and all(isinstance(json.loads(o)["ok"], bool) for o in outs)
    p = run("generate", str(tmp_path / "m"), "--prompt", "a", "--max-tokens", "10", "--regex", "(yes|no)!",
            "--temperature", "1", "--seed", "3")
    assert [ln for ln in p.stdout.splitlines() if not ln.startswith("---")][0] in ("yes!", "no!")
    p = run("generate", str(tmp_path / "m"), "--prompt", "a", "--regex", "(", check=False)
    assert p.returncode == 2 and "cannot compile" in p.stderr and "Traceback" not in p.stderr


def test_generate_cli_bad_model_dir_is_a_clear_error(tmp_path):
    p = run("generate", str(tmp_path / "missing"), "--prompt", "x", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr and str(tmp_path / "missing") in p.stderr
    assert "Traceback" not in p.stderr
