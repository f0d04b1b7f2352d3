"""The report in a real browser: headless Chromium (Debian's ``chromium``) loads the page from a file with no
network, logs no console message (no error, no CSP violation, no uncaught exception), runs the page's script
(tables sortable, the feature table filterable, a sort requested in the address applied), shows the verdict,
the tables and the figures, and takes a screenshot.

Console messages are read from Chromium's own log (``--enable-logging=stderr``: one ``CONSOLE`` line per
message); a control page with a deliberate error proves the log is read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_report import Page, redteam_dict, result_folder, with_safety_features
from trace_lib.audit import AuditResult
from trace_lib.report import load_result, write_html
from trace_lib.report.sections import CPFR_COL

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and os.access(p, os.X_OK)),
                None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless browser test needs Debian's chromium "
                                                          "(apt-get install chromium); not installed here")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--enable-logging=stderr", "--v=0"]
CONSOLE = re.compile(r"CONSOLE[(:]|Uncaught|Content Security Policy|Refused to", re.I)


def chromium(url: str, tmp: Path, *args: str, timeout: int = 180) -> tuple[str, list[str]]:
    """Run headless Chromium on ``url``; (stdout, the console lines of its log)."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url], capture_output=True,
                          text=True, timeout=timeout)
    console = [ln for ln in proc.stderr.splitlines() if CONSOLE.search(ln)]
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, console


@pytest.fixture(scope="module")
def pages(tiny_folder, tmp_path_factory) -> dict[str, Path]:
    result_files = result_folder(tiny_folder, tmp_path_factory)
    out = tmp_path_factory.mktemp("report-pages")
    audit = AuditResult.from_dict(with_safety_features(json.loads((result_files / "audit.json").read_text())))
    return {"audit": write_html(audit, out / "audit.html"),
            "sweep": write_html(load_result(result_files / "sweep.json"), out / "sweep.html"),
            "compare": write_html(load_result(result_files / "compare.json"), out / "compare.html"),
            "redteam": write_html(redteam_dict(), out / "redteam.html")}


def test_console_errors_are_seen(tmp_path):
    """The control: a page with an uncaught error and a console.error produces console lines."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><script>console.error("control error"); '
                    "notDefined();</script></body></html>")
    _, console = chromium(page.as_uri(), tmp_path, "--dump-dom")
    assert any("control error" in ln for ln in console) and any("notDefined" in ln for ln in console)


@pytest.mark.parametrize("kind", ["audit", "sweep", "compare", "redteam"])
def test_page_loads_clean_and_its_script_runs(pages, kind, tmp_path):
    dom, console = chromium(pages[kind].as_uri(), tmp_path, "--dump-dom")
    assert console == [], "console messages:\n" + "\n".join(console)
    page = Page(dom)
    root = next(a for t, a in page.elements if t == "html")
    assert root.get("data-report-js") == "ready", "the page's script did not run to its end"
    tables = [a for t, a in page.elements if t == "table" and "sortable" in a.get("class", "")]
    assert tables and all(a.get("data-sortable") == "ready" for a in tables)
    assert any(t == "section" and a.get("id") == "verdict" for t, a in page.elements)
    banner = next(a for t, a in page.elements if a.get("id") == "verdict-banner")
    assert banner["data-verdict"] in ("OK", "WARNING", "NONE")
    assert any(t == "svg" and "plot" in a.get("class", "") for t, a in page.elements) or kind == "redteam"


@pytest.mark.parametrize("kind", ["audit", "sweep"])
def test_feature_table_sorts_and_filters(pages, kind, tmp_path):
    """``#sort=features-table:<CPFR column>`` makes the script sort that table by CPFR, ascending, numerically."""
    dom, console = chromium(pages[kind].as_uri() + f"#sort=features-table:{CPFR_COL}", tmp_path, "--dump-dom")
    assert console == []
    page = Page(dom)
    table = next(a for t, a in page.elements if t == "table" and a.get("id") == "features-table")
    assert table["data-sortable"] == "ready" and table["data-filterable"] == "ready"
    assert table["data-sorted"] == f"{CPFR_COL}:asc"
    rows = page.rows("features-table")
    assert len(rows) > 10 and int(table["data-shown"]) == len(rows)
    keys = [float(r[CPFR_COL][1]["data-sort"]) for r in rows if r[CPFR_COL][1].get("data-sort")]
    assert keys == sorted(keys) and len(set(keys)) > 1
    # the original order (by variant) is not sorted by CPFR, so the script did the sorting
    orig = Page(pages[kind].read_text(encoding="utf-8")).rows("features-table")
    assert [float(r[CPFR_COL][1]["data-sort"]) for r in orig if r[CPFR_COL][1].get("data-sort")] != keys


def test_screenshot(pages, tmp_path):
    shot = tmp_path / "audit.png"
    _, console = chromium(pages["audit"].as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1280,2000",
                          "--hide-scrollbars")
    assert console == []
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        colours = im.convert("RGB").resize((64, 100)).getcolors(64 * 100)
        assert colours is None or len(colours) > 20, "the screenshot is blank"
    keep = os.environ.get("TRACE_REPORT_SCREENSHOT")
    if keep:  # e.g. CI keeps it as an artifact
        shutil.copy(shot, keep)


@pytest.fixture(scope="module")
def tracer_page(tmp_path_factory) -> Path:
    from test_report_tracer import tracer_dict

    return write_html(load_result(tracer_dict()), tmp_path_factory.mktemp("tracer-page") / "tracer.html")


def test_tracer_page_loads_clean_with_its_table_and_plots(tracer_page, tmp_path):
    """The tracer page: no console message, the per-layer table sortable (a sort by SNR requested in the address
    applied: layers come in layer order, their SNR falls with depth), the quantization-error, logit-lens, attention and KV-cache figures there."""
    orig = Page(tracer_page.read_text(encoding="utf-8"))
    header = [c[0] for c in orig.tables["layers-table"][0]]
    snr = header.index("SNR dB")
    dom, console = chromium(tracer_page.as_uri() + f"#sort=layers-table:{snr}", tmp_path, "--dump-dom")
    assert console == [], "console messages:\n" + "\n".join(console)
    page = Page(dom)
    root = next(a for t, a in page.elements if t == "html")
    assert root.get("data-report-js") == "ready", "the page's script did not run to its end"
    table = next(a for t, a in page.elements if t == "table" and a.get("id") == "layers-table")
    assert table["data-sortable"] == "ready" and table["data-sorted"] == f"{snr}:asc"
    rows = page.rows("layers-table")
    assert len(rows) == len(orig.rows("layers-table")) == 3
    keys = [float(r[snr][1]["data-sort"]) for r in rows]
    assert keys == sorted(keys) and [float(r[snr][1]["data-sort"]) for r in orig.rows("layers-table")] != keys
    assert next(a for t, a in page.elements if a.get("id") == "verdict-banner")["data-verdict"] in (
        "OK", "CHECK", "WARNING")
    plots = {a.get("data-plot") for t, a in page.elements if t == "svg" and "plot" in a.get("class", "")}
    assert {"quant-error", "logit-lens", "attention", "kv-cache"} <= plots


@pytest.fixture(scope="module")
def localize_page(tiny_folder, tmp_path_factory) -> Path:
    from trace_lib.attribution import localize

    r = localize(str(tiny_folder), "int2-rtn-g32", n_prompts=8, refusal_reply="I can't help with that.",
                 n_weight_check=2)
    return write_html(r, tmp_path_factory.mktemp("localize-page") / "localize.html")


def test_localize_page_loads_clean_with_its_heatmaps_and_tables(localize_page, tmp_path):
    """The localize page: no console message, its script runs to its end, its tables sortable, the restore /
    inject heatmap, the AtP-vs-patching scatter and the weight ranking there."""
    dom, console = chromium(localize_page.as_uri(), tmp_path, "--dump-dom")
    assert console == [], "console messages:\n" + "\n".join(console)
    page = Page(dom)
    root = next(a for t, a in page.elements if t == "html")
    assert root.get("data-report-js") == "ready", "the page's script did not run to its end"
    tables = [a for t, a in page.elements if t == "table" and "sortable" in a.get("class", "")]
    assert all(a.get("data-sortable") == "ready" for a in tables)
    ids = {a.get("id") for _, a in page.elements}
    assert {"verdict", "components", "atp", "weights", "direction", "models"} <= ids
    assert sum(t == "svg" and "plot" in a.get("class", "") for t, a in page.elements) >= 3


@pytest.fixture(scope="module")
def graph_page(tmp_path_factory) -> Path:
    from test_graph_cli import tiny_graph_result

    tmp = tmp_path_factory.mktemp("graph-page")
    return write_html(tiny_graph_result(tmp, prompt="<script>alert(1)</script>"), tmp / "graph.html")


def test_graph_page_loads_clean_with_its_svg_and_tables(graph_page, tmp_path):
    """The trace.graph page: no console message, its script runs to its end, the node-link SVG with nodes and
    edges, the diff and node tables sortable, the prompt shown as text."""
    dom, console = chromium(graph_page.as_uri(), tmp_path, "--dump-dom")
    assert console == [], "console messages:\n" + "\n".join(console)
    page = Page(dom)
    root = next(a for t, a in page.elements if t == "html")
    assert root.get("data-report-js") == "ready", "the page's script did not run to its end"
    tables = [a for t, a in page.elements if t == "table" and "sortable" in a.get("class", "")]
    assert tables and all(a.get("data-sortable") == "ready" for a in tables)
    ids = {a.get("id") for _, a in page.elements}
    assert {"summary", "graph", "diff", "nodes", "nodes-table", "edges-lost"} <= ids
    assert any(t == "svg" and "graph" in a.get("class", "") for t, a in page.elements)
    assert sum(t == "circle" for t, _ in page.elements) >= 3
    assert "<script>alert(1)</script>" in dom.replace("&lt;", "<").replace("&gt;", ">")
    assert not any(t == "script" and "alert" in str(a) for t, a in page.elements)
