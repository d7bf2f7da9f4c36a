"""minipar: every model-parallelism strategy, from scratch, on torch.distributed.

Start with `launch` (ranks), `Mesh` (named axes), `comm` (traced communication),
`trace`/`timeline` (what happened), and `model` (the single-device reference).
Strategies live one per module: dp, zero, tp, pp, cp, moe; `train` composes them
and `plan` predicts them at cluster scale.
"""

from .mesh import Mesh, MeshError
from .runtime import RankError, device, launch

__all__ = ["launch", "RankError", "device", "Mesh", "MeshError"]
__version__ = "0.1.0"
