"""The kill tests' one mechanism: run code in a child process that SIGKILLs itself at a chosen call.

A kill must land at a deterministic point (not after a timer), however loaded the machine is, so the child
patches one function (``at``, a dotted path such as ``workbench.prefix.synthesis._write_record`` or
``os.replace``): its ``call``-th call first runs the original (``after=True``) or not at all
(``after=False``), then the process SIGKILLs itself. Run as a script, this module is that child.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys


def killed(code: str, *args: object, at: str | None = None, call: int = 1, after: bool = True,
           env: dict[str, str] | None = None, cwd: object = None, timeout: float = 600
           ) -> subprocess.CompletedProcess:
    """Run ``code`` (with ``sys.argv[1:] = args``) in a child killed at the ``call``-th call of ``at``.

    ``at=None``: the code kills itself (a point inside a call, which call counting cannot name).
    Asserts the child died of SIGKILL (not of an error before the kill point) and returns it.
    """
    command = [sys.executable, __file__, at or "", str(call), "after" if after else "instead", code, *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or os.environ)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return proc


def _patch(at: str, call: int, after: bool) -> None:
    module_name, name = at.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original, calls = getattr(module, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            if after:
                original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, dying)


if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder: the child imports the package as the tests do, not test modules
    at, call, when, code, *args = sys.argv[1:]
    import torch

    torch.set_num_threads(1)
    if at:
        _patch(at, int(call), when == "after")
    sys.argv = ["-c", *args]
    exec(compile(code, "<killed child>", "exec"), {"__name__": "__main__"})
