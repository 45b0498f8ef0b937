"""Job launching on existing engines: PyTorch's elastic launcher (torchrun) locally, Slurm's environment.
Entry points are started by dotted module name; nothing here imports train/ or serve/."""

from bagualu.launch.local import launch_local, under_launcher
from bagualu.launch.slurm import adopt_slurm_env

__all__ = ["launch_local", "under_launcher", "adopt_slurm_env"]
