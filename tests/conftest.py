"""Session-scoped models: two tiny random Llamas (GQA and full attention) for
unit tests, and the embedded SmolLM2-135M for integration tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import workbench as wb  # noqa: E402


@pytest.fixture(scope="session")
def tiny() -> wb.HookedChatModel:
    torch.set_num_threads(2)
    return wb.load_model("tiny-random", progress=False)


@pytest.fixture(scope="session")
def tiny_mha() -> wb.HookedChatModel:
    return wb.load_model("tiny-random-mha", progress=False)


@pytest.fixture(scope="session", params=["tiny-random", "tiny-random-mha"])
def tiny_any(request, tiny, tiny_mha) -> wb.HookedChatModel:
    return tiny if request.param == "tiny-random" else tiny_mha


@pytest.fixture(scope="session")
def embedded() -> wb.HookedChatModel:
    return wb.load_model(progress=False)


@pytest.fixture(scope="session")
def family_folder(tmp_path_factory):
    """``family_folder(name)``: a tiny random model of that family saved as a Hugging Face folder, built once per session."""
    from workbench.model.families import save_random_model

    folders = {}

    def build(name: str):
        if name not in folders:
            folders[name] = save_random_model(name, tmp_path_factory.mktemp(f"family-{name}"))
        return folders[name]

    return build


@pytest.fixture(scope="session")
def family_model(family_folder):
    """``family_model(name, dtype=None)``: ``load_model`` of that family's folder, loaded once per session and dtype."""
    loaded = {}

    def get(name: str, dtype: torch.dtype | None = None) -> wb.HookedChatModel:
        if (name, dtype) not in loaded:
            loaded[name, dtype] = wb.load_model(str(family_folder(name)), dtype=dtype, progress=False)
        return loaded[name, dtype]

    return get
