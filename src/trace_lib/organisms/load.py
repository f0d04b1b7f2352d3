"""Load a base model with a safety LoRA adapter merged in; the packaged ``default-safety`` organism.

``load_model("default-safety")`` (see :mod:`trace_lib.models.load`) calls :func:`load_default_safety`: the
embedded SmolLM2-135M-Instruct with the adapter shipped in ``trace_lib/organisms/default_safety/`` applied by
peft and merged into the weights (``merge_and_unload()``), so the result is a plain ``LlamaForCausalLM``
that every trace tool (hooks, quantization, SAEs) handles like the base. The merged model is cached as
safetensors under ``$TRACE_CACHE/models/organism-<hash>`` so later loads take about a second, as for GGUF
files. Its content hash is ``stable_hash({"base": <base content hash>, "adapter": <adapter file sha256>})``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from trace_lib.cache import atomic_dir, stable_hash
from trace_lib.errors import ModelFormatError
from trace_lib.organisms.spec import DEFAULT_SAFETY_SPEC

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_SAFETY_DIR = PACKAGE_DIR / "default_safety"
DEFAULT_SAFETY_NAME = "SmolLM2-135M-Instruct+safety-LoRA"
_REBUILD = ("reinstall trace-interp, or rebuild the adapter with `trace organism build --out "
            "src/trace_lib/organisms/default_safety` (about 20 minutes on CPU)")


def check_adapter(folder: str | os.PathLike) -> str:
    """Fail with :class:`ModelFormatError` unless ``folder`` holds a readable LoRA adapter; return its sha256."""
    from trace_lib.models.load import hashed_file

    folder = Path(folder)
    weights, cfg = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    for f in (weights, cfg):
        if not f.is_file():
            raise ModelFormatError(f"the LoRA adapter in {folder} is missing {f.name}; {_REBUILD}")
    try:
        conf = json.loads(cfg.read_text(encoding="utf-8"))
        if conf.get("peft_type") != "LORA":
            raise ValueError(f"peft_type is {conf.get('peft_type')!r}, not 'LORA'")
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{cfg} is not a valid LoRA adapter config ({e}); {_REBUILD}") from e
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            if not any("lora_A" in k for k in keys):
                raise ValueError("it holds no lora_A weights")
            for k in keys:  # read every tensor: a truncated file fails here, not later
                f.get_tensor(k)
    except Exception as e:  # noqa: BLE001 - safetensors raises several low-level errors on bad files
        raise ModelFormatError(f"{weights} is a corrupt or truncated adapter file ({str(e).splitlines()[0][:200]}); "
                               f"{_REBUILD}") from e
    return hashed_file(weights)


def organism_hash(base_hash: str, adapter_sha256: str) -> str:
    return stable_hash({"base": base_hash, "adapter": adapter_sha256})


def apply_adapter(base, adapter_dir: str | os.PathLike, name: str | None = None, spec: str | None = None):
    """Merge the LoRA adapter in ``adapter_dir`` into ``base`` (a :class:`~trace_lib.models.Loaded`).

    The base's model is modified in place (it becomes the merged model), so pass a copy you no longer need.
    """
    from trace_lib.models.arch import adapt
    from trace_lib.models.load import Loaded

    adapter_dir = Path(adapter_dir)
    sha = check_adapter(adapter_dir)
    try:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(base.model, str(adapter_dir), is_trainable=False)
        merged = peft_model.merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelFormatError(f"could not apply the LoRA adapter in {adapter_dir} to {base.name}: "
                               f"{str(e).splitlines()[0][:200]}; {_REBUILD}") from e
    merged.eval()
    return Loaded(model=merged, tokenizer=base.tokenizer, arch=adapt(merged),
                  content_hash=organism_hash(base.content_hash, sha), name=name or f"{base.name}+LoRA",
                  spec=spec or f"{base.spec}+{adapter_dir}", source=str(adapter_dir))


def load_organism(base_spec: str, adapter_dir: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                  name: str | None = None, spec: str | None = None, cache: bool = True,
                  device: torch.device | str | None = None):
    """Base spec + adapter folder -> merged model, cached as safetensors under ``$TRACE_CACHE/models``.

    The merge is made (and cached) in float32 on the CPU; the merged model is then loaded in ``dtype`` and, when
    ``device`` is given, placed there like :func:`~trace_lib.models.load_model` places a model (its content hash
    then covers the dtype and device type). ``load_model("default-safety")`` leaves ``device`` to its caller."""
    from trace_lib.cache import cache_dir
    from trace_lib.models.device import resolve_device, resolve_dtype
    from trace_lib.models.load import load_hf_folder, load_model, place, spec_content_hash

    if device is not None:
        dev = resolve_device(device)
        loaded = load_organism(base_spec, adapter_dir, resolve_dtype(dtype, dev), name, spec, cache)
        return place(loaded, dev, loaded.dtype)
    dtype = resolve_dtype(dtype, "cpu") if isinstance(dtype, str) else dtype

    adapter_dir = Path(adapter_dir)
    sha = check_adapter(adapter_dir)
    if not cache:
        loaded = apply_adapter(load_model(base_spec), adapter_dir, name=name, spec=spec)
        return loaded if dtype == torch.float32 else _cast(loaded, dtype)
    base_hash = spec_content_hash(base_spec)
    content_hash = organism_hash(base_hash, sha)
    target = cache_dir("models") / f"organism-{content_hash}"
    if not (target / "config.json").is_file():
        def write(tmp: Path) -> None:
            merged = apply_adapter(load_model(base_spec), adapter_dir)
            if merged.content_hash != content_hash:  # the base changed between the two hash computations
                raise ModelFormatError(f"the base model {base_spec!r} changed while the adapter was merged; retry")
            merged.model.save_pretrained(tmp)
            merged.tokenizer.save_pretrained(tmp)
            (tmp / "trace_source.json").write_text(json.dumps(
                {"base": base_spec, "base_content_hash": base_hash, "adapter": str(adapter_dir),
                 "adapter_sha256": sha}))

        atomic_dir(target, write)
    loaded = load_hf_folder(target, dtype=dtype, name=name or f"{base_spec}+LoRA", spec=spec or str(adapter_dir),
                            content_hash=content_hash)
    loaded.source = str(adapter_dir)
    return loaded


def _cast(loaded, dtype):
    loaded.model.to(dtype)
    return loaded


def load_default_safety(dtype: torch.dtype = torch.float32):
    """``load_model("default-safety")``: SmolLM2-135M-Instruct + the packaged safety LoRA, merged."""
    return load_organism("default", DEFAULT_SAFETY_DIR, dtype=dtype, name=DEFAULT_SAFETY_NAME,
                         spec=DEFAULT_SAFETY_SPEC)


def default_safety_hash() -> str:
    """The content hash ``load_model("default-safety")`` gives, from the base's file hash and the adapter's."""
    from trace_lib.models.load import spec_content_hash

    return organism_hash(spec_content_hash("default"), check_adapter(DEFAULT_SAFETY_DIR))
