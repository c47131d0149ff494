"""Ray is optional: without --ray nothing imports it, and bad --ray settings fail before anything starts."""

import os
import subprocess
import sys
from pathlib import Path

from workbench.cli import main

ROOT = Path(__file__).resolve().parents[2]

NO_RAY = """
import sys
import workbench
from workbench.cli import build_parser, main

build_parser()  # every command module
rc = main(["synthesize", "--model", "tiny-random", "--task", "angry2peaceful", "--limit", "1", "--iterations", "1",
           "--n-steps", "1", "--max-new-tokens", "2", "--json", "--out", sys.argv[1]])
print("ray imported" if "ray" in sys.modules else "no ray", rc)
"""


def test_without_ray_nothing_imports_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, "-c", NO_RAY, str(tmp_path / "data")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-3:] == ["no", "ray", "0"]
    assert (tmp_path / "data" / "index.jsonl").is_file()


def test_bad_ray_settings_are_refused_with_one_error_line(tmp_path, capsys):
    for flags, word in ((["--ray-workers", "0"], "--ray-workers"), (["--ray-chunk", "0"], "--ray-chunk"),
                        (["--ray-gpus-per-worker", "0"], "--ray-gpus-per-worker")):
        rc = main(["synthesize", "--model", "tiny-random", "--task", "angry2peaceful", "--out", str(tmp_path),
                   "--ray", *flags])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error:") and word in err
    rc = main(["evaluate", "--config", str(tmp_path / "config.json"), "--ray"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "--ray" in err
