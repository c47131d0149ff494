"""SelfControl workbench: steer and study LLM behaviour with suffix gradients."""

from .control import Control
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
from .search import SelfControlConfig, SelfControlResult, self_control
from .suffix import SuffixGradients, score_responses, suffix_gradients, suffix_score
from .tasks import ContrastPair, Task, get_task, list_tasks

__all__ = [
    "EMBEDDED_ID",
    "ContrastPair",
    "Control",
    "Generation",
    "HookedChatModel",
    "IncompatibleArtifactError",
    "InputError",
    "ModelLoadError",
    "NumericalError",
    "SelfControlConfig",
    "SelfControlResult",
    "SuffixGradients",
    "Task",
    "WorkbenchError",
    "generate",
    "get_task",
    "list_tasks",
    "load_model",
    "score_responses",
    "self_control",
    "suffix_gradients",
    "suffix_score",
    "workbench_home",
]
