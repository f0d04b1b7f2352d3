"""The ``trace.localize`` report page: restore / inject heatmaps, AtP against patching, weight-error ranking.

Works from the result dict (``LocalizeResult.to_dict()``), reading every field with defaults, so a page
renders from any localize file; figures are inline SVG from :mod:`trace_lib.report.plots`' helpers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from trace_lib.report.kit import Html, fmt, h, kv_table, note, section, table, td_num
from trace_lib.report.kit import as_dict as _d
from trace_lib.report.kit import as_list as _l
from trace_lib.report.kit import figure as _figure
from trace_lib.report.kit import num as _num
from trace_lib.report.plots import _figure as _fig
from trace_lib.report.plots import _render, label

_NAME = re.compile(r"^L(\d+)\.(resid_pre|attn|mlp|H(\d+))$")


def _grid(names: Sequence[str], values: Sequence[float]) -> tuple[list[str], list[int], list[list[float]]]:
    """Rows (resid_pre, attn, H0.., mlp present), columns (layers) and the value matrix (NaN where absent)."""
    cells: dict[tuple[str, int], float] = {}
    for n, v in zip(names, values):
        m = _NAME.match(str(n))
        if m:
            row = m.group(2) if m.group(3) is None else f"H{m.group(3)}"
            cells[(row, int(m.group(1)))] = _num(v)
    kinds = {r for r, _ in cells}
    heads = sorted((r for r in kinds if r.startswith("H")), key=lambda r: int(r[1:]))
    rows = [r for r in ("resid_pre", "attn") if r in kinds] + heads + (["mlp"] if "mlp" in kinds else [])
    layers = sorted({layer for _, layer in cells})
    return rows, layers, [[cells.get((r, layer), math.nan) for layer in layers] for r in rows]


def heatmap_svg(names: Sequence[str], panels: Mapping[str, Sequence[float]], prefix: str = "heat") -> str:
    """One layer x component heatmap per panel (e.g. restore, inject), on one symmetric colour scale."""
    grids = {k: _grid(names, v) for k, v in panels.items() if v and any(math.isfinite(_num(x)) for x in v)}
    if not grids:
        return ""
    finite = [x for _, _, g in grids.values() for row in g for x in row if math.isfinite(x)]
    vmax = max(1e-12, max(abs(x) for x in finite))  # symmetric: white is 0, the strongest cell saturates

    def build():
        rows0, layers0, _ = next(iter(grids.values()))
        fig, axes = _fig(len(grids), max(3.0, 0.22 * len(layers0) + 1.5), max(1.6, 0.3 * len(rows0) + 1.0),
                         sharey=True)
        im = None
        for ax, (title, (rows, layers, grid)) in zip(axes, grids.items()):
            im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
            ax.set_title(label(title))
            ax.set_yticks(range(len(rows)))
            ax.set_yticklabels([label(r) for r in rows], fontsize=7)
            step = max(1, len(layers) // 15)
            ax.set_xticks(range(0, len(layers), step))
            ax.set_xticklabels([str(layers[i]) for i in range(0, len(layers), step)], fontsize=7)
            ax.set_xlabel("layer")
            ax.grid(False)
        fig.colorbar(im, ax=axes, shrink=0.9, label="fraction of the gap")
        return fig

    return _render(build, prefix, "Fraction of the gap per layer and component: " + ", ".join(grids))


def scatter_svg(patch: Sequence[float], atp: Sequence[float], rho: float, prefix: str = "atp") -> str:
    """AtP's estimate against the patching effect, one point per component, with the diagonal."""
    pts = [(_num(x), _num(y)) for x, y in zip(patch, atp) if math.isfinite(_num(x)) and math.isfinite(_num(y))]
    if not pts:
        return ""

    def build():
        fig, (ax,) = _fig(1, 4.2, 3.6)
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, s=12, color="#2471a3")
        lo, hi = min(min(xs), min(ys)), max(max(xs), max(ys))
        ax.plot([lo, hi], [lo, hi], ":", color="#555555", linewidth=0.8)
        ax.set_xlabel("patching (fraction introduced)")
        ax.set_ylabel("AtP estimate")
        ax.set_title(label(f"Spearman {rho:.3f}" if math.isfinite(_num(rho)) else "Spearman n/a"))
        return fig

    return _render(build, prefix, "AtP estimate against activation patching")


def decomposition_svg(dec: Mapping, prefix: str = "dec") -> str:
    ref, var = _d(dec.get("reference")), _d(dec.get("variant"))
    if not ref or not var:
        return ""

    def build():
        fig, (ax,) = _fig(1, 5.2, 3.2)
        for d, name, style in ((ref, "reference", "-"), (var, "variant", "--")):
            for key, color in (("attn", "#c0392b"), ("mlp", "#2471a3")):
                ys = [_num(x) for x in _l(d.get(key))]
                ax.plot(range(len(ys)), ys, style, color=color, label=f"{key} ({name})", linewidth=1.3)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("projection on r̂")
        ax.legend(fontsize=7)
        return fig

    return _render(build, prefix, "Projection on the refusal direction written by each block")


def localize_body(result: Any) -> tuple[list, list, str, str]:
    d = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    gap, metric, prompts = _d(d.get("gap")), _d(d.get("metric")), _d(d.get("prompts"))
    ref, var = _d(d.get("reference")), _d(d.get("variant"))
    patch, atp, comp, weights = _l(d.get("patch")), _d(d.get("atp")), _d(d.get("comparison")), _d(d.get("weights"))
    names = [p.get("component") for p in patch] or _l(atp.get("components"))
    body, toc = [], []
    top = sorted([p for p in patch if math.isfinite(_num(p.get("gap_restored")))], key=lambda p: -p["gap_restored"])
    line = ("the damage enters mostly at " + ", ".join(f"{p['component']} ({fmt(p['gap_restored'], '.0%')} "
                                                      "restored)" for p in top[:3])) if top else None
    body.append(section("verdict", "Where the gap enters", kv_table([
        ("metric", metric.get("kind")), ("gap (M ref - M variant)", fmt(gap.get("value"), ".4g")),
        ("95% bootstrap interval", f"{fmt(gap.get('lo'), '.4g')} .. {fmt(gap.get('hi'), '.4g')}"),
        ("refused prompts", f"{prompts.get('n_refused')} of {prompts.get('n_harmful')}"),
        ("localisation", line)]), intro="Fractions are of the gap: 1 = this component alone accounts for it."))
    toc.append(("verdict", "Verdict"))
    if patch or atp:
        panels = {"restore": [p.get("gap_restored") for p in patch], "inject": [p.get("gap_introduced") for p in patch]}
        if not patch:
            panels = {"AtP estimate": _l(atp.get("fraction"))}
        by_atp = dict(zip(_l(atp.get("components")), _l(atp.get("fraction"))))
        rows = [[p.get("component"), td_num(p.get("gap_restored")), td_num(p.get("gap_introduced")),
                 td_num(by_atp.get(p.get("component")))] for p in patch]
        if _d(d.get("settings")).get("verified_top") and atp:  # AtP over all, patching over its top k
            names = _l(atp.get("components"))
            got = {p.get("component"): p.get("gap_restored") for p in patch}
            panels = {"AtP estimate": _l(atp.get("fraction")), "restore (AtP's top, patched)": [got.get(n) for n in names]}
            rows = [[n, td_num(got.get(n)), td_num(None), td_num(by_atp.get(n))] for n in names]
        body.append(section("components", "Components", _figure(heatmap_svg(names, panels), "restore: variant run "
                            "with the reference's activation; inject: reference run with the variant's"),
                            table(["component", "restored", "introduced", "AtP"], rows, table_id="components")))
        toc.append(("components", "Components"))
    if comp and patch and atp:
        inj = [p.get("gap_introduced") for p in patch]
        body.append(section("atp", "AtP against patching", _figure(
            scatter_svg(inj, _l(atp.get("fraction")), comp.get("spearman_inject")), "one point per component"),
            note(f"Spearman {fmt(comp.get('spearman_inject'))} (inject), {fmt(comp.get('spearman_restore'))} "
                 f"(restore); false negatives among the true top 10: {fmt(comp.get('fnr_top10'), '.0%')}")))
        toc.append(("atp", "AtP vs patching"))
    if weights:
        restored = _d(weights.get("restored"))
        pairs = sorted(zip(_l(weights.get("modules")), _l(weights.get("fraction_estimate"))), key=lambda x: -_num(x[1]))
        rows = [[m, td_num(e), td_num(restored.get(m))] for m, e in pairs]
        body.append(section("weights", "Weight matrices", table(["Linear", "estimated fraction", "measured "
                            "un-quantize restore"], rows, table_id="weights"), note(
            f"Spearman(estimate, measured) over the {len(restored)} measured: {fmt(weights.get('spearman_checked'))}")))
        toc.append(("weights", "Weight matrices"))
    dec = _d(d.get("decomposition"))
    if dec:
        body.append(section("direction", "Where the refusal direction is written",
                            _figure(decomposition_svg(dec), f"per block, up to block {dec.get('layer')}")))
        toc.append(("direction", "Refusal direction"))
    skipped = _d(d.get("skipped"))
    body.append(section("models", "Models & settings", kv_table([
        ("reference", ref.get("name")), ("variant", var.get("name")), *[(k, str(v)) for k, v in
                                                                        _d(d.get("settings")).items()],
        *[(f"{k} skipped", v) for k, v in skipped.items()],
        *[(f"{k} seconds", fmt(v, ".1f")) for k, v in _d(d.get("seconds")).items()]])))
    toc.append(("models", "Models & settings"))
    title = f"trace localize: {var.get('name', '?')}"
    sub = f"against {ref.get('name', '?')}; metric {metric.get('kind', '?')}"
    return body, toc, title, sub


__all__ = ["Html", "decomposition_svg", "heatmap_svg", "localize_body", "scatter_svg", "h"]
