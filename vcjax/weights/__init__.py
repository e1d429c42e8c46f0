"""Reading PyTorch checkpoints (without torch) and mapping them onto vcjax modules."""

from vcjax.weights.errors import CheckpointError
