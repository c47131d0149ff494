import json
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=600)


def test_synthesize_train_generate_on_tiny_model(tmp_path):
    data, ctrl = str(tmp_path / "data"), str(tmp_path / "ctrl")
    out = run("synthesize", "--model", "tiny-random", "--task", "angry2peaceful", "--out", data, "--limit", "2",
              "--iterations", "1", "--n-steps", "2", "--max-new-tokens", "3", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["records"] == 2

    out = run("train-prefix", "--model", "tiny-random", "--data", data, "--out", ctrl, "--n-tokens", "2",
              "--epochs", "2", "--keep-no-gain", "--residual-layers", "0,2", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["n_records"] == 2 and report["n_val"] == 1 and len(report["epochs"]) == 3
    config = json.loads((tmp_path / "ctrl" / "config.json").read_text())
    assert config["n_tokens"] == 2 and config["model_id"] == "tiny-random"
    assert config["residual_hooks"] == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]

    out = run("generate", "--model", "tiny-random", "--prompt", "hello", "--prefix", ctrl, "--max-new-tokens", "16", "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert set(answer) == {"prompt", "response", "seconds"}
    # the CLI answer is the library's answer with the saved prefix applied, and the prefix matters
    import workbench as wb
    from workbench.prefix.controller import PrefixController

    model = wb.load_model("tiny-random", progress=False)
    with PrefixController.load(ctrl, model).applied(model):
        prefixed = model.chat("hello", max_new_tokens=16)
    assert answer["response"] == prefixed != model.chat("hello", max_new_tokens=16)


def test_export_prefix_writes_a_peft_adapter_and_refuses_residuals_for_prompt_tuning(tmp_path):
    import torch

    import workbench as wb
    from workbench.prefix.controller import PrefixController

    model = wb.load_model("tiny-random", progress=False)
    controller = PrefixController.init(model, 2, residual_layers=(1,))
    controller.residuals = {k: torch.ones_like(v) for k, v in controller.residuals.items()}
    controller.save(tmp_path / "ctrl")

    out = run("export-prefix", str(tmp_path / "ctrl"), "--peft", str(tmp_path / "peft"), "--model", "tiny-random", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["method"] == "prefix-tuning"
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 2
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()

    out = run("export-prefix", str(tmp_path / "ctrl"), "--peft", str(tmp_path / "prompt"), "--method", "prompt-tuning",
              "--model", "tiny-random")
    assert out.returncode == 2 and "error:" in out.stderr and "no per-layer vectors" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "prompt").exists()
