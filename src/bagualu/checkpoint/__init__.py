"""Training state: sharded (expert-parallel aware) checkpoints through torch.distributed.checkpoint,
asynchronous saves, atomic commits, verified resume with resharding."""

from bagualu.checkpoint.manager import CheckpointManager
from bagualu.checkpoint.state import TrainingState

__all__ = ["CheckpointManager", "TrainingState"]
