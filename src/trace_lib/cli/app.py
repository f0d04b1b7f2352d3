"""The ``trace`` command: the typer app, its small commands, and the exit-status contract.

Exit status (docs/cli.md): 0 success; 1 an internal error (a bug in trace: the traceback is printed for a
report); 2 a mistake in what the user gave (a usage error from typer, or a :class:`TraceError`, one line);
130 interrupted (Ctrl-C or SIGTERM: cached results are kept and the next run resumes from them; see
:mod:`trace_lib.cli.interrupts`).
"""

from __future__ import annotations

import os
import sys
import warnings

import typer
from rich.markup import escape

import trace_lib
from trace_lib.cli import interrupts
from trace_lib.cli.common import DeviceOpt, DtypeOpt, ModelOpt, console
from trace_lib.errors import TraceError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="trace: did quantizing this model quietly damage its internal safety mechanisms?")

INTERRUPTED = "interrupted; cached results are kept and the next run resumes from them"


@app.command()
def configs() -> None:
    """List the quantization config names trace understands."""
    from trace_lib.quant.config import __doc__ as doc

    console().print(doc.split("\n\n", 2)[2] if doc else "")


@app.command()
def hooks(model: ModelOpt = "default", device: DeviceOpt = "auto", dtype: DtypeOpt = "auto") -> None:
    """List a model's hook points (TransformerLens names)."""
    from trace_lib.models import load_model

    loaded = load_model(model, dtype=dtype, device=device)
    names = loaded.arch.hook_names()
    out = console()
    out.print(f"{loaded.name}: {loaded.arch.family}, {loaded.n_layers} blocks, d_model {loaded.d_model}, "
              f"{len(names)} hook points")
    for n in names:
        out.print(n)


@app.command()
def version() -> None:
    """Print trace's version."""
    console().print(trace_lib.__version__)


def _register() -> None:
    from trace_lib.cli.audit import audit_command
    from trace_lib.cli.compare import compare_command
    from trace_lib.cli.graph import graph_app
    from trace_lib.cli.localize import localize_command
    from trace_lib.cli.organism import organism_app
    from trace_lib.cli.redteam import redteam_command
    from trace_lib.cli.repair import repair_command
    from trace_lib.cli.report import report_command
    from trace_lib.cli.sae import sae_app
    from trace_lib.cli.sweep import sweep_command
    from trace_lib.cli.tracer import tracer_command

    for name, fn in (("compare", compare_command), ("audit", audit_command), ("sweep", sweep_command),
                     ("redteam", redteam_command), ("report", report_command), ("tracer", tracer_command),
                     ("localize", localize_command), ("repair", repair_command)):
        app.command(name)(fn)
    app.add_typer(organism_app, name="organism")
    app.add_typer(sae_app, name="sae")
    app.add_typer(graph_app, name="graph")


_register()


def _quiet_libraries() -> None:
    """Only trace's own output on screen: no library warnings, and library progress bars only where trace
    shows its own (a terminal, ``TRACE_QUIET`` unset)."""
    from trace_lib.progress import enabled

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not enabled():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!trace_lib)")


def _click_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors, exits, aborts): typer 0.29 vendors its own click (``typer._click``) and its own Exit and
    Abort (``typer.exceptions``); older typers use click's. Both are listed, so either is caught."""
    import importlib

    errors, exits, aborts = [], [], []
    for mod, err, ex, ab in (("typer._click.exceptions", "ClickException", None, None),
                             ("typer.exceptions", None, "Exit", "Abort"),
                             ("click.exceptions", "ClickException", "Exit", "Abort")):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        for names, found in ((err, errors), (ex, exits), (ab, aborts)):
            if names and hasattr(m, names):
                found.append(getattr(m, names))
    return tuple(errors), tuple(exits), tuple(aborts)


def main(argv: list[str] | None = None) -> None:
    """Entry point: returns on success, else exits with the status of the contract in the module docstring."""
    err = console(stderr=True)
    _quiet_libraries()
    as_program = argv is None
    if as_program:  # a host that calls main(argv) keeps its own signal handling
        interrupts.install()
    usage_errors, exits, aborts = _click_types()
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="trace")
    except TraceError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        interrupts.stop_and_exit(INTERRUPTED, err, hard=as_program)
    except usage_errors as e:  # unknown option or command, missing or non-numeric value: typer's usage text
        e.show()
        sys.exit(e.exit_code)
    except exits as e:
        if e.exit_code:
            sys.exit(e.exit_code)
        return
    except aborts:
        interrupts.stop_and_exit(INTERRUPTED, err, hard=as_program)
    except BrokenPipeError:  # `trace configs | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except Exception:
        import traceback

        err.print("internal error: this is a bug in trace, not in what you gave it; please report it with the "
                  "traceback below", highlight=False)
        traceback.print_exc()
        sys.exit(1)
    # In non-standalone mode typer *returns* the status of an Exit it caught; Ctrl-C becomes Exit(130).
    if rv == 130:
        interrupts.stop_and_exit(INTERRUPTED, err, hard=as_program)
    if isinstance(rv, int) and rv:
        sys.exit(rv)
