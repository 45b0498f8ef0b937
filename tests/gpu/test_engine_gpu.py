"""On an accelerator: the engine's S-part runs on the device, with the R-part on the device (in-process)
or in CPU R-workers that hold the KV cache (FastDecode's split); greedy tokens equal the CPU engine's."""

from __future__ import annotations

import pytest
import torch

import bagualu
from bagualu.models.byte_tokenizer import byte_level_tokenizer
from bagualu.models.flavours import flavour as make
from bagualu.platform import current_platform
import bagualu.models as bm

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("flavour", ["tiny-llama", "tiny-mixtral"])
def test_engine_on_the_device_equals_the_cpu_engine(tmp_path, flavour):
    cfg = make(flavour)
    bm.from_config(cfg, device="cpu", seed=0).save_pretrained(tmp_path)
    byte_level_tokenizer().save(tmp_path)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 20, 45)]
    sp = bagualu.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = bagualu.LLM(str(tmp_path), device="cpu").generate(prompts, sp, use_tqdm=False)
    for opts in ({}, {"r_workers": 2}):
        llm = bagualu.LLM(str(tmp_path), **opts)
        assert llm.engine.model.device.type == current_platform().device_type != "cpu"
        out = llm.generate(prompts, sp, use_tqdm=False)
        llm.close()
        assert [o.token_ids for o in out] == [o.token_ids for o in ref], opts
