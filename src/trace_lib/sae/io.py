"""Reading and writing SAEs: SAELens folders (what trace writes) and EleutherAI sparsify folders (read only).

The formats themselves: :mod:`trace_lib.sae.formats_saelens` and :mod:`trace_lib.sae.formats_sparsify`
(their shared checks: :mod:`trace_lib.sae.formats_common`); this module holds the entry points -- save a folder
atomically, load one folder or a folder of folders (the format detected from the weights file name), and check
that an SAE fits a model's hook. Weights are read with safetensors only (never pickle).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from trace_lib.cache import atomic_dir, temp_prefix
from trace_lib.errors import SAEError
from trace_lib.jsonutil import to_jsonable
from trace_lib.sae.formats_common import CFG_FILENAME
from trace_lib.sae.formats_saelens import SAELENS_WEIGHTS, _load_saelens, sae_cfg_dict, sae_state_dict
from trace_lib.sae.formats_sparsify import SPARSIFY_WEIGHTS, _load_sparsify, hookpoint_to_hook_name
from trace_lib.sae.model import SAE, dtype_from_str, dtype_to_str


def save_sae(sae: SAE, folder: str | Path, *, fold_scaling: bool = True) -> Path:
    """Write ``sae`` to ``folder`` in SAELens format (``cfg.json`` + ``sae_weights.safetensors``), atomically.

    The folder is built in a temporary sibling and renamed into place, so readers never see a half-written
    SAE. An existing SAE folder (or an empty folder) at ``folder`` is replaced; any other existing path
    raises SAEError. ``fold_scaling`` (default) folds an input scaling factor into the weights first (on a
    copy; ``sae`` is untouched) so that SAELens, which ignores a stored factor at inference, gives the same
    result; pass False to keep the factor as ``norm_scaling_factor`` in ``cfg.json`` (bit-exact in trace).
    """
    folder = Path(folder)
    if fold_scaling and sae.cfg.input_scale is not None:
        sae = copy.deepcopy(sae).fold_scaling_factor()
    tensors = sae_state_dict(sae)
    cfg = sae_cfg_dict(sae)
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise SAEError(f"refusing to save SAE: {name} contains NaN/Inf (training diverged); retrain with a lower lr")

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / SAELENS_WEIGHTS))
        (tmp / CFG_FILENAME).write_text(json.dumps(cfg, indent=2, default=to_jsonable) + "\n", encoding="utf-8")

    if not folder.exists():
        atomic_dir(folder, write)
        return folder
    if not folder.is_dir() or (any(folder.iterdir()) and not (folder / CFG_FILENAME).is_file()):
        raise SAEError(
            f"cannot save SAE to {folder}: it exists and is not an SAE folder (no cfg.json); pass a new or empty folder"
        )
    # Replace an existing SAE folder: build the new one beside it, then swap.
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder), suffix=".tmp", dir=folder.parent))
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    try:
        write(tmp)
        os.rename(folder, old)
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------- loading
def load_sae(
    folder: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    hook_name: str | None = None,
) -> SAE:
    """Load one SAE folder, SAELens or sparsify format (detected from the weights file name).

    ``dtype`` converts the weights (default: the dtype in cfg.json / the file). ``hook_name`` overrides the
    hook recorded in the folder (needed when a SAELens cfg.json has none). Raises SAEError with what to do
    for: a missing folder, no cfg.json, a cfg.json missing a required field, an unknown architecture or
    normalisation, weights whose shapes disagree with cfg.json, and NaN/Inf weights.
    """
    folder = Path(folder)
    if not folder.exists():
        raise SAEError(f"SAE folder {folder} does not exist: check the path (an SAE folder holds cfg.json + weights)")
    if not folder.is_dir():
        raise SAEError(f"{folder} is a file, not an SAE folder: pass the folder that holds cfg.json")
    cfg_path = folder / CFG_FILENAME
    if not cfg_path.is_file():
        subs = [p.name for p in _sae_subfolders(folder)]
        if subs:
            shown = ", ".join(subs[:5]) + (", ..." if len(subs) > 5 else "")
            raise SAEError(
                f"{folder} has no cfg.json but holds several SAEs ({shown}): use load_sae_dir() or point at one of them"
            )
        raise SAEError(
            f"no cfg.json in {folder}: an SAE folder needs cfg.json plus {SAELENS_WEIGHTS} (SAELens) "
            f"or {SPARSIFY_WEIGHTS} (sparsify)"
        )
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEError(f"{cfg_path} is not valid JSON ({e}): re-download or re-save the SAE") from e
    if not isinstance(raw, dict):
        raise SAEError(f"{cfg_path} must hold a JSON object, got {type(raw).__name__}")

    if (folder / SAELENS_WEIGHTS).is_file():
        sae = _load_saelens(folder, raw, hook_name)
    elif (folder / SPARSIFY_WEIGHTS).is_file():
        sae = _load_sparsify(folder, raw, hook_name)
    else:
        raise SAEError(
            f"no weights in {folder}: expected {SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} (sparsify) "
            "beside cfg.json"
        )
    if dtype is not None:
        sae.cfg.dtype = dtype_to_str(dtype_from_str(dtype))
        sae = sae.to(dtype=sae.cfg.torch_dtype)
    return sae.to(device=device)


def load_sae_dir(
    folder: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> dict[str, SAE]:
    """Load every SAE in ``folder``'s sub-folders (or ``folder`` itself if it is one), keyed by hook name.

    sparsify hookpoint folders (``layers.5``) are keyed by the mapped TransformerLens name
    (``blocks.5.hook_resid_post``, see :func:`hookpoint_to_hook_name`). Hidden sub-folders and sub-folders
    without cfg.json are skipped. SAEError if none is found or two SAEs claim the same hook.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if not folder.exists():
            raise SAEError(f"SAE folder {folder} does not exist: check the path")
        raise SAEError(f"{folder} is a file, not a folder of SAEs")
    if (folder / CFG_FILENAME).is_file():
        sae = load_sae(folder, device=device, dtype=dtype)
        return {sae.cfg.hook_name: sae}
    out: dict[str, SAE] = {}
    where: dict[str, str] = {}
    for sub in _sae_subfolders(folder):
        sae = load_sae(sub, device=device, dtype=dtype)
        name = sae.cfg.hook_name
        if name in out:
            raise SAEError(
                f"two SAEs in {folder} are for {name}: {where[name]} and {sub.name}; keep one of them"
            )
        out[name] = sae
        where[name] = sub.name
    if not out:
        raise SAEError(f"no SAEs in {folder}: expected sub-folders each holding cfg.json and weights")
    return out


def _sae_subfolders(folder: Path) -> list[Path]:
    subs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / CFG_FILENAME).is_file()]
    return sorted(subs, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


# ---------------------------------------------------------------------------------------------- fit checks
def check_sae_fits(sae: SAE, hook_name: str, d_model: int) -> None:
    """Raise SAEError unless ``sae`` can read ``hook_name`` of a model whose width there is ``d_model``.

    Checks that ``sae.cfg.d_in == d_model`` and, when the SAE records a hook, that it is the same hook
    (sparsify hookpoint names are mapped first, see :func:`hookpoint_to_hook_name`).
    """
    c = sae.cfg
    if c.d_in != d_model:
        trained = f" (trained on {c.model_name})" if c.model_name else ""
        raise SAEError(
            f"SAE for {hook_name} has d_in={c.d_in} but the model's width there is {d_model}: it was made for "
            f"another model{trained}; use an SAE trained on this model, or train one with trace_lib.sae.train_sae"
        )
    if c.hook_name and hookpoint_to_hook_name(c.hook_name) != hookpoint_to_hook_name(hook_name):
        raise SAEError(
            f"SAE was trained on {c.hook_name} but is applied at {hook_name}: load the SAE for {hook_name} "
            "(load_sae_dir() keys SAEs by hook name)"
        )
