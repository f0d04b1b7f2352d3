"""SAEs shipped with a model: a folder of SAELens-format SAEs and a checksummed ``MANIFEST.json``.

SAELens users load pretrained SAEs rather than training them; trace does the same for the models it ships
(``default-safety``). ``trace sae build`` trains the SAEs once on the broad corpus (:mod:`trace_lib.sae.plan`),
writes them in float16 (half the bytes; the weights are cast back to float32 on load) and measures them *as
shipped* on held-out text. A registered model spec names its pack folder (``ModelSpec.sae_pack``);
:func:`get_or_train_saes <trace_lib.sae.store.get_or_train_saes>` loads it when the model's content hash is
the one the pack was trained on. Every file's sha256 is checked on load: a pack that fails is refused with the
command that rebuilds it.

The manifest::

    {"format": "trace-sae-pack", "version": 1, "model": ..., "model_hash": ..., "hooks": [...],
     "files": {"<hook>/cfg.json": "<sha256>", ...}, "build_command": "trace sae build ...",
     "config": {...}, "plan": {...}, "corpus": {...}, "quality": {"<hook>": {...}}, "dtype": "float16"}
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trace_lib.cache import atomic_write_json, check_manifest_files, file_sha256
from trace_lib.errors import SAEError
from trace_lib.sae.io import load_sae, save_sae
from trace_lib.sae.model import SAE

MANIFEST = "MANIFEST.json"
PACK_FORMAT = "trace-sae-pack"
PACK_VERSION = 1
SHIPPED_DTYPE = torch.float16


@dataclass(frozen=True)
class SAEPack:
    """A shipped pack: its folder and parsed manifest."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def build_command(self) -> str:
        return str(self.manifest.get("build_command", "trace sae build"))

    def load(self, hooks: Iterable[str]) -> dict[str, SAE]:
        """The pack's SAEs for ``hooks`` (each must be in the pack), checksums verified, cast to float32."""
        out = {}
        for hook in hooks:
            if hook not in self.manifest["hooks"]:
                raise SAEError(f"the SAE pack at {self.folder} has no SAE for {hook}; it has {self.hooks}")
            self.verify(hook)
            sae = load_sae(self.folder / hook, dtype=torch.float32)
            sae.cfg.metadata["shipped"] = {"pack": str(self.folder), "model_hash": self.manifest["model_hash"],
                                           "dtype": self.manifest.get("dtype")}
            out[hook] = sae
        return out

    def verify(self, hook: str) -> None:
        """Raise :class:`SAEError` unless every file of ``hook`` is present with its recorded sha256."""
        files = {rel: digest for rel, digest in self.manifest["files"].items() if rel.split("/")[0] == hook}
        if not files:
            raise SAEError(f"the SAE pack at {self.folder} lists no files for {hook}; rebuild it with "
                           f"`{self.build_command}`")
        check_manifest_files(self.folder, files, "shipped SAE file", f"rebuild the pack with `{self.build_command}` "
                             "(or retrain with --retrain-saes)", SAEError)


def read_pack(folder: str | Path) -> SAEPack:
    """The pack in ``folder``, its manifest checked for shape (not yet the files' checksums)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise SAEError(f"no SAE pack at {folder} (no {MANIFEST}); build one with `trace sae build`") from None
    except (OSError, ValueError) as exc:
        raise SAEError(f"cannot read {folder / MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise SAEError(f"{folder / MANIFEST} is not a trace SAE pack manifest")
    for key, kind in (("model_hash", str), ("hooks", list), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise SAEError(f"{folder / MANIFEST} has no valid {key!r}")
    return SAEPack(folder, manifest)


def shipped_pack(loaded) -> SAEPack | None:
    """The pack registered for ``loaded``'s spec when it was trained on these weights (in whatever dtype and on
    whatever device ``loaded`` runs: its ``weights_hash``), else None."""
    from trace_lib.models.specs import get_spec

    spec = get_spec(str(loaded.spec)) if getattr(loaded, "spec", None) else None
    if spec is None or spec.sae_pack is None or not (Path(spec.sae_pack) / MANIFEST).is_file():
        return None
    pack = read_pack(spec.sae_pack)
    weights = getattr(loaded, "weights_hash", "") or loaded.content_hash
    return pack if pack.manifest["model_hash"] == weights else None


def write_pack(saes: Mapping[str, SAE], folder: str | Path, *, model: str, model_hash: str, build_command: str,
               extra: Mapping[str, Any] | None = None) -> SAEPack:
    """Write ``saes`` in float16 SAELens folders under ``folder`` with a manifest of their sha256s.

    ``extra`` (config, plan, corpus, quality) is merged into the manifest. Returns the pack as written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for hook, sae in sorted(saes.items()):
        half = copy.deepcopy(sae).to(dtype=SHIPPED_DTYPE)
        half.cfg.dtype = "float16"
        half.cfg.metadata.pop("shipped", None)
        save_sae(half, folder / hook)
        for path in sorted((folder / hook).iterdir()):
            if path.is_file():
                files[f"{hook}/{path.name}"] = file_sha256(path)
    manifest = {"format": PACK_FORMAT, "version": PACK_VERSION, "model": model, "model_hash": model_hash,
                "hooks": sorted(saes), "dtype": "float16", "files": files, "build_command": build_command,
                **dict(extra or {})}
    atomic_write_json(folder / MANIFEST, manifest)
    return read_pack(folder)
