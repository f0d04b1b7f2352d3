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
