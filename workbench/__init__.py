"""SelfControl workbench: steer and study LLM behaviour with suffix gradients."""

import lazy_loader

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
# they load on first use (lazy_loader) so that `import workbench` stays light.
__getattr__, _, _lazy_names = lazy_loader.attach(__name__, submod_attrs={
    "analysis.norms": ["analyze_norms", "norm_heatmap"],
    "analysis.directions": ["gradient_directions", "trajectory_pca"],
    "analysis.repe": ["ReadingVector", "gradient_cosines"],
    "analysis.ablation": ["layer_window_ablation", "suffix_ablation"],
    "prefix.synthesis": ["synthesize"],
    "prefix.controller": ["PrefixController"],
    "prefix.training": ["train_prefix"],
    "prefix.export": ["export_peft"],
    "preference.data": ["preference_data"],
    "preference.dpo": ["train_dpo"],
    "evaluation.runner": ["evaluate"],
    "evaluation.judge_check": ["check_task"],
})


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
    *_lazy_names,
]


def __dir__() -> list[str]:
    """Tab completion in notebooks lists the lazily loaded names too."""
    return list(__all__)
