"""Exported prefix controllers generate, in plain transformers + peft, what the workbench generates."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench.errors import InputError
from workbench.model.loading import load_hf_model
from workbench.prefix.controller import PrefixController
from workbench.prefix.export import export_peft, prefix_key_values

PEFT_SIDE = Path(__file__).with_name("peft_side.py")
TEXTS = ["hi", "Someone just insulted your work in front of everyone. How do you respond?"]


def _controller(model, residual_layers=(), scale=1.0, seed=0):
    """Trained-looking: the default init moved by random noise (and random residual vectors)."""
    c = PrefixController.init(model, 3, residual_layers=residual_layers)
    g = torch.Generator().manual_seed(seed)
    c.embeddings = c.embeddings + scale * c.embeddings.norm(dim=-1, keepdim=True) * torch.randn(c.embeddings.shape, generator=g) / c.d_model**0.5
    c.residuals = {k: 2.0 * torch.randn(v.shape, generator=g) for k, v in c.residuals.items()}
    return c


def _workbench_tokens(model, controller, prompts, max_new_tokens):
    with controller.applied(model):
        return model.generate(prompts, max_new_tokens=max_new_tokens).tokens


def _peft_tokens(base: Path, runs: list[dict], tmp_path: Path) -> list[list[list[int]]]:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"base": str(base), "runs": runs}))
    out = subprocess.run([sys.executable, str(PEFT_SIDE), str(job)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """tiny-random's weights exist only in memory: write them where plain transformers can read them."""
    folder = tmp_path_factory.mktemp("tiny-base")
    plain = load_hf_model("tiny-random", progress=False)
    plain.model.save_pretrained(folder)
    plain.tokenizer.save_pretrained(folder)
    return folder


def test_prefix_and_prompt_tuning_adapters_match_the_workbench_on_the_tiny_model(tiny, tiny_base, tmp_path):
    n = 12
    prompts = [tiny.chat_ids(t) for t in TEXTS]  # the first is shorter: left-padded in the batch
    with_residuals = _controller(tiny, residual_layers=(0, 2))
    embeddings_only = _controller(tiny, seed=1)
    export_peft(with_residuals, tiny, tmp_path / "prefix", method="prefix-tuning")
    export_peft(embeddings_only, tiny, tmp_path / "prompt", method="prompt-tuning")
    config = json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 3
    assert json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"

    runs = [{"adapter": str(tmp_path / name), "prompts": p, "max_new_tokens": n}
            for name in ("prefix", "prompt") for p in (prompts[:1], prompts)]
    prefix_single, prefix_batch, prompt_single, prompt_batch = _peft_tokens(tiny_base, runs, tmp_path)

    ours = _workbench_tokens(tiny, with_residuals, prompts, n)
    assert prefix_single == _workbench_tokens(tiny, with_residuals, prompts[:1], n) == ours[:1]
    assert prefix_batch == ours  # left-padded row included
    assert ours != tiny.generate(prompts, max_new_tokens=n).tokens  # the prefix matters

    ours = _workbench_tokens(tiny, embeddings_only, prompts, n)
    assert prompt_single == ours[:1]
    assert prompt_batch[1] == ours[1]  # the unpadded row
    # PEFT's prompt tuning drops position ids under generate: the padded row's text is placed after the
    # padding's positions, not right after the prefix as in the workbench (the module docstring says why)
    assert prompt_batch[0] != ours[0]


@pytest.mark.embedded
def test_prefix_tuning_adapter_matches_the_workbench_on_the_embedded_model(embedded, tmp_path):
    n = 16
    prompts = [embedded.chat_ids(t) for t in TEXTS]
    controller = _controller(embedded, scale=0.5)
    export_peft(controller, embedded, tmp_path / "prefix")
    export_peft(controller, embedded, tmp_path / "prompt", method="prompt-tuning")
    runs = [{"adapter": str(tmp_path / "prefix"), "prompts": prompts[:1], "max_new_tokens": n},
            {"adapter": str(tmp_path / "prefix"), "prompts": prompts, "max_new_tokens": n},
            {"adapter": str(tmp_path / "prompt"), "prompts": prompts[:1], "max_new_tokens": n}]
    single, batch, prompt_single = _peft_tokens(Path(embedded.source), runs, tmp_path)
    ours = _workbench_tokens(embedded, controller, prompts, n)
    assert ours != embedded.generate(prompts, max_new_tokens=n).tokens  # the prefix matters
    assert single == ours[:1] == _workbench_tokens(embedded, controller, prompts[:1], n)
    assert batch == ours
    assert prompt_single == ours[:1]


def test_prefix_key_values_are_the_workbench_cache(tiny):
    """The table's rows, read back in PEFT's layout, are the keys and values the workbench caches for the prefix."""
    from transformers import DynamicCache

    c = _controller(tiny, residual_layers=(1,))
    table = prefix_key_values(c, tiny)
    kv_dim = tiny.config.num_key_value_heads * (tiny.d_model // tiny.config.num_attention_heads)
    assert table.shape == (3, tiny.n_layers * 2 * kv_dim)
    cache = DynamicCache()
    with torch.no_grad(), c.applied(tiny):
        ids, _, layout = tiny.rows_layout(tiny.as_tensor(tiny.chat_ids("hello")))  # the prefix's slots first
        with tiny.declared(layout):
            tiny.bridge(ids, past_key_values=cache)
    layer = 2
    keys = table.view(3, tiny.n_layers * 2, -1)[:, 2 * layer].view(3, tiny.config.num_key_value_heads, -1)
    torch.testing.assert_close(keys.transpose(0, 1), cache.layers[layer].keys[0, :, :3])


def test_prompt_tuning_refuses_a_controller_with_residual_vectors(tiny, tmp_path):
    c = _controller(tiny, residual_layers=(0,))
    with pytest.raises(InputError, match="no per-layer vectors"):
        export_peft(c, tiny, tmp_path / "out", method="prompt-tuning")
    with pytest.raises(InputError, match="unknown PEFT method"):
        export_peft(c, tiny, tmp_path / "out", method="lora")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_controller_of_another_model(tiny, tiny_mha, tmp_path):
    with pytest.raises(InputError, match="trained for"):
        export_peft(_controller(tiny), tiny_mha, tmp_path / "out")
