"""``GOMP_SPINCOUNT`` for processes where our kernels' helper threads share the cores with torch's OpenMP team
(``bagualu.utils.openmp``): set by the training worker's entry point as by the ``bagualu`` command (whose
test is in ``tests/e2e/test_cli_info.py``), never over a user's choice."""

from __future__ import annotations

import os

import pytest

from bagualu.utils.openmp import SPIN_COUNT, tune_openmp_spin


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.setenv(k, "x")  # remembered as the state to restore, then removed
        monkeypatch.delenv(k)
    return monkeypatch


def test_set_unless_chosen(clean_env):
    assert tune_openmp_spin() and os.environ["GOMP_SPINCOUNT"] == SPIN_COUNT
    clean_env.setenv("GOMP_SPINCOUNT", "5")
    assert not tune_openmp_spin() and os.environ["GOMP_SPINCOUNT"] == "5"
    clean_env.delenv("GOMP_SPINCOUNT")
    clean_env.setenv("OMP_WAIT_POLICY", "passive")
    assert not tune_openmp_spin() and "GOMP_SPINCOUNT" not in os.environ


def test_training_worker_entry_sets_it_first(clean_env):
    """A rank started by torchrun or Slurm runs ``bagualu.train.entry`` without the ``bagualu`` command."""
    from bagualu.train import entry

    with pytest.raises(SystemExit):  # a bad flag: argparse exits after the entry point's first step
        entry.main(["--no-such-flag"])
    assert os.environ["GOMP_SPINCOUNT"] == SPIN_COUNT
