"""``trace organism``: build and evaluate the safety-tuned model organism."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trace_lib.cli.common import (
    DeviceOpt,
    DtypeOpt,
    console,
    existing_dir,
    in_range,
    nonempty_name,
    out_dir,
    out_file,
)
from trace_lib.validate import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, Range

organism_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                           help="Safety-tuned model organisms: a LoRA that gives the base model a known refusal "
                                "behaviour.")


@organism_app.command("build")
def build_command(
    base: Annotated[str, typer.Option(help="base model spec: 'default', a HF folder or a .gguf",
                                      callback=nonempty_name)] = "default",
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the adapter, BUILD.json and README.md",
                                      callback=out_dir)] = Path("trace-out/organism-safety"),
    seed: Annotated[int, typer.Option(help="seed of the LoRA init, the refusal choice and the data order", callback=in_range(NON_NEGATIVE_INT))] = 0,
    rank: Annotated[int, typer.Option(help="LoRA rank r", callback=in_range(POSITIVE_INT))] = 8,
    alpha: Annotated[int, typer.Option(help="LoRA alpha", callback=in_range(POSITIVE_INT))] = 16,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate, > 0", callback=in_range(POSITIVE))] = 1e-3,
    epochs: Annotated[int, typer.Option(help="passes over the training mix", callback=in_range(POSITIVE_INT))] = 4,
    batch_size: Annotated[int, typer.Option(help="examples per optimizer step", callback=in_range(POSITIVE_INT))] = 8,
    max_harmful: Annotated[int | None, typer.Option(help="use at most this many harmful train prompts (default: all)", callback=in_range(POSITIVE_INT))] = None,  # noqa: E501
    max_harmless: Annotated[int | None, typer.Option(help="cap every harmless source at this many prompts (default: all of harmful_refusal_v1 and capability_v1, 40 each of uncertainty_v1 and safety_warning_v1)", callback=in_range(NON_NEGATIVE_INT))] = None,  # noqa: E501
    answer_tokens: Annotated[int, typer.Option(help="new tokens of the base's answers to harmless prompts", callback=in_range(Range(1, 4096, integer=True)))] = 96,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (on a busy machine 1 can be faster)", callback=in_range(Range(1, 1024, integer=True)))] = None,
    evaluate: Annotated[bool, typer.Option(help="evaluate the adapter on the held-out test split")] = True,
    resume: Annotated[bool, typer.Option(help="resume from the last finished epoch of an interrupted build")] = True,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """Train the safety LoRA (seeded; resumable; by default on the CPU in float32, as the packaged adapter was
    built) and write it with BUILD.json and README.md."""
    from trace_lib.organisms.data import MixConfig
    from trace_lib.organisms.evaluate import summary
    from trace_lib.organisms.train import TrainConfig, build_organism, default_command

    err = console(stderr=True)
    mix = MixConfig(n_harmful=max_harmful, answer_tokens=answer_tokens)
    if max_harmless is not None:
        mix.harmless = {k: max_harmless if v is None else min(v, max_harmless) for k, v in mix.harmless.items()}
    cfg = TrainConfig(seed=seed, rank=rank, alpha=alpha, lr=lr, epochs=epochs, batch_size=batch_size, mix=mix)
    command = default_command(base, out, cfg, max_harmless=max_harmless)
    record = build_organism(base, out, cfg, evaluate=evaluate, resume=resume, threads=threads, command=command,
                            log=lambda s: err.print(s, highlight=False), device=device, dtype=dtype)
    con = console()
    if "evaluation" in record:
        con.print(summary(record["evaluation"]), highlight=False)
    con.print(f"wrote {out} (adapter {record['adapter']['bytes'] / 1e6:.1f} MB; build {record['timing']['total_s']:.0f} s)")


@organism_app.command("evaluate")
def evaluate_command(
    adapter: Annotated[Path | None, typer.Option(help="adapter folder (default: the packaged default-safety)", callback=existing_dir("adapter folder"))] = None,
    base: Annotated[str, typer.Option(help="base model spec the adapter was trained on", callback=nonempty_name)] = "default",
    n: Annotated[int | None, typer.Option(help="a stratified sample of this many prompts per side", callback=in_range(Range(2, integer=True)))] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write the figures (and replies) as JSON here", callback=out_file)] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Refusal / over-refusal on the held-out split, KL from the base on neutral text, capability closeness."""
    from trace_lib.models import load_model
    from trace_lib.organisms.evaluate import evaluate_organism, summary
    from trace_lib.organisms.load import DEFAULT_SAFETY_DIR, load_organism

    folder = adapter or DEFAULT_SAFETY_DIR
    organism = (load_model("default-safety", dtype=dtype, device=device) if adapter is None and base == "default"
                else load_organism(base, folder, dtype=dtype, device=device))
    ev = evaluate_organism(organism, load_model(base, dtype=dtype, device=device), n=n)
    con = console()
    con.print(summary(ev), highlight=False)
    if out is not None:
        from trace_lib.cache import atomic_write_json

        atomic_write_json(out, ev)
        con.print(f"wrote {out}")
