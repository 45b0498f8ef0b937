"""FastDecode: the inference engine — paged KV cache, continuous batching, CPU R-workers.

    import bagualu
    llm = bagualu.LLM("path/to/hf_dir")                       # options: bagualu.engine.EngineConfig
    outs = llm.generate(["Hello"], bagualu.SamplingParams(max_tokens=32))

``EngineCore`` is the step-at-a-time core under ``LLM`` and the HTTP server.
"""

from bagualu.engine.config import EngineConfig
from bagualu.engine.core import EngineCore, RequestError
from bagualu.engine.llm import LLM
from bagualu.engine.outputs import CompletionOutput, RequestOutput
from bagualu.engine.params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "EngineCore", "RequestError", "RequestOutput",
           "CompletionOutput"]
