"""edgerepvgg: RepVGG from a training checkpoint to INT8 engines on edge targets.

Data flows one way: checkpoint -> PlainNet (fuse) -> QuantSpec -> target artifact -> report.
"""

from edgerepvgg.checkpoints import ModelMeta, load_checkpoint, save_checkpoint
from edgerepvgg.inputs import InputSpec
from edgerepvgg.errors import UserError
from edgerepvgg._fuse import fuse, reparameterize
from edgerepvgg.models import create_model, list_models
from edgerepvgg.plain import PlainNet

__version__ = "0.1.0"
__all__ = [
    "InputSpec", "ModelMeta", "PlainNet", "UserError", "create_model", "fuse", "list_models",
    "load_checkpoint", "reparameterize", "save_checkpoint",
]  # fmt: skip
