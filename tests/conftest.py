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
