"""SelfControl workbench: steer and study LLM behaviour with suffix gradients."""

from .errors import (
    CorruptArtifactError,
    IncompatibleArtifactError,
    InputError,
    ModelLoadError,
    NumericalError,
    ResumeMismatchError,
    RunLockedError,
    WorkbenchError,
)
from .model.chat_model import HookedChatModel
from .model.generation import Generation, generate
from .model.loading import EMBEDDED_ID, load_model, workbench_home
from .selfcontrol.control import Control
from .selfcontrol.search import (
    SelfControlConfig,
    SelfControlResult,
    self_control,
    self_control_many,
)
from .selfcontrol.suffix import SuffixGradients, score_responses, suffix_gradients, suffix_score
from .selfcontrol.tasks import ContrastPair, Task, get_task, list_tasks

# Analyses, prefix controllers, preference learning and evaluation import matplotlib / scikit-learn;
# they load on first use so that `import workbench` stays light.
_LAZY = {
    "analyze_norms": "analysis.norms",
    "norm_heatmap": "analysis.norms",
    "gradient_directions": "analysis.directions",
    "trajectory_pca": "analysis.directions",
    "ReadingVector": "analysis.repe",
    "gradient_cosines": "analysis.repe",
    "layer_window_ablation": "analysis.ablation",
    "suffix_ablation": "analysis.ablation",
    "synthesize": "prefix.synthesis",
    "PrefixController": "prefix.controller",
    "train_prefix": "prefix.training",
    "export_peft": "prefix.export",
    "preference_data": "preference.data",
    "train_dpo": "preference.dpo",
    "evaluate": "evaluation.runner",
    "check_task": "evaluation.judge_check",
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
    "CorruptArtifactError",
    "Generation",
    "HookedChatModel",
    "IncompatibleArtifactError",
    "InputError",
    "ModelLoadError",
    "NumericalError",
    "ResumeMismatchError",
    "RunLockedError",
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
    "self_control_many",
    "suffix_gradients",
    "suffix_score",
    "workbench_home",
    *_LAZY,
]
