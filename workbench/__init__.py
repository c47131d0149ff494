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

# Analyses, prefix controllers and evaluation import matplotlib / scikit-learn;
# they load on first use so that `import workbench` stays light.
_LAZY = {
    "analyze_norms": "norms",
    "norm_heatmap": "norms",
    "gradient_directions": "directions",
    "trajectory_pca": "directions",
    "ReadingVector": "repe",
    "gradient_cosines": "repe",
    "layer_window_ablation": "ablation",
    "suffix_ablation": "ablation",
    "synthesize": "synthesis",
    "PrefixController": "prefix",
    "train_prefix": "prefix",
    "evaluate": "evaluation",
    "check_task": "judge_check",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


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
    *_LAZY,
]
