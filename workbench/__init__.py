"""SelfControl workbench: steer and study LLM behaviour with suffix gradients."""

from .errors import (
    IncompatibleArtifactError,
    InputError,
    ModelLoadError,
    NumericalError,
    WorkbenchError,
)
from .generation import Generation, generate
from .loading import EMBEDDED_ID, load_model, workbench_home
from .model import HookedChatModel

__all__ = [
    "EMBEDDED_ID",
    "Generation",
    "HookedChatModel",
    "IncompatibleArtifactError",
    "InputError",
    "ModelLoadError",
    "NumericalError",
    "WorkbenchError",
    "generate",
    "load_model",
    "workbench_home",
]
