"""FastMoE core: routers (gates), stacked experts, sort-based local dispatch, the ``MoE`` block."""

from bagualu.moe.experts import Experts
from bagualu.moe.layer import MoE
from bagualu.moe.mlp import MLP
from bagualu.moe.router import ROUTERS, Router, RouterOutput
from bagualu.moe.upcycle import moefy

__all__ = ["moefy", "MoE", "MLP", "Experts", "Router", "RouterOutput", "ROUTERS"]
