"""On an accelerator: the model runs on the platform device and matches the CPU run."""

from __future__ import annotations

import pytest
import torch

import bagualu.models as bm
from bagualu.models.flavours import FLAVOURS
from bagualu.models.flavours import flavour as make
from bagualu.platform import current_platform

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_platform_device_matches_cpu(tmp_path, flavour):
    cfg = make(flavour)
    cpu = bm.from_config(cfg, device="cpu", seed=0)
    cpu.save_pretrained(tmp_path)
    dev_model = bm.from_pretrained(tmp_path)  # the platform's device
    plat = current_platform()
    assert dev_model.device.type == plat.device_type != "cpu"
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    with torch.no_grad():
        ref = cpu(ids)
        got = dev_model(ids.to(dev_model.device)).cpu()
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4
