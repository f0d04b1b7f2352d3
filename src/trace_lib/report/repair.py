"""The ``trace.repair`` report page: the chosen config, the Pareto curves of every search method, the test-split
checks and the rankings. Reads the result dict with defaults, so any repair file renders."""

from __future__ import annotations

from typing import Any

from trace_lib.report.kit import as_dict as _d
from trace_lib.report.kit import as_list as _l
from trace_lib.report.kit import figure as _figure
from trace_lib.report.kit import fmt, kv_table, note, section, table, td_num
from trace_lib.report.kit import num as _num
from trace_lib.report.plots import _figure as _fig
from trace_lib.report.plots import _render, label

COLORS = {"attribution": "#1b6ca8", "knapsack": "#0b8a5f", "saliency": "#c9711a", "first-last": "#7a4fa0",
          "random": "#888888"}


def pareto_svg(curve: list[dict], target_bpw: float, bar: float | None, prefix: str = "pareto") -> str:
    """Fraction of the train refusal gap restored (left) and KLD (right) against bits per weight, per method."""
    methods = list(dict.fromkeys(p.get("method") for p in curve))
    if not methods:
        return ""

    def build():
        fig, (ax, ax2) = _fig(2, 4.6, 3.4, sharey=False)
        for m in methods:
            pts = sorted((p for p in curve if p.get("method") == m), key=lambda p: _num(p.get("bpw")))
            xs = [_num(p.get("bpw")) for p in pts]
            style = "-o" if m in ("attribution", "knapsack") else "--s"
            ax.plot(xs, [_num(p.get("restored")) for p in pts], style, color=COLORS.get(m, "#333333"),
                    label=label(m), markersize=3.5, linewidth=1.3)
            ax2.plot(xs, [_num(p.get("kld")) for p in pts], style, color=COLORS.get(m, "#333333"), markersize=3.5,
                     linewidth=1.3)
        if bar is not None:
            ax.axhline(bar, color="#555555", linewidth=0.8, linestyle=":", label=label(f"bar {bar:g}"))
        ax.axvline(target_bpw, color="#aa3333", linewidth=0.8, linestyle=":")
        ax.set_xlabel("bits per weight (quantized Linears)")
        ax.set_ylabel("train refusal gap restored")
        ax2.set_xlabel("bits per weight (quantized Linears)")
        ax2.set_ylabel("mean KLD from the reference")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        return fig

    return _render(build, prefix, "Pareto curves: refusal gap restored and KLD against bits per weight")


def _rate(a: dict, key: str) -> str:
    ci = _l(a.get(f"{key}_ci95"))
    return (f"{fmt(a.get(key), '.1%')} [{fmt(_num(ci[0]), '.1%')}, {fmt(_num(ci[1]), '.1%')}]" if len(ci) == 2
            else fmt(a.get(key), ".1%"))


def repair_body(result: Any) -> tuple[list, list, str, str]:
    d = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    tgt, tr, te, chosen = _d(d.get("target")), _d(d.get("train")), _d(d.get("test")), d.get("chosen")
    settings = _d(d.get("settings"))
    body, toc = [], []
    ref_b, tgt_b = _d(te.get("reference")), _d(te.get("target"))
    items = [("target", f"{tgt.get('config')} at {fmt(tgt.get('bpw'), '.3f')} bits per weight"),
             ("kept Linears stored at", d.get("keep")),
             ("train refusal gap", f"{fmt(tr.get('gap'), '.4g')} over {tr.get('n_refused')} refused prompts"),
             ("reference refusal (test)", fmt(ref_b.get("refusal"), ".1%")),
             ("target refusal (test)", f"{fmt(tgt_b.get('refusal'), '.1%')} (one-sided McNemar p = "
                                       f"{fmt(tgt_b.get('refusal_p'), '.3g')})")]
    if chosen:
        a = _d(chosen.get("acceptance"))
        items += [("chosen repair", f"{chosen.get('method')}: {chosen.get('config')}"),
                  ("bits per weight", f"{fmt(chosen.get('bpw'), '.3f')} (+{fmt(chosen.get('extra_bpw'), '.3f')})"),
                  ("refusal / over-refusal (test)", f"{fmt(a.get('refusal'), '.1%')} / "
                                                    f"{fmt(a.get('over_refusal'), '.1%')}"),
                  ("why", chosen.get("why") or a.get("why"))]
        if chosen.get("ships_as"):
            items.append(("ships as", chosen.get("ships_as")))
        audit = _d(chosen.get("audit"))
        if audit:
            items.append(("safety CPFR", fmt(audit.get("safety_cpfr"))))
    verdict = note("No set within the budget passed the test-split check.") if not chosen else None
    body.append(section("verdict", "Repair", kv_table(items, table_id="repair-verdict"), verdict,
                        intro="The search ranks Linears on the train split and confirms on the test split."))
    toc.append(("verdict", "Repair"))
    curve = _l(d.get("curve"))
    body.append(section("pareto", "Pareto curves", _figure(
        pareto_svg(curve, _num(tgt.get("bpw")), settings.get("train_bar")),
        "one line per ranking; solid: trace's search (weight-error attribution, and per bit)"),
        table(["method", ("budget", "extra bits per weight allowed"), "extra bpw", "bpw", "Linears",
               ("restored", "fraction of the train refusal gap"), "KLD"],
              [[p.get("method"), td_num(p.get("budget_bpw")), td_num(p.get("extra_bpw")), td_num(p.get("bpw")),
                td_num(len(_l(p.get("modules"))), "d"), td_num(p.get("restored")), td_num(p.get("kld"), ".4f")]
               for p in curve], table_id="curve-table")))
    toc.append(("pareto", "Pareto curves"))
    rows = []
    params = _num(_d(d.get("candidates")).get("total_params"))
    for c in [*_l(d.get("confirmations")), *_l(d.get("restorations"))]:
        a = _d(c.get("acceptance"))
        mb = _num(c.get("bpw")) * params / 8e6
        rows.append([c.get("method"), td_num(c.get("extra_bpw"), ".4f"), td_num(mb, ".2f"),
                     td_num(c.get("restored_train")), _rate(a, "refusal"), _rate(a, "over_refusal"),
                     td_num(a.get("refusal_p"), ".3g"), td_num(a.get("over_refusal_p"), ".3g"),
                     td_num(c.get("kld"), ".4f"), "accepted" if a.get("accepted") else "rejected", a.get("why")])
    direction = _d(d.get("direction"))
    intro = (f"Steering and weight edits restore the reference's refusal direction after block "
             f"{direction.get('layer')} (Cohen's d {fmt(direction.get('cohens_d'), '.2f')} on the train split)."
             if direction else None)
    body.append(section("checks", "Test-split checks", table(
        ["method", "extra bpw", ("MB", "the quantized Linears' weights at this bits per weight"),
         "restored (train)", ("refusal", "with its Wilson 95% interval"), "over-refusal",
         ("p refusal", "one-sided exact McNemar: fewer refusals than the reference"),
         ("p over-refusal", "one-sided exact McNemar: more over-refusals than the reference"), "KLD", "verdict",
         "why"], rows, table_id="checks-table"), intro=intro))
    toc.append(("checks", "Test-split checks"))
    ranks = _d(d.get("rankings"))
    rank_rows = [[m, i + 1, r.get("module"), td_num(r.get("score"), ".4g")]
                 for m, rs in ranks.items() for i, r in enumerate(_l(rs)[:10])]
    body.append(section("rankings", "Rankings", table(["method", "rank", "Linear", "score"], rank_rows,
                                                      table_id="rankings-table")))
    toc.append(("rankings", "Rankings"))
    files = _d(d.get("files"))
    if files:
        body.append(section("files", "Files", kv_table(list(files.items()))))
        toc.append(("files", "Files"))
    title = f"trace repair: {tgt.get('config')}"
    sub = f"{_d(d.get('reference')).get('name')}; budgets up to {fmt(settings.get('max_bpw'), '.3f')} bits per weight"
    return body, toc, title, sub



