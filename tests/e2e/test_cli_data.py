"""``bagualu data prepare`` as a user runs it: the default stdlib corpus, and a given tokenizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bagualu.models import load_tokenizer
from bagualu.storage import TokenDataset

pytestmark = pytest.mark.e2e
BAGUALU = str(Path(sys.executable).parent / "bagualu")


def run(*args, check=True):
    p = subprocess.run([BAGUALU, *args], capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_prepare_default_corpus_and_reuse_its_tokenizer(tmp_path):
    p = run("data", "prepare", "--out", str(tmp_path / "a"), "--max-mb", "1", "--vocab-size", "1024")
    assert "prepared" in p.stdout and "vocab 1024" in p.stdout
    ds = TokenDataset(str(tmp_path / "a"), verify=True)
    tok = load_tokenizer(tmp_path / "a")
    assert len(ds) > 100_000 and tok.vocab_size == 1024
    eos = tok.eos_token_id
    first = ds.window(0, min(len(ds), 200_000)).tolist()
    doc = first[: first.index(eos)]
    assert len(doc) > 10 and tok.decode(doc).strip()  # decodes back to Python source text
    # a second corpus with the first one's tokenizer: same vocabulary, same encoding
    src = tmp_path / "mine.txt"
    src.write_text("def furnace(trigrams):\n    return sum(trigrams)  # eight\n" * 20)
    run("data", "prepare", str(src), "--out", str(tmp_path / "b"), "--tokenizer", str(tmp_path / "a"))
    b = TokenDataset(str(tmp_path / "b"))
    assert b.vocab_size == 1024
    assert b.window(0, len(b)).tolist() == tok.encode(src.read_text(), add_special_tokens=False) + [eos]


def test_prepare_errors_are_clear(tmp_path):
    p = run("data", "prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 2 and "input file(s) not found" in p.stderr and "Traceback" not in p.stderr
    p = run("data", "prepare", "--out", str(tmp_path / "o"), "--vocab-size", "100", check=False)
    assert p.returncode == 2 and "--vocab-size=100 is too small" in p.stderr
