"""``trace sae``: build the SAE pack a model ships with."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from trace_lib.cli.common import (
    DeviceOpt,
    DtypeOpt,
    SafetyModelOpt,
    console,
    in_range,
    nonempty_name,
    out_dir,
)
from trace_lib.validate import Range

sae_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="SAEs: train a model's SAEs once and ship them (SAELens format, checksummed).")


@sae_app.command("build")
def build_command(
    model: SafetyModelOpt = "default-safety",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="pack folder (default: the folder the model's spec "
                                             "ships, else trace-out/saes)", callback=out_dir)] = None,
    hook: Annotated[list[str] | None, typer.Option("--hook", callback=nonempty_name, help="hook point; repeatable (default: resid_post after 6 blocks spread over the depth)")] = None,  # noqa: E501
    threads: Annotated[int | None, typer.Option(help="torch CPU threads", callback=in_range(Range(1, 1024, integer=True)))] = None,  # noqa: E501
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Train the model's SAEs on the broad corpus (cached; resumable), write them in float16 with a checksummed
    manifest, and measure them as written on the corpus's held-out split."""
    import torch

    from trace_lib.models import load_model
    from trace_lib.models.specs import get_spec
    from trace_lib.sae.build import build_sae_pack

    if threads:
        torch.set_num_threads(threads)
    spec = get_spec(model)
    folder = out or (spec.sae_pack if spec is not None and spec.sae_pack is not None else Path("trace-out/saes"))
    command = shlex.join(["trace", "sae", "build", "--model", model, *[a for h in hook or [] for a in ("--hook", h)]]
                         + (["--out", str(out)] if out is not None else []))
    err = console(stderr=True)
    pack = build_sae_pack(load_model(model, dtype=dtype, device=device), folder, hooks=hook or None,
                          build_command=command,
                          log=lambda s: err.print(s, highlight=False))
    con = console()
    for h in pack.hooks:
        q = pack.manifest["quality"][h]
        con.print(f"{h}: held-out EV {q['explained_variance']:.3f}, L0 {q['l0']:.1f}, "
                  f"CE-loss recovered {q['ce_loss_recovered']:.3f}", highlight=False)
    size = sum((pack.folder / rel).stat().st_size for rel in pack.manifest["files"])
    con.print(f"wrote {pack.folder} ({len(pack.hooks)} SAEs, {size / 1e6:.1f} MB)")
