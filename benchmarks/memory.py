"""Peak memory (RSS) of loading a reference, building one variant and a full ``trace audit`` of one variant,
as multiples of the reference's weight bytes.

Usage: python benchmarks/memory.py [--model default-safety] [--variant gguf-q4_0] [--extra gemma3-270m]
                                   [--no-audit] [--cache DIR] [--where]

Every measurement runs in a fresh subprocess; its peak RSS is the child's ``ru_maxrss`` as ``os.wait4`` reports
it for that one child (Linux: KiB). The children:

- ``imports``: builds the variant of a tiny random Llama, then exits: the fixed cost (interpreter, torch,
  transformers, trace and the variant's backend) every run pays before any real weight is loaded;
- ``load``: ``load_model(spec)``, then every weight read once (``load_model`` may memory-map a safetensors file,
  whose pages count as resident only once read); it also reports the weight bytes (sum of the parameters'
  ``nbytes``, tied weights once) and, with psutil, the RSS held after loading and after reading;
- ``variant``: ``load_model`` then ``quantize(ref, variant)`` (what trace builds: unchanged tensors shared with
  the reference), and the held RSS after building;
- ``variant-deepcopy``: the same variant built as before issue 18 (deep copy of the reference, then quantized in
  place; same backends), for comparison;
- ``audit``: ``python -m trace_lib audit --model spec --variant V`` (the default dataset, hooks and SAEs) in the
  cache given (default: a fresh folder with the converted models copied in, so the audit's first run);
- ``where`` (with ``--where``): the same audit run once more inside a child that samples its RSS and call stack
  every 0.25 s, to say which part of the audit holds the memory at its peak.

Prints one JSON line per measurement with ``peak_rss_bytes``, ``multiple`` (peak / weight bytes) and
``multiple_above_imports`` ((peak - imports peak) / weight bytes), then one line of projections for 1B, 8B and
70B-parameter fp32 models: ``peak(P) = imports + P * bytes_per_param``, with ``bytes_per_param`` = (measured peak -
imports peak) / measured parameter count of the model measured (``--model``). That assumes everything above the
import cost scales with the parameter count, which holds for weights and their copies; the audit's activations,
SAEs and caches scale with width and depth, not with the parameter count, so its projection is a rough one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT_PARAMS = {"1B": 1e9, "8B": 8e9, "70B": 70e9}


# ----------------------------------------------------------------------------- children (run in a fresh process)

def _held_rss() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def _weight_bytes(model) -> tuple[int, int]:
    """(bytes, count) of the model's parameters; ``parameters()`` yields a tied tensor once."""
    params = list(model.parameters())
    return sum(p.nbytes for p in params), sum(p.numel() for p in params)


def _old_build(loaded, config):
    """The variant as ``quantize`` built it before issue 18: deep copy, then the same backends in place."""
    import copy

    from trace_lib.quant import apply as A
    from trace_lib.quant.linears import assign_linears, convert_conv1d, quantizable_linears

    model = copy.deepcopy(loaded.model)
    model.eval()
    convert_conv1d(model)
    if config.overrides:
        A._apply_mixed(model, assign_linears(model, config), loaded)
    else:
        linears = quantizable_linears(model, config.skip) if config.type.value != "fp32" or config.act_bits else []
        A._apply_one(model, config, linears, loaded)
    return model


def _tiny_variant(variant: str) -> None:
    """Build ``variant`` of a tiny random Llama (a few hundred KB): imports every module the build needs."""
    import torch
    import transformers as T

    from trace_lib.models import from_model
    from trace_lib.quant import quantize

    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    with torch.no_grad():
        quantize(from_model(T.LlamaForCausalLM(cfg).eval(), name="tiny"), variant).model(torch.tensor([[1, 2, 3]]))


def child(kind: str, spec: str, variant: str) -> None:
    import torch

    import trace_lib
    from trace_lib.quant import parse_config, quantize

    _tiny_variant(variant)  # the fixed cost: interpreter, torch, transformers, trace and the variant's backend
    out: dict = {}
    if kind != "imports":
        ref = trace_lib.load_model(spec)
        out["weight_bytes"], out["params"] = _weight_bytes(ref.model)
        out["dtype"] = str(ref.dtype).replace("torch.", "")
        out["held_rss_after_load"] = _held_rss()
        with torch.no_grad():  # read every weight once: a memory-mapped file is resident only once it is read
            for p in ref.model.parameters():
                p.sum()
        out["held_rss_weights_read"] = _held_rss()
        if kind == "variant":
            var = quantize(ref, variant)
            out["held_rss_after_build"] = _held_rss()
            out["seconds_to_build"] = var.quant_info["seconds_to_build"]
        elif kind == "variant-deepcopy":
            model = _old_build(ref, parse_config(variant))
            out["held_rss_after_build"] = _held_rss()
            del model
    print("MEMORY " + json.dumps(out), flush=True)


def where(argv: list[str]) -> None:
    """Run ``trace <argv>`` in this process, sampling RSS (psutil) and the main thread's trace_lib call stack
    every 0.25 s; print the stack at the peak and the largest RSS seen in each phase (what dominates)."""
    import threading
    import time
    import traceback

    import psutil

    proc, main_id, samples, stop = psutil.Process(), threading.main_thread().ident, [], threading.Event()

    def chain() -> list[str]:
        frames = traceback.extract_stack(sys._current_frames().get(main_id))
        return [f"{f.filename.rsplit('trace_lib/', 1)[-1]}:{f.name}" for f in frames if "trace_lib" in f.filename]

    def sample() -> None:
        t0 = time.perf_counter()
        while not stop.is_set():
            samples.append((round(time.perf_counter() - t0, 1), proc.memory_info().rss, chain()))
            time.sleep(0.25)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    from trace_lib.cli import main as cli

    sys.argv = ["trace", *argv]
    try:
        cli()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        stop.set()
        thread.join()
    peak = max(samples, key=lambda s: s[1])
    phases: dict[str, dict] = {}  # the two calls below the command's entry (cli/app, cli/audit, audit/session)
    for t, rss, c in samples:
        ph = phases.setdefault(" > ".join(c[3:5]) or "(imports, loading)", {"from_s": t, "max_rss_bytes": 0})
        ph["max_rss_bytes"] = max(ph["max_rss_bytes"], rss)
        ph["to_s"] = t
    print("MEMORY " + json.dumps({"peak_at_s": peak[0], "peak_stack": peak[2],
                                  "phases": [{"phase": k, **v} for k, v in phases.items()]}), flush=True)


# ----------------------------------------------------------------------------- parent

def _run(cmd: list[str], env: dict[str, str]) -> tuple[int, dict, str]:
    """Run ``cmd``; return (peak RSS bytes of that child, its MEMORY record, the tail of its output)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {text[-2000:]}")
    record = next((json.loads(line[7:]) for line in text.splitlines() if line.startswith("MEMORY ")), {})
    return usage.ru_maxrss * 1024, record, text[-2000:]


def _fresh_cache() -> Path:
    """A new cache folder with the converted models copied in (conversion is a one-off, not part of a run)."""
    cache = Path(tempfile.mkdtemp(prefix="trace-mem-"))
    src = Path(os.environ.get("TRACE_CACHE", Path.home() / ".cache" / "trace-lib"))
    if (src / "models").is_dir():
        shutil.copytree(src / "models", cache / "models")
    if (src / "file-hashes.json").is_file():
        shutil.copy(src / "file-hashes.json", cache / "file-hashes.json")
    return cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default-safety", help="the reference (default: what `trace audit` audits)")
    ap.add_argument("--variant", default="gguf-q4_0")
    ap.add_argument("--extra", default="gemma3-270m", help="comma-separated specs measured for load and variant too "
                                                         "('' for none); skipped with a note if one does not load")
    ap.add_argument("--no-audit", action="store_true")
    ap.add_argument("--cache", default=None, help="TRACE_CACHE for the audit (default: a fresh folder)")
    ap.add_argument("--where", action="store_true", help="also run the audit once more in a sampled process and "
                                                          "print where its memory goes (psutil needed)")
    ap.add_argument("--child", choices=["imports", "load", "variant", "variant-deepcopy", "where"],
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "where":
        with tempfile.TemporaryDirectory(prefix="trace-mem-out-") as out:
            where(["audit", "--model", args.model, "--variant", args.variant, "--out", out])
        return
    if args.child:
        child(args.child, args.model, args.variant)
        return

    sys.path.insert(0, str(HERE))
    from _common import emit, machine

    env = {**os.environ, "TRACE_QUIET": "1"}
    me = [sys.executable, str(HERE / "memory.py")]
    base_peak, _, _ = _run([*me, "--child", "imports"], env)
    emit({"benchmark": "memory", "measurement": "imports", "peak_rss_bytes": base_peak, **machine()})
    measured: dict[str, dict] = {}
    for spec in [args.model, *[s for s in args.extra.split(",") if s]]:
        try:
            peak, rec, _ = _run([*me, "--child", "load", "--model", spec], env)
        except SystemExit as e:
            emit({"benchmark": "memory", "model": spec, "skipped": str(e).splitlines()[-1][:300]})
            continue
        wb = rec["weight_bytes"]
        measured[spec] = {"weight_bytes": wb, "params": rec["params"], "load": peak}

        def line(what: str, peak: int, extra: dict, spec=spec, wb=wb, rec=rec) -> None:
            emit({"benchmark": "memory", "model": spec, "measurement": what, "variant": args.variant,
                  "params": rec["params"], "dtype": rec["dtype"], "weight_bytes": wb, "peak_rss_bytes": peak,
                  "multiple": round(peak / wb, 3), "multiple_above_imports": round((peak - base_peak) / wb, 3),
                  **{k: v for k, v in extra.items() if v is not None}, **machine()})

        line("load", peak, {k: rec.get(k) for k in ("held_rss_after_load", "held_rss_weights_read")})
        for kind in ("variant", "variant-deepcopy"):
            p, r, _ = _run([*me, "--child", kind, "--model", spec, "--variant", args.variant], env)
            measured[spec][kind] = p
            line(kind, p, {k: r.get(k) for k in ("held_rss_weights_read", "held_rss_after_build", "seconds_to_build")})
    if not args.no_audit and args.model in measured:
        cache = Path(args.cache) if args.cache else _fresh_cache()
        out = Path(tempfile.mkdtemp(prefix="trace-mem-out-"))
        audit = ["audit", "--model", args.model, "--variant", args.variant, "--out", str(out)]
        peak, _, _ = _run([sys.executable, "-m", "trace_lib", *audit], {**env, "TRACE_CACHE": str(cache)})
        m = measured[args.model]
        measured[args.model]["audit"] = peak
        emit({"benchmark": "memory", "model": args.model, "measurement": "audit", "variant": args.variant,
              "cache": "fresh (first run)" if not args.cache else str(cache), "params": m["params"],
              "weight_bytes": m["weight_bytes"], "peak_rss_bytes": peak, "multiple": round(peak / m["weight_bytes"], 3),
              "multiple_above_imports": round((peak - base_peak) / m["weight_bytes"], 3),
              "goal": "audit peak <= 2.3 x weight bytes", "met": peak <= 2.3 * m["weight_bytes"], **machine()})
        if args.where:  # the same audit again, sampled; in a fresh cache again unless --cache was given
            if not args.cache:
                shutil.rmtree(cache, ignore_errors=True)
                cache = _fresh_cache()
            p, rec, _ = _run([*me, "--child", "where", "--model", args.model, "--variant", args.variant],
                             {**env, "TRACE_CACHE": str(cache)})
            emit({"benchmark": "memory", "model": args.model, "measurement": "audit-where", "variant": args.variant,
                  "peak_rss_bytes": p, **rec})
        if not args.cache:
            shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    if args.model in measured:
        m = measured[args.model]
        proj = {}
        for what in ("load", "variant", "variant-deepcopy", "audit"):
            if what not in m:
                continue
            bpp = (m[what] - base_peak) / m["params"]
            proj[what] = {"bytes_per_param": round(bpp, 3),
                          **{size: round((base_peak + n * bpp) / 1e9, 1) for size, n in PROJECT_PARAMS.items()}}
        emit({"benchmark": "memory", "measurement": "projection", "model": args.model,
              "formula": "peak_GB(P) = (imports_peak + P * bytes_per_param) / 1e9, bytes_per_param = "
                         "(measured peak - imports_peak) / measured params",
              "imports_peak_bytes": base_peak, "projected_peak_GB": proj})


if __name__ == "__main__":
    main()
