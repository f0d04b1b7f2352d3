"""Where a model runs and in which dtype: the one resolver every loader, API class and command goes through.

``resolve_device(spec)`` turns ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` into a ``torch.device`` that
exists on this machine; ``resolve_dtype(spec, device)`` turns ``auto``, ``float32``, ``bfloat16`` or
``float16`` into a ``torch.dtype`` that is sensible there. ``auto`` picks a CUDA GPU when one is visible (in
bfloat16, or float16 on GPUs without bfloat16), else Apple's MPS (in float32: bfloat16 needs macOS 14 and
float16 overflows in some models' residual streams), else the CPU in float32. A device that is not there, an
unknown name, or float16 on the CPU raises :class:`~trace_lib.errors.DeviceError` with one line that says why;
the ``trace`` command runs the same checks while it parses ``--device`` and ``--dtype``, before any model loads.

float16 on the CPU is refused rather than allowed: CPU matmuls in half precision are emulated (tens of times
slower than float32) and some ops trace relies on have no CPU float16 kernel (torch.ao's dynamic int8 behind
``int8-dynamic`` takes float32 only). bfloat16 is allowed on the CPU (slow too, but its kernels exist and its
range is float32's), which is how a bfloat16 run is checked on a machine without a GPU.

Whatever the model runs in, what trace measures comes back to the CPU in float32: hooks copy activations there
(:func:`trace_lib.capture.hooks.to_float32_cpu`), and inputs go to the model's device through :func:`to_device`.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Mapping
from typing import Any

import torch

from trace_lib.errors import DeviceError

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_FORMS = "auto, float32, bfloat16 or float16"
_CUDA = re.compile(r"cuda(?::(\d+))?")

DeviceSpec = str | torch.device
DtypeSpec = str | torch.dtype


def resolve_device(spec: DeviceSpec = "auto", what: str = "device") -> torch.device:
    """``spec`` as a ``torch.device`` present on this machine (``what`` names it in messages, e.g. ``--device``).

    ``cuda`` means the current CUDA device (``cuda:0`` unless changed), so results record an index."""
    s = str(spec).strip().lower() if isinstance(spec, str | torch.device) else None
    if s == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if s == "cpu":
        return torch.device("cpu")
    m = _CUDA.fullmatch(s or "")
    if m:
        if not torch.cuda.is_available():
            why = (f"this torch build ({torch.__version__}) has no CUDA support" if torch.version.cuda is None
                   and getattr(torch.version, "hip", None) is None
                   else "torch.cuda.is_available() is False (no driver, or CUDA_VISIBLE_DEVICES hides every GPU)")
            raise DeviceError(f"no CUDA GPU is visible: {why}; use {what} cpu or auto")
        count = torch.cuda.device_count()
        index = int(m.group(1)) if m.group(1) is not None else torch.cuda.current_device()
        if index >= count:
            seen = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise DeviceError(f"{what} cuda:{index} names GPU {index}, but only {count} CUDA GPU"
                              f"{'' if count == 1 else 's'} {'is' if count == 1 else 'are'} visible ({seen})")
        return torch.device("cuda", index)
    if s in ("mps", "mps:0"):
        if not _mps_available():
            why = ("this torch build has no MPS support (MPS is Apple silicon's GPU, on macOS)"
                   if not torch.backends.mps.is_built() else "this Mac has no Metal GPU torch can use "
                   "(macOS 12.3 or later is needed)")
            raise DeviceError(f"MPS is not available: {why}; use {what} cpu or auto")
        return torch.device("mps")
    raise DeviceError(f"{what} must be {DEVICE_FORMS}, not {spec!r}")


def resolve_dtype(spec: DtypeSpec = "auto", device: torch.device | str = "cpu", what: str = "dtype",
                  device_what: str = "device") -> torch.dtype:
    """``spec`` as the ``torch.dtype`` a model on ``device`` runs in: ``auto`` is bfloat16 on a CUDA GPU that
    has it (else float16), float32 on MPS and the CPU; float16 on the CPU is refused (module docstring)."""
    device = torch.device(device)
    name = dtype_choice(spec, what)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name == "float16" and device.type == "cpu":
        raise DeviceError(f"{what} float16 is refused on the CPU: half-precision matmuls are emulated there (tens "
                          "of times slower than float32) and some ops have no CPU float16 kernel (torch.ao's dynamic "
                          f"int8); use float32 or bfloat16 on the CPU, or float16 with {device_what} cuda")
    return DTYPES[name]


def dtype_choice(spec: DtypeSpec, what: str = "dtype") -> str:
    """``spec``'s name, ``auto`` or one of :data:`DTYPES` (case and spaces ignored), whatever the device; an
    unknown one raises :class:`DeviceError`."""
    if isinstance(spec, torch.dtype):
        name = next((n for n, d in DTYPES.items() if d == spec), None)
        if name is None:
            raise DeviceError(f"{what} must be {DTYPE_FORMS}, not {spec}")
        return name
    name = str(spec).strip().lower() if isinstance(spec, str) else None
    if name != "auto" and name not in DTYPES:
        raise DeviceError(f"{what} must be {DTYPE_FORMS}, not {spec!r}")
    return name


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how results record a dtype."""
    return str(dtype).replace("torch.", "")


def is_reference_setting(device: torch.device, dtype: torch.dtype) -> bool:
    """True for the CPU in float32, the setting every cached result and content hash was first made in."""
    return device.type == "cpu" and dtype == torch.float32


def model_device(model: Any) -> torch.device:
    """The device of a model's (or a :class:`~trace_lib.models.Loaded`'s) first parameter or buffer; CPU for a
    model with neither."""
    module = getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device | str) -> Any:
    """A tensor, or a mapping whose tensor values (token ids, masks, position ids) are moved to ``device``; other
    values pass as they are. Tensors already there are returned unchanged (no copy), so CPU runs are untouched."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    raise TypeError(f"to_device takes a tensor or a mapping of tensors, not {type(batch).__name__}")


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on a GPU (CUDA or MPS) so a timer measures it; nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def environment(device: torch.device | str | None = None) -> dict:
    """Library versions and the machine a result was computed with (recorded in every model description)."""
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "machine": platform.machine()}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        env["cuda"] = torch.version.cuda or getattr(torch.version, "hip", None)
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())
