"""Everything the workbench writes to disk goes through here, so there is one
way to write and one way to resume.

- :func:`atomic_write` / :func:`atomic_write_json`: a whole file (temp file in
  the same folder, flush, fsync, rename): a reader sees the old file or the new
  one, never half of one;
- :func:`append_jsonl` / :func:`read_jsonl`: append-only record logs (results,
  indexes); a line is flushed and fsynced when written, a torn last line (a
  kill mid-write) is dropped with a warning and cut off, a corrupt line before
  the last is an error naming it;
- :func:`folder_lock`: one writer per output folder (a lock file holding the
  pid; a second live process is refused, a stale lock is taken over);
- :func:`check_fingerprint`: a resumed run is the same run or it is refused;
- saved objects (controls, controllers, reading vectors): ``<folder>/tensors.safetensors``
  plus ``<folder>/config.json`` (kind, format version, model id, sizes, and the
  SHA-256 of the tensors file). Loading checks all of them before touching
  tensors, so an object never lands silently on the wrong model, and a damaged
  folder (truncated tensors, missing config, tensors newer than their config)
  raises one :class:`CorruptArtifactError` whichever object it held.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from .errors import (
    CorruptArtifactError,
    IncompatibleArtifactError,
    ResumeMismatchError,
    RunLockedError,
)

try:  # POSIX: the kernel drops the lock when its holder dies, so staleness is never guessed
    import fcntl
except ImportError:  # pragma: no cover - Windows: fall back to the pid check alone
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("workbench")


class ModelIdentity(Protocol):
    """What an artifact is checked against: the model's id and width (shared ground imports no stage)."""

    @property
    def model_id(self) -> str: ...

    @property
    def d_model(self) -> int: ...


# ---------------------------------------------------------------- whole files
def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (a crash right after it must not bring back the old name)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Replace ``path`` with ``data`` all at once: temp file in the same folder, flush, fsync, ``os.replace``.

    Why: a kill at any point leaves either the old file or the new one, never a
    truncated mix (the temp file is removed on error; a SIGKILL may leave a
    hidden ``.NAME.*.tmp`` behind, which nothing reads).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); keep a replaced file's mode, else the usual 0644
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """:func:`atomic_write` of ``obj`` as indented JSON."""
    return atomic_write(path, json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------- append-only logs
def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line, flushed and fsynced before returning (the line is the commit).

    A torn tail left by an earlier kill is cut off first (see :func:`read_jsonl`),
    so a new line never lands glued to half of an old one.
    """
    path = Path(path)
    line = (json.dumps(dict(record)) + "\n").encode()
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                read_jsonl(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _write_all(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path, *, repair: bool = True) -> list[dict[str, Any]]:
    """The records of a JSONL log (``[]`` if there is none).

    A torn or corrupt *last* line (a kill mid-write) is dropped with a warning
    and the file is cut back to its intact part, so the next append starts
    clean. A corrupt line *before* the last cannot come from a kill: it raises
    :class:`CorruptArtifactError` naming the file and line number.
    ``repair=False`` only reads (a reader that is not the folder's writer must
    not cut a line another process is writing); the dropped line is then not warned about.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")  # a complete file ends with "\n": its last piece is b""
    records: list[dict[str, Any]] = []
    good_end = offset = 0
    for number, line in enumerate(lines, start=1):
        is_last = number == len(lines) or (number == len(lines) - 1 and not lines[-1])
        complete = number < len(lines)  # followed by a newline
        end = offset + len(line) + (1 if complete else 0)
        if line.strip():
            try:
                if not complete:
                    raise ValueError("no newline after it (cut off mid-write)")
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"a {type(record).__name__}, not an object")
            except ValueError as err:
                if not is_last:
                    raise CorruptArtifactError(
                        f"{path} has a corrupt line {number} (of {len(lines) - (not lines[-1])}): {err}; a kill can only "
                        "tear the last line, so this file was edited or damaged: fix or remove that line") from None
                if repair:
                    log.warning("%s: dropped a torn last line %d (%s); the file is cut back to its %d intact record(s)",
                                path, number, err, len(records))
                break
            records.append(record)
        good_end = end
        offset = end
    if repair and good_end != len(data):
        with path.open("r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return records


# ---------------------------------------------------------------- one writer per folder
LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder/.lock`` (holding this process's pid and host) while writing the folder.

    Why: two processes appending to one results file interleave and double
    work. A second live process is refused with :class:`RunLockedError` naming
    the holder; a lock left by a dead process (e.g. SIGKILL) is taken over with
    a warning. On POSIX the lock is also an ``flock``, which the kernel releases
    when its holder dies, so a reused pid is never mistaken for a live holder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(path)
                    raise RunLockedError(
                        f"{folder} is being written by another process (pid {holder.get('pid', '?')} on "
                        f"{holder.get('host', '?')}); wait for it to finish, stop it, or choose another output folder"
                    ) from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # the holder released (and unlinked) it between our open and flock: try again
                    os.close(fd)
                    continue
            holder = _holder(path)
            if holder:
                local = holder.get("host") == me["host"]
                pid = holder.get("pid")
                if fcntl is None and local and isinstance(pid, int) and _alive(pid):
                    raise RunLockedError(f"{folder} is being written by another process (pid {pid}); wait for it "
                                         "to finish, stop it, or choose another output folder")
                if not local and fcntl is None:
                    raise RunLockedError(f"{folder} is locked by pid {pid} on host {holder.get('host')}; if that run "
                                         f"is over, delete {path}")
                log.warning("%s: taking over a stale lock left by pid %s on %s (that process is gone)",
                            folder, pid, holder.get("host"))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        break
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


# ---------------------------------------------------------------- one fingerprint per resumable run
RUN = "run.json"


def _plain(obj: Any) -> Any:
    """JSON's view of ``obj`` (tuples become lists), so a stored and a fresh fingerprint compare equal."""
    return json.loads(json.dumps(obj))


def _short(value: Any, width: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _differences(old: Any, new: Any, where: str, extendable: bool = False) -> list[str]:
    """Leaf-level differences as ``key: stored vs now`` lines (``extendable``: entries only in ``old`` are kept)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{where}.{key}" if where else str(key)
            if key not in new and extendable:
                continue
            if key not in old and extendable:
                continue
            if key not in old or key not in new:
                out.append(f"{sub}: {_short(old[key]) if key in old else '(absent)'} stored vs "
                           f"{_short(new[key]) if key in new else '(absent)'} now")
            else:
                out += _differences(old[key], new[key], sub)
        return out
    return [] if old == new else [f"{where}: {_short(old)} stored vs {_short(new)} now"]


def fingerprint_hash(obj: Any) -> str:
    """SHA-256 of ``obj``'s canonical JSON: a short, stable id of settings or content."""
    return hashlib.sha256(json.dumps(_plain(obj), sort_keys=True).encode()).hexdigest()


def check_fingerprint(
    folder: str | Path,
    fingerprint: Mapping[str, Any],
    *,
    restart: bool = False,
    extendable: Sequence[str] = (),
    outputs: Sequence[str] = (),
) -> dict[str, Any]:
    """The one resumable-run check: the first run stores ``fingerprint`` in ``folder/run.json``; a rerun must match.

    ``fingerprint`` holds everything that changes the results. A rerun whose
    fingerprint differs raises :class:`ResumeMismatchError` naming every
    differing key with both values and the two ways out (another ``--out``, or
    ``--restart``). Keys in ``extendable`` are objects that may gain entries
    (e.g. a run that adds a method) but never lose or change one: the stored
    fingerprint is their union, so a smaller rerun never shrinks it.
    ``outputs``: the run's files and folders (relative to ``folder``); they are
    deleted by ``restart`` (before the new fingerprint is stored, so a kill in
    between never pairs old outputs with a new fingerprint), and present
    without a ``run.json`` they are refused (their settings are unknown).
    Returns the fingerprint now stored.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN
    new = _plain(dict(fingerprint))
    ways_out = "choose another --out folder to keep both runs, or pass --restart to discard this folder's results"
    if restart:
        import shutil

        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        for name in outputs:
            target = folder / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
    if not path.is_file():
        present = [name for name in outputs if (folder / name).exists()]
        if present:
            raise ResumeMismatchError(
                f"{folder} holds results ({', '.join(present)}) but no {RUN}, so the settings they were made with are "
                f"unknown (an older workbench, or a damaged folder); {ways_out}")
        atomic_write_json(path, {"kind": "run fingerprint", "format_version": 1, "fingerprint": new})
        return new
    try:
        stored = json.loads(path.read_text())
        old = stored["fingerprint"]
        if not isinstance(old, dict):
            raise TypeError("not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptArtifactError(f"{path} is unreadable ({err!r}); {ways_out}") from None
    problems = []
    merged = dict(old)
    for key in sorted(set(old) | set(new)):
        if key in extendable:
            o, n = old.get(key) or {}, new.get(key) or {}
            if not isinstance(o, dict) or not isinstance(n, dict):
                raise TypeError(f"extendable fingerprint key {key!r} must hold objects")
            problems += _differences(o, n, key, extendable=True)
            merged[key] = {**o, **n}
        elif key not in new or key not in old or old[key] != new[key]:
            problems += _differences({key: old[key]} if key in old else {}, {key: new[key]} if key in new else {}, "")
    if problems:
        raise ResumeMismatchError(
            f"{folder} holds a run made with other settings; resuming would mix two runs' results. Differences:\n  "
            + "\n  ".join(problems) + f"\nTo go on: {ways_out}.")
    if merged != old:
        atomic_write_json(path, {**stored, "fingerprint": merged})
    return merged


# ---------------------------------------------------------------- what a model is
#: Elements sampled from each weight tensor for :func:`weights_fingerprint`.
WEIGHT_SAMPLES = 64


def weights_fingerprint(named_tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 over each tensor's name, shape, dtype and the bytes of a fixed sample of its elements.

    Why a sample: hashing every byte of an 8B model reads 16 GB; names, shapes
    and 64 evenly spaced elements per tensor tell apart checkpoints,
    fine-tunes and quantisations at the cost of a few hundred tiny gathers (on
    the tensors' own devices). Tensors on the meta device (offloaded) count by
    name, shape and dtype only.
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        t = tensor.detach()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.reshape(-1)
        n, k = flat.numel(), min(flat.numel(), WEIGHT_SAMPLES)
        # integer arithmetic: a float linspace rounds past the last element beyond 2**24 elements
        index = torch.arange(k, device=flat.device, dtype=torch.long) * (n - 1) // max(1, k - 1)
        digest.update(flat[index].contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FingerprintedModel(ModelIdentity, Protocol):
    """What :func:`model_fingerprint` reads (a :class:`~workbench.model.chat_model.HookedChatModel`)."""

    @property
    def dtype(self) -> Any: ...

    @property
    def device(self) -> Any: ...

    decoder: Any
    tokenizer: Any


def model_fingerprint(model: FingerprintedModel) -> dict[str, Any]:
    """Model id, weights (:func:`weights_fingerprint`), dtype, device type and chat template: what a run was made on.

    The device *type* (cuda vs cpu), not its index: the same weights on
    another GPU give the same numbers; CPU and GPU kernels do not.
    """
    template = getattr(model.tokenizer, "chat_template", None)
    return {
        "model_id": model.model_id,
        "weights": weights_fingerprint(model.decoder.named_parameters()),
        "dtype": str(model.dtype).replace("torch.", ""),
        "device_type": getattr(model.device, "type", str(model.device)),
        "chat_template": fingerprint_hash(template if isinstance(template, str) else str(template)),
        "vocab_size": len(model.tokenizer),
    }


# ---------------------------------------------------------------- saved objects
FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
CONFIG = "config.json"


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of tensors' names, dtypes, shapes and values, independent of how a file serialises them.

    Why not the file's hash: safetensors writes its header's metadata in no
    fixed order, so saving the same tensors twice gives different bytes.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu().reshape(-1)
        digest.update(f"{name}|{tuple(tensors[name].shape)}|{t.dtype}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_artifact(folder: str | Path, kind: str, tensors: dict[str, Tensor], config: dict[str, Any]) -> Path:
    """Write tensors, then the config that names their SHA-256 (each file through :func:`atomic_write`).

    Why the hash: the two files cannot be renamed as one, so the config is
    written last and carries the tensors file's hash; a kill between the two
    leaves new tensors next to an old config, which :func:`load_artifact` then
    reports as damaged instead of loading a mix. ``content_sha256`` (the
    tensors' values, :func:`tensors_digest`) identifies the object for
    :func:`content_hash`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    payload = save(tensors, metadata={"kind": kind, "model_id": str(config.get("model_id"))})
    config = {"kind": kind, "format_version": FORMAT_VERSION, **config,
              "content_sha256": tensors_digest(tensors), "tensors_sha256": hashlib.sha256(payload).hexdigest()}
    atomic_write(folder / TENSORS, payload)
    atomic_write_json(folder / CONFIG, config)
    return folder


def record_key(index: int, prompt: str) -> str:
    """A resumable run's key for its ``index``-th prompt: position plus a hash of the text, so a rerun with a
    longer ``limit`` keeps the finished keys and an edited prompt list is not mistaken for the old one."""
    return f"{index:05d}-{hashlib.sha1(prompt.encode()).hexdigest()[:10]}"


def content_hash(folder: str | Path, kind: str) -> str:
    """SHA-256 of a saved object's content (its config and its tensors' values), not of its path.

    Why: a resumed run that used an object must know it is the *same* object,
    even if it moved or was saved again under the same name.
    """
    folder = Path(folder)
    config = read_config(folder, kind)
    if "content_sha256" not in config:  # saved before digests were recorded: read the tensors
        tensors, config = load_artifact(folder, kind)
        config = {**config, "content_sha256": tensors_digest(tensors)}
    return fingerprint_hash({k: v for k, v in config.items() if k != "tensors_sha256"})


def _damaged(folder: Path, kind: str, what: str, remedy: str | None) -> CorruptArtifactError:
    return CorruptArtifactError(
        f"{folder} holds a damaged {kind}: {what}. "
        + (remedy or f"Delete the folder and save or recompute the {kind} again")
    )


def read_config(folder: str | Path, kind: str, remedy: str | None = None) -> dict[str, Any]:
    """The folder's config, checked for kind and format version.

    A folder that is not there, or holds neither file, is *not a saved
    ``kind``* (:class:`IncompatibleArtifactError`); one with a missing or
    unreadable config is *damaged* (:class:`CorruptArtifactError`, whose
    message says what to do; ``remedy`` replaces the default advice).
    """
    folder = Path(folder)
    if not (folder / CONFIG).is_file() and not (folder / TENSORS).is_file():
        where = "the folder does not exist" if not folder.exists() else f"no {CONFIG} or {TENSORS} in it"
        raise IncompatibleArtifactError(f"{folder} holds no saved {kind} ({where}); check the path")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise _damaged(folder, kind, f"{CONFIG} is missing next to {TENSORS}", remedy) from None
    except (OSError, ValueError) as err:
        raise _damaged(folder, kind, f"{CONFIG} is unreadable ({err})", remedy) from None
    if not isinstance(config, dict):
        raise _damaged(folder, kind, f"{CONFIG} holds a {type(config).__name__}, not an object", remedy)
    if config.get("kind") != kind:
        raise IncompatibleArtifactError(f"{folder} holds a {config.get('kind')!r}, not a {kind!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise IncompatibleArtifactError(
            f"{folder} has format version {config.get('format_version')}; this workbench reads version {FORMAT_VERSION}"
        )
    return config


def check_model(config: dict[str, Any], model: ModelIdentity, what: str) -> None:
    if config.get("model_id") != model.model_id:
        raise IncompatibleArtifactError(
            f"this {what} was made for model {config.get('model_id')!r} and cannot be applied to {model.model_id!r}; "
            f"load {config.get('model_id')!r} or recompute the {what} on this model"
        )
    if "d_model" in config and config["d_model"] != model.d_model:
        raise IncompatibleArtifactError(f"this {what} has d_model {config['d_model']}, the model {model.d_model}")


def load_artifact(
    folder: str | Path,
    kind: str,
    model: ModelIdentity | None = None,
    *,
    required: Sequence[str] = (),
    tensor_names: Callable[[dict[str, Any]], Iterable[str]] | None = None,
    remedy: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and config of a saved ``kind``, checked against ``model``; every loader reads through here.

    ``required``: config fields the loader reads; ``tensor_names``: the tensors
    the config promises (a function of the config). Anything missing, a
    truncated or unreadable tensors file, raises :class:`CorruptArtifactError`
    (a damaged folder, to save again), never a library error.
    """
    folder = Path(folder)
    config = read_config(folder, kind, remedy)
    missing = [key for key in ("model_id", *required) if key not in config]
    if missing:
        raise _damaged(folder, kind, f"{CONFIG} lacks {missing}", remedy)
    if model is not None:
        check_model(config, model, kind)
    if not (folder / TENSORS).is_file():
        raise _damaged(folder, kind, f"{TENSORS} is missing", remedy)
    try:
        payload = (folder / TENSORS).read_bytes()
        tensors = load(payload)
    except (OSError, ValueError, SafetensorError) as err:
        raise _damaged(folder, kind, f"{TENSORS} is truncated or unreadable ({err})", remedy) from None
    if tensor_names is not None:
        try:
            expected = list(tensor_names(config))
        except (KeyError, TypeError, ValueError) as err:
            raise _damaged(folder, kind, f"{CONFIG} does not list its tensors properly ({err!r})", remedy) from None
        absent = [name for name in expected if name not in tensors]
        if absent:
            raise _damaged(folder, kind, f"{TENSORS} lacks {absent[:3]}{' ...' if len(absent) > 3 else ''}", remedy)
    expected_hash = config.get("tensors_sha256")
    if expected_hash is not None and hashlib.sha256(payload).hexdigest() != expected_hash:
        raise _damaged(folder, kind, f"{TENSORS} does not match the hash in {CONFIG} (the two were written by "
                       "different saves, e.g. a save killed midway)", remedy)
    return tensors, config
