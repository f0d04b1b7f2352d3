"""The report's figures: matplotlib (Agg) rendered to inline SVG strings, byte-for-byte deterministic.

Every function takes plain numbers and names (never a result object) and returns one ``<svg>...</svg>``
string ready to paste into an HTML page: no XML prologue, no DOCTYPE, no metadata (no dates, no URLs),
text kept as ``<text>`` (no font files, no glyph paths), and every ``id`` prefixed with the figure's own
prefix so that several figures in one page never share an id. The same numbers give the same bytes
(``svg.hashsalt`` is fixed; matplotlib escapes the text it writes).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence

from trace_lib.errors import TraceError

SAFETY_COLOR = "#c0392b"
CAPABILITY_COLOR = "#2471a3"
ALL_COLOR = "#7f8c8d"
PALETTE = ["#2471a3", "#c0392b", "#27ae60", "#8e44ad", "#d68910", "#17a589", "#5d6d7e", "#a04000", "#1f618d",
           "#b03a2e"]
SCALE = 1.3 * 4 / 3  # pt -> CSS px, enlarged 1.3x
KLD_PERCENTILES = ["min", "0.1", "1", "5", "10", "median", "90", "95", "99", "99.9", "max"]

_RC = {
    "svg.hashsalt": "trace-report",
    "svg.fonttype": "none",
    "svg.id": None,
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
    "path.simplify": False,
    "text.usetex": False,
}


def _plt():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency of the report
        raise TraceError("the HTML report needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _rc() -> dict:
    import matplotlib

    return {k: v for k, v in _RC.items() if k in matplotlib.rcParams}


def label(text: object) -> str:
    """A string as matplotlib should show it literally: ``$`` would start mathtext."""
    return str(text).replace("\\", "\\\\").replace("$", r"\$")


def _num(x) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return math.nan
    return x


def _finite(x) -> bool:
    return not math.isnan(_num(x)) and not math.isinf(_num(x))


_ID = re.compile(r'\bid="([^"]+)"')


def to_svg(fig, prefix: str, title: str = "") -> str:
    """Render a figure to an inline ``<svg>`` string (and close it)."""
    plt = _plt()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None},
                bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg, count=2)
    svg = re.sub(r'\s+version="1\.1"', "", svg, count=1)
    ids = sorted(set(_ID.findall(svg)), key=len, reverse=True)
    for old in ids:
        new = f"{prefix}-{old}"
        svg = svg.replace(f'id="{old}"', f'id="{new}"').replace(f'"#{old}"', f'"#{new}"') \
                 .replace(f"url(#{old})", f"url(#{new})")
    # matplotlib sizes the figure in pt; show it 1.3x larger (the viewBox keeps the drawing in proportion).
    svg = re.sub(r'^<svg([^>]*?) width="([\d.]+)pt" height="([\d.]+)pt"',
                 lambda m: f'<svg{m.group(1)} width="{float(m.group(2)) * SCALE:.0f}" '
                           f'height="{float(m.group(3)) * SCALE:.0f}"', svg, count=1)
    svg = svg.replace("<svg ", f'<svg class="plot" role="img" data-plot="{prefix}" ', 1)
    if title:
        from html import escape

        svg = svg.replace(">", f"><title>{escape(title, quote=True)}</title>", 1)
    return svg.strip() + "\n"


def _figure(n_panels: int = 1, width: float = 4.2, height: float = 3.0, sharey: bool = True):
    fig, axes = _plt().subplots(1, n_panels, figsize=(width * n_panels, height), sharey=sharey, squeeze=False)
    return fig, list(axes[0])


def _render(build, prefix: str, title: str) -> str:
    """Run ``build()`` (which makes and fills a figure) and render it, all under the report's rcParams."""
    import matplotlib

    _plt()
    with matplotlib.rc_context(_rc()):
        fig = build()
        return to_svg(fig, prefix, title)


# ------------------------------------------------------------------------------------------------ figures
def decay_curves_svg(curves: dict[str, list[dict]], min_cpfr: float | None = 0.9, prefix: str = "decay") -> str:
    """Safety- and capability-feature CPFR (and the whole dictionary's) against bits, one panel per ladder."""
    ladders = [(k, v) for k, v in curves.items() if v]
    if not ladders:
        return ""

    def build():
        fig, axes = _figure(len(ladders), 5.2, 3.8)
        for ax, (ladder, pts) in zip(axes, ladders):
            pts = sorted(pts, key=lambda p: -_num(p.get("bits")))
            xs = [_num(p.get("bits")) for p in pts]
            for key, name, color, style in (("safety_cpfr", "safety features", SAFETY_COLOR, "-o"),
                                            ("capability_cpfr", "capability features", CAPABILITY_COLOR, "-s"),
                                            ("all_features_cpfr", "all SAE features", ALL_COLOR, "--^")):
                ys = [_num(p.get(key)) for p in pts]
                if any(_finite(y) for y in ys):
                    ax.plot(xs, ys, style, color=color, label=name, markersize=4, linewidth=1.4)
            if min_cpfr is not None:
                ax.axhline(min_cpfr, color="#555555", linewidth=0.8, linestyle=":", label=f"bar {min_cpfr:g}")
            ax.set_xlabel(label(f"bits ({ladder} ladder)"))
            finite = [x for x in xs if _finite(x)]
            if len(finite) > 1 and min(finite) > 0 and max(finite) / min(finite) > 4:
                ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(set(finite)))
            ax.set_xticklabels([f"{x:g}" for x in sorted(set(finite))])
            ax.minorticks_off()
            ax.invert_xaxis()
            top = ax.secondary_xaxis("top")
            top.set_xticks([x for x in xs if _finite(x)])
            top.set_xticklabels([label(p.get("config", "")) for x, p in zip(xs, pts) if _finite(x)], rotation=40,
                                ha="left", fontsize=7)
            top.minorticks_off()
        lowest = min([_num(p.get(k)) for _, pts in ladders for p in pts for k in ("safety_cpfr", "capability_cpfr",
                                                                              "all_features_cpfr")
                      if _finite(p.get(k))], default=0.0)
        axes[0].set_ylabel("CPFR (reference = 1)")
        axes[0].set_ylim(min(-0.02, lowest - 0.05), 1.05)
        axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
        fig.tight_layout()
        return fig

    return _render(build, prefix, "Decay curves: CPFR of safety vs capability features against bits")


def cpfr_bars_svg(names: Sequence[str], safety: Sequence[float], capability: Sequence[float],
                  threshold: float | None = None, prefix: str = "cpfr-bars") -> str:
    """Per variant: mean CPFR of the safety features next to that of the capability features."""
    if not names:
        return ""

    def build():
        import numpy as np

        fig, (ax,) = _figure(1, max(5.0, 1.1 * len(names) + 2.0), 3.8)
        x = np.arange(len(names))
        s = [_num(v) for v in safety]
        c = [_num(v) for v in capability]
        ax.bar(x - 0.2, [v if _finite(v) else 0 for v in s], 0.4, color=SAFETY_COLOR, label="safety features")
        ax.bar(x + 0.2, [v if _finite(v) else 0 for v in c], 0.4, color=CAPABILITY_COLOR, label="capability features")
        for xi, v in zip(x, s):
            ax.annotate("n/a" if not _finite(v) else f"{v:.3f}", (xi - 0.2, v if _finite(v) else 0), ha="center",
                        va="bottom", fontsize=6, xytext=(0, 1), textcoords="offset points")
        for xi, v in zip(x, c):
            ax.annotate("n/a" if not _finite(v) else f"{v:.3f}", (xi + 0.2, v if _finite(v) else 0), ha="center",
                        va="bottom", fontsize=6, xytext=(0, 1), textcoords="offset points")
        if threshold is not None:
            ax.axhline(threshold, color="#555555", linewidth=0.8, linestyle=":",
                       label=f"degraded below {threshold:g} (per feature)")
        ax.set_xticks(x)
        tilt = len(names) > 1 and max(len(str(n)) for n in names) > 8
        ax.set_xticklabels([label(n) for n in names], rotation=25 if tilt else 0, ha="right" if tilt else "center")
        ax.set_ylim(min(0.0, min([v for v in s + c if _finite(v)], default=0.0) - 0.05), 1.12)
        ax.set_ylabel("mean CPFR (reference = 1)")
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
        fig.tight_layout()
        return fig

    return _render(build, prefix, "Mean CPFR of safety and capability features per variant")


def kld_percentiles_svg(per_variant: dict[str, dict[str, float]], prefix: str = "kld") -> str:
    """The llama.cpp KL-divergence percentiles of each variant (log scale; zeros drawn at the floor)."""
    series = {n: [_num(p.get(k)) for k in KLD_PERCENTILES] for n, p in per_variant.items() if p}
    if not series:
        return ""

    def build():
        fig, (ax,) = _figure(1, 7.5, 3.8)
        positive = [v for ys in series.values() for v in ys if _finite(v) and v > 0]
        floor = min(positive) / 10 if positive else 1e-6
        xs = list(range(len(KLD_PERCENTILES)))
        all_zero = []
        for i, (name, ys) in enumerate(series.items()):
            if not any(_finite(v) and v > 0 for v in ys):
                all_zero.append(name)
                continue
            ax.plot(xs, [max(v, floor) if _finite(v) else math.nan for v in ys], "-o", markersize=3,
                    color=PALETTE[i % len(PALETTE)], label=label(name), linewidth=1.2)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_xticks(xs)
        ax.set_xticklabels([k if k in ("min", "max", "median") else f"{k}%" for k in KLD_PERCENTILES], fontsize=7)
        ax.set_xlabel("percentile of per-token KL(reference || variant)")
        ax.set_ylabel("KLD (nats)")
        if all_zero:
            ax.text(0.01, 0.98, label("identical to the reference (KLD 0): " + ", ".join(all_zero)),
                    transform=ax.transAxes, fontsize=7, va="top", color="#555555")
        if len(series) > len(all_zero):
            ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
        fig.tight_layout()
        return fig

    return _render(build, prefix, "KL-divergence percentiles per variant")


def hook_cpfr_svg(hooks: Sequence[str], variants: Sequence[str], features: dict[tuple[str, str], dict[str, list]],
                  whole: dict[tuple[str, str], float], threshold: float | None = None, prefix: str = "hook-cpfr") -> str:
    """Per hook (one panel each), per variant: every fingerprint feature's CPFR (safety and capability points)
    and the whole dictionary's CPFR (a bar)."""
    if not hooks or not variants:
        return ""

    def build():
        import numpy as np

        fig, axes = _figure(len(hooks), max(4.0, 0.9 * len(variants) + 1.8), 3.8)
        x = np.arange(len(variants))
        for ax, h in zip(axes, hooks):
            ax.bar(x, [whole.get((h, v), 0) if _finite(whole.get((h, v))) else 0 for v in variants], 0.7,
                   color="#d5dbdb", label="all SAE features")
            for kind, color, off, marker in (("safety", SAFETY_COLOR, -0.15, "o"),
                                             ("capability", CAPABILITY_COLOR, 0.15, "s")):
                xs, ys = [], []
                for i, v in enumerate(variants):
                    vals = sorted(_num(y) for y in features.get((h, v), {}).get(kind, []) if _finite(y))
                    n = len(vals)
                    for j, y in enumerate(vals):  # deterministic spread instead of random jitter
                        xs.append(i + off + (0.1 * (j / (n - 1) - 0.5) if n > 1 else 0))
                        ys.append(y)
                if ys:
                    ax.scatter(xs, ys, s=9, color=color, marker=marker, alpha=0.75, label=f"{kind} features",
                               linewidths=0)
            if threshold is not None:
                ax.axhline(threshold, color="#555555", linewidth=0.8, linestyle=":")
            ax.set_title(label(h), fontsize=8)
            ax.set_xticks(x)
            ax.set_xticklabels([label(v) for v in variants], rotation=30, ha="right", fontsize=7)
        lowest = min([_num(y) for fs in features.values() for ys in fs.values() for y in ys if _finite(y)], default=0.0)
        axes[0].set_ylabel("CPFR per feature")
        axes[0].set_ylim(min(-0.02, lowest - 0.05), 1.05)
        axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
        fig.tight_layout()
        return fig

    return _render(build, prefix, "CPFR distribution per hook and variant")


# ------------------------------------------------------------------------------------------------ tracer figures
LEVEL_COLORS = {"ok": CAPABILITY_COLOR, "warning": "#d68910", "critical": SAFETY_COLOR}


def _series(xs: Sequence, ys: Sequence) -> tuple[list[float], list[float]]:
    """The (x, y) pairs whose y is finite."""
    pts = [(_num(x), _num(y)) for x, y in zip(xs, ys) if _finite(y) and _finite(x)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _layer_axis(ax, layers: Sequence) -> None:
    finite = sorted({int(_num(x)) for x in layers if _finite(x)})
    if finite and len(finite) <= 16:
        ax.set_xticks(finite)
    ax.set_xlabel("layer")


def quant_error_svg(layers: Sequence[int], cosine: Sequence[float | None], snr_db: Sequence[float | None],
                    levels: Sequence[str | None], thresholds: dict, identical: Sequence[bool] = (),
                    prefix: str = "quant-error") -> str:
    """Per layer: cosine and SNR (dB) of the variant's ``resid_post`` against the reference's, points coloured by
    level, with the warning and critical thresholds drawn. Identical layers (SNR infinite) are listed, not drawn."""
    if not layers:
        return ""
    th = {k: _num(v) for k, v in (thresholds or {}).items()}
    same = [bool(x) for x in identical] + [False] * (len(layers) - len(identical))

    def build():
        fig, (ax_c, ax_s) = _figure(2, 4.6, 3.4, sharey=False)
        wc, ws, cc, cs = (th.get(k) for k in ("warning_cosine", "warning_snr_db", "critical_cosine",
                                              "critical_snr_db"))
        names = {"warning": f"warning: cosine < {_num(wc):g} or SNR < {_num(ws):g} dB",
                 "critical": f"critical: cosine < {_num(cc):g} or SNR < {_num(cs):g} dB"}
        for ax, ys, warn, crit, name in ((ax_c, cosine, wc, cc, "cosine"),
                                         (ax_s, [None if s else y for y, s in zip(snr_db, same)], ws, cs,
                                          "SNR (dB)")):
            legend = ax is ax_s
            xs, vals = _series(layers, ys)
            if xs:
                ax.plot(xs, vals, "-", color="#7f8c8d", linewidth=1.0, zorder=1)
                for lv in ("ok", "warning", "critical"):
                    pts = [(x, y) for x, y, lvl in zip(layers, ys, levels) if lvl == lv and _finite(y)]
                    if pts:
                        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=16, color=LEVEL_COLORS[lv],
                                   label=f"layer {lv}" if legend else None, zorder=2, linewidths=0)
            if warn is not None and _finite(warn):
                ax.axhline(warn, color=LEVEL_COLORS["warning"], linewidth=0.9, linestyle="--",
                           label=names["warning"] if legend else None)
            if crit is not None and _finite(crit):
                ax.axhline(crit, color=LEVEL_COLORS["critical"], linewidth=0.9, linestyle=":",
                           label=names["critical"] if legend else None)
            ax.set_ylabel(name)
            _layer_axis(ax, layers)
        inf_layers = [str(x) for x, s in zip(layers, same) if s]
        if inf_layers:
            ax_s.text(0.01, 0.02, label("identical to the reference (SNR ∞) at layer " + ", ".join(inf_layers)),
                      transform=ax_s.transAxes, fontsize=7, va="bottom", color="#555555")
        if not any(_finite(y) for y in snr_db):
            ax_s.set_ylim(0, max(40.0, (th.get("warning_snr_db") or 20.0) * 2))
        ax_c.set_title("cosine to the reference")
        ax_s.set_title("signal-to-noise ratio")
        ax_s.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
        fig.tight_layout()
        return fig

    return _render(build, prefix, "Quantization error per layer: cosine and SNR against the reference")


def logit_lens_svg(layers: Sequence[int], kl_to_final: Sequence[float | None], final_rank: Sequence[int | None],
                   decisive_layer: int | None = None, final_token: str | None = None,
                   prefix: str = "logit-lens") -> str:
    """Per layer: KL(p_final || p_layer) and the rank of the final top-1 token (symmetric log scale: 0 is top-1),
    with the decisive layer (from which the final top-1 stays top-1) marked."""
    if not layers:
        return ""

    def build():
        fig, (ax_k, ax_r) = _figure(2, 4.6, 3.4, sharey=False)
        xs, ys = _series(layers, kl_to_final)
        if xs:
            ax_k.plot(xs, ys, "-o", color=CAPABILITY_COLOR, markersize=3.5, linewidth=1.3)
        ax_k.set_ylabel("KL(final || layer), nats")
        ax_k.set_title("KL to the final distribution")
        xs, ys = _series(layers, final_rank)
        if xs:
            ax_r.plot(xs, ys, "-o", color=SAFETY_COLOR, markersize=3.5, linewidth=1.3)
        from matplotlib.ticker import FuncFormatter

        ax_r.set_yscale("symlog", linthresh=1)
        ax_r.set_ylim(bottom=-0.3, top=max([1.0] + ys) * 3)
        ax_r.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax_r.set_ylabel("rank (0 = top-1, log scale)")
        tok = f" {final_token!r}" if final_token is not None else ""
        ax_r.set_title(label(f"rank of the final top-1{tok}"))
        if decisive_layer is not None and _finite(decisive_layer):
            for ax in (ax_k, ax_r):
                ax.axvline(_num(decisive_layer), color="#1e8449", linewidth=1.0, linestyle="--",
                           label=f"decisive layer {int(_num(decisive_layer))}")
            ax_r.legend(loc="upper right", fontsize=8)
        for ax in (ax_k, ax_r):
            _layer_axis(ax, layers)
        fig.tight_layout()
        return fig

    return _render(build, prefix, "Logit lens: KL to the final distribution and rank of the final top-1 per layer")


def attention_entropy_svg(layers: Sequence[int], entropies: Sequence[Sequence[float]],
                          uniform: Sequence[float | None] = (), prefix: str = "attention") -> str:
    """Per layer: the attention entropy (nats) of every traced head and query (points), their mean (line) and,
    where given, the entropy of uniform attention over the keys (ln n_keys, dotted)."""
    if not layers or not any(any(_finite(e) for e in es) for es in entropies):
        return ""

    def build():
        fig, (ax,) = _figure(1, 6.0, 3.4)
        px, py, mx, my = [], [], [], []
        for x, es in zip(layers, entropies):
            vals = sorted(_num(e) for e in es if _finite(e))
            n = len(vals)
            for j, y in enumerate(vals):  # deterministic spread instead of random jitter
                px.append(_num(x) + (0.3 * (j / (n - 1) - 0.5) if n > 1 else 0.0))
                py.append(y)
            if vals:
                mx.append(_num(x))
                my.append(sum(vals) / n)
        ax.scatter(px, py, s=8, color=ALL_COLOR, alpha=0.7, linewidths=0, label="heads × queries")
        ax.plot(mx, my, "-o", color=CAPABILITY_COLOR, markersize=3.5, linewidth=1.3, label="mean")
        ux, uy = _series(layers, uniform)
        if ux:
            ax.plot(ux, uy, ":", color="#555555", linewidth=1.0, label="uniform (ln keys)")
        ax.set_ylabel("attention entropy (nats)")
        ax.set_ylim(0, max(py + uy + [0.1]) * 1.12)
        _layer_axis(ax, layers)
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
        fig.tight_layout()
        return fig

    return _render(build, prefix, "Attention entropy per layer")


def kv_cache_svg(steps: Sequence[int], positions: Sequence[int | None], nbytes: Sequence[int | None],
                 key_rel_error: Sequence[float | None] = (), value_rel_error: Sequence[float | None] = (),
                 next_token_kl: Sequence[float | None] = (), prefix: str = "kv-cache") -> str:
    """Per generation step: positions held and bytes of the KV cache; with a quantized cache, the relative error
    of its de-quantized keys and values and the next-token KL against a full-precision cache."""
    if not steps:
        return ""
    quantized = any(_finite(x) for x in list(key_rel_error) + list(value_rel_error) + list(next_token_kl))

    def build():
        fig, axes = _figure(2 if quantized else 1, 4.6, 3.4, sharey=False)
        ax = axes[0]
        xs, ys = _series(steps, positions)
        ax.plot(xs, ys, "-o", color=CAPABILITY_COLOR, markersize=3.5, linewidth=1.3, label="positions held")
        ax.set_ylabel("positions held", color=CAPABILITY_COLOR)
        ax.set_xlabel("generation step")
        ax.set_title("cache length and size")
        twin = ax.twinx()
        xs, ys = _series(steps, nbytes)
        twin.plot(xs, [y / 1024 for y in ys], "--s", color=SAFETY_COLOR, markersize=5, linewidth=1.0,
                  markerfacecolor="none", label="KiB")
        twin.set_ylabel("cache size (KiB)", color=SAFETY_COLOR)
        twin.grid(False)
        twin.spines["right"].set_visible(True)
        if quantized:
            ax = axes[1]
            for ys, name, color, style in ((key_rel_error, "keys", CAPABILITY_COLOR, "-o"),
                                           (value_rel_error, "values", "#27ae60", "-s")):
                xs, vals = _series(steps, ys)
                if xs:
                    ax.plot(xs, vals, style, color=color, markersize=3.5, linewidth=1.3,
                            label=f"{name} rel. error")
            ax.set_ylabel("relative L2 error of the cached states")
            ax.set_xlabel("generation step")
            ax.set_title("quantized-cache error")
            ax.set_ylim(bottom=0)
            xs, vals = _series(steps, next_token_kl)
            if xs:
                kl = ax.twinx()
                kl.plot(xs, vals, ":^", color=SAFETY_COLOR, markersize=3.5, linewidth=1.0, label="next-token KL")
                kl.set_ylabel("next-token KL (nats)", color=SAFETY_COLOR)
                kl.grid(False)
                kl.spines["right"].set_visible(True)
                lines = ax.get_legend_handles_labels()
                more = kl.get_legend_handles_labels()
                ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", bbox_to_anchor=(1.25, 1.0),
                          fontsize=8)
            else:
                ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
        for a in axes:
            finite = sorted({int(_num(x)) for x in steps if _finite(x)})
            if finite and len(finite) <= 20:
                a.set_xticks(finite)
        fig.tight_layout()
        return fig

    return _render(build, prefix, "KV cache per generation step")
