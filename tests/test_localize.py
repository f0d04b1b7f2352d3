"""Localisation on tiny models, each number checked against an independent computation."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from trace_lib.attribution import (
    Component,
    LocalizeResult,
    Metric,
    activation_patch,
    attribution_patch,
    build_batch,
    decompose,
    first_order,
    gap_interval,
    localize,
    metric_values,
    pack_batch,
    spearman,
    weight_attribution,
)
from trace_lib.attribution.atp import false_negative_rate
from trace_lib.attribution.components import components, resolve, site
from trace_lib.attribution.metric import check_gap
from trace_lib.attribution.patching import cache, check_pair, patched, sites_of
from trace_lib.attribution.weights import differing_linears, unquantized
from trace_lib.errors import AttributionError, NoGapError, ResultFormatError
from trace_lib.models import from_model
from trace_lib.quant import quantize

from conftest import tiny_loaded

PLANT_LAYER = 1


@pytest.fixture(scope="module")
def ref():
    torch.set_num_threads(1)  # tiny models: threads only contend
    return tiny_loaded("llama")


def _prompts(n: int = 6, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(k),), generator=g).tolist() for k in torch.randint(5, 9, (n,), generator=g)]


def _batches(kind: str) -> list:
    p = _prompts()
    if kind == "direction":
        return [build_batch(p[i:i + 3], "direction") for i in (0, 3)]
    return [build_batch(p[i:i + 3], kind, [[5, 6, 7]] * 3, [9, 10]) for i in (0, 3)]


def _r_hat() -> torch.Tensor:
    r = torch.randn(32, generator=torch.Generator().manual_seed(7))
    return r / r.norm()


METRICS = {"refusal-logprob": lambda: Metric(), "direction": lambda: Metric("direction", _r_hat(), 2)}


def _mlp_plant(ref):
    """A variant whose only difference is block 1's MLP weights, replaced by other random weights."""
    m = copy.deepcopy(ref.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.model.layers[PLANT_LAYER].mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return from_model(m, name="mlp-plant")


def _head_plant(ref, head: int = 2):
    """A variant whose only difference is query head ``head`` of block 1 zeroed (its slice of o_proj's input)."""
    m = copy.deepcopy(ref.model)
    var = from_model(m, name="head-plant")
    hook_site, sl = site(var, Component(PLANT_LAYER, "head", head))

    def zero(module, args):
        x = args[0].clone()
        x[..., sl] = 0
        return (x, *args[1:])

    hook_site.module.register_forward_pre_hook(zero)
    return var


def _mean(loaded, batches, metric) -> float:
    with torch.no_grad():
        return float(torch.cat([metric_values(loaded, b, metric) for b in batches]).double().mean())


# ---------------------------------------------------------------- the metric
def test_refusal_logprob_equals_direct_computation(ref):
    p = _prompts(2)
    b = build_batch(p, "refusal-logprob", [[5, 6, 7], [8]], [9, 10])
    got = metric_values(ref, b, Metric())
    for i, prompt in enumerate(p):
        def lp(cont):
            ids = torch.tensor([prompt + cont])
            with torch.no_grad():
                logp = torch.log_softmax(ref.model(ids).logits[0].double(), -1)
            return float(sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(cont)) / len(cont))
        expect = lp([[5, 6, 7], [8]][i]) - lp([9, 10])
        assert got[i].item() == pytest.approx(expect, abs=1e-5)


def test_direction_metric_equals_projection(ref):
    b = build_batch(_prompts(3), "direction")
    r = _r_hat()
    got = metric_values(ref, b, Metric("direction", r, 1))
    with torch.no_grad():
        hs = ref.model(b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True).hidden_states[2]
    expect = hs[torch.arange(3), b.prompt_len - 1] @ r
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def _shared_prompts(n: int = 6) -> list[list[int]]:
    """Prompts that start with one 'chat template' prefix, as chat-formatted prompts do."""
    return [[1, 2, 3, 4] + p for p in _prompts(n)]


@pytest.mark.parametrize("kind", ["refusal-logprob", "direction"])
@pytest.mark.parametrize("share", [True, False])
def test_packed_batch_gives_the_unpacked_metric(ref, kind, share):
    """Packing prompts into one tree-masked row changes no token's context, so M is the unpacked M."""
    p = _shared_prompts()
    reps = [[5, 6, 7], [8], [9, 10, 11, 12], [5], [6, 7], [8, 9]]
    metric = METRICS[kind]() if kind == "direction" else Metric()
    plain = build_batch(p, kind, reps, [9, 10])
    packed = pack_batch(p, kind, reps, [9, 10], per_row=4, share_prefix=share)
    fewer = packed.attention_mask.sum() < plain.attention_mask.sum()
    assert packed.input_ids.shape[0] == 2 and (fewer or (kind == "direction" and not share))
    with torch.no_grad():
        torch.testing.assert_close(metric_values(ref, packed, metric), metric_values(ref, plain, metric),
                                   atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["all", "last", [0, 1]])
def test_packed_batches_patch_and_attribute_like_unpacked(ref, positions):
    """Patching and AtP over packed batches give the unpacked numbers (shared tokens count once but carry both
    branches' gradients, exactly as their two unpacked copies do)."""
    var = _mlp_plant(ref)
    p = _shared_prompts()
    reps = [[5, 6, 7]] * 6
    plain = [build_batch(p[i:i + 3], "refusal-logprob", reps[i:i + 3], [9, 10]) for i in (0, 3)]
    packed = [pack_batch(p[i:i + 3], "refusal-logprob", reps[i:i + 3], [9, 10], per_row=3) for i in (0, 3)]
    comps = [Component(0, "resid_pre"), Component(PLANT_LAYER, "mlp"), Component(PLANT_LAYER, "head", 1)]
    a = activation_patch(ref, var, plain, Metric(), comps, positions)
    b = activation_patch(ref, var, packed, Metric(), comps, positions)
    for x, y in zip(a.results, b.results):
        assert x.gap_restored == pytest.approx(y.gap_restored, abs=1e-4)
        assert x.gap_introduced == pytest.approx(y.gap_introduced, abs=1e-4)
    np.testing.assert_allclose(attribution_patch(ref, var, packed, Metric(), comps, positions).fraction,
                               attribution_patch(ref, var, plain, Metric(), comps, positions).fraction, atol=1e-4)


def test_packed_decomposition_and_reach(ref):
    p = _shared_prompts()
    plain = [build_batch(p, "direction")]
    packed = [pack_batch(p, "direction", per_row=4)]
    a, b = decompose(ref, plain, _r_hat(), 2).to_dict(), decompose(ref, packed, _r_hat(), 2).to_dict()
    np.testing.assert_allclose(np.array(a["mlp"]), np.array(b["mlp"]), atol=1e-5)
    np.testing.assert_allclose(np.array(a["attn"]), np.array(b["attn"]), atol=1e-5)
    with pytest.raises(AttributionError, match="share_prefix=False"):
        packed[0].positions([-6])  # reaches the shared prefix [1, 2, 3, 4] of a 9-token prompt
    assert packed[0].positions([-1]).sum() == len(p)


def test_gap_interval_is_seeded_and_refuses_zero():
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 1.0, 2.5, 3.0])
    g1, g2 = gap_interval(a, b, seed=3), gap_interval(a, b, seed=3)
    assert g1.value == pytest.approx(0.75) and (g1.lo, g1.hi) == (g2.lo, g2.hi) and g1.lo <= 0.75 <= g1.hi
    check_gap(g1)
    with pytest.raises(NoGapError, match="includes 0"):
        check_gap(gap_interval(torch.tensor([1.0, -1.0, 0.5]), torch.zeros(3)))


# ---------------------------------------------------------------- planted variants: every method finds the plant
@pytest.mark.parametrize("kind", ["refusal-logprob", "direction"])
def test_mlp_plant_ranked_first_by_every_method(ref, kind):
    var, met, batches = _mlp_plant(ref), METRICS[kind](), _batches(kind)
    comps = components(ref, ["attn", "mlp", "heads"])
    run = activation_patch(ref, var, batches, met, comps)
    restored = [r.gap_restored for r in run.results]
    plant = comps.index(Component(PLANT_LAYER, "mlp"))
    assert np.argmax(restored) == plant
    assert restored[plant] == pytest.approx(1.0, abs=1e-5)
    assert run.results[plant].gap_introduced == pytest.approx(1.0, abs=1e-5)
    atp = attribution_patch(ref, var, batches, met, comps)
    assert np.argmax(atp.fraction) == plant
    w = weight_attribution(ref, var, batches, met, run.gap, float(run.m_var.double().mean()), exact="all")
    assert set(w.modules) == {f"model.layers.{PLANT_LAYER}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    assert w.ranking()[0][0].startswith(f"model.layers.{PLANT_LAYER}.mlp.")
    with unquantized(ref, var, w.modules):  # un-quantizing the whole plant restores exactly
        assert _mean(var, batches, met) == pytest.approx(_mean(ref, batches, met), abs=1e-7)


def test_head_plant_ranked_first_and_restored_exactly(ref):
    var, met, batches = _head_plant(ref), METRICS["direction"](), _batches("direction")
    heads = components(ref, ["heads"])
    run = activation_patch(ref, var, batches, met, heads)
    restored = [r.gap_restored for r in run.results]
    plant = heads.index(Component(PLANT_LAYER, "head", 2))
    assert np.argmax(restored) == plant and restored[plant] == pytest.approx(1.0, abs=1e-5)
    # heads upstream of the plant carry none of the gap
    assert all(abs(x) < 1e-6 for c, x in zip(heads, restored) if c.layer < PLANT_LAYER)
    atp = attribution_patch(ref, var, batches, met, heads)
    assert np.argmax(atp.fraction) == plant


# ---------------------------------------------------------------- patching identities
def test_patching_own_activation_changes_nothing(ref):
    var, met, batches = _mlp_plant(ref), METRICS["refusal-logprob"](), _batches("refusal-logprob")
    comps = components(ref, ["resid", "attn", "mlp", "heads"])
    sites, where = sites_of(var, comps)
    for b in batches:
        acts, m = cache(var, b, met, sites)
        for c in comps[::3]:
            name, head = where[c]
            with torch.no_grad(), patched(sites[name], head, acts[name], b.positions("all")):
                torch.testing.assert_close(metric_values(var, b, met), m, atol=1e-6, rtol=0)
    # upstream of the plant the reference's activation *is* the variant's: restoring it restores 0
    run = activation_patch(ref, var, batches, met, [c for c in comps if c.layer < PLANT_LAYER])
    assert all(abs(r.gap_restored) < 1e-6 and abs(r.gap_introduced) < 1e-6 for r in run.results)


def test_last_residual_at_every_position_restores_everything(ref):
    var = from_model(quantize(ref, "int2-rtn-g32").model, name="int2")
    met, batches = METRICS["refusal-logprob"](), _batches("refusal-logprob")
    run = activation_patch(ref, var, batches, met, [Component(ref.n_layers, "resid_pre")])
    assert run.results[0].gap_restored == pytest.approx(1.0, abs=1e-5)
    assert run.results[0].gap_introduced == pytest.approx(1.0, abs=1e-5)
    # the gap itself equals the directly computed one
    assert run.gap == pytest.approx(_mean(ref, batches, met) - _mean(var, batches, met), abs=1e-9)


def test_positions_select_the_post_instruction_token(ref):
    b = build_batch(_prompts(2), "refusal-logprob", [[5, 6], [7]], [9])
    last = b.positions("last")
    assert last.sum() == 4 and all(last[r, b.prompt_len[r] - 1] for r in range(4))
    assert (b.positions([0, 1]) & ~b.attention_mask.bool()).sum() == 0


# ---------------------------------------------------------------- AtP
def test_atp_equals_patching_where_the_metric_is_linear(ref):
    """The direction metric after block 2 is linear in block 2's mlp_out and in the final residual."""
    var = from_model(quantize(ref, "int2-rtn-g32").model, name="int2")
    met, batches = METRICS["direction"](), _batches("direction")
    comps = [Component(2, "mlp"), Component(3, "resid_pre")]
    run = activation_patch(ref, var, batches, met, comps, modes=("inject",))
    atp = attribution_patch(ref, var, batches, met, comps)
    for r, f in zip(run.results, atp.fraction):
        assert f == pytest.approx(r.gap_introduced, rel=1e-4, abs=1e-6)
    assert atp.n_forward == 2 * len(batches) and atp.n_backward == len(batches)


def test_graddrop_scores_and_rank_statistics(ref):
    var, met, batches = _mlp_plant(ref), METRICS["direction"](), _batches("direction")
    comps = components(ref, ["attn", "mlp"])
    atp = attribution_patch(ref, var, batches, met, comps, graddrop=True)
    assert len(atp.graddrop) == len(comps) and all(x >= 0 for x in atp.graddrop)
    assert np.argmax(atp.graddrop) == comps.index(Component(PLANT_LAYER, "mlp"))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert false_negative_rate([5, 4, 3, 0, 0], [5, 0, 3, 4, 0], k=2) == 0.5


# ---------------------------------------------------------------- weights
def test_first_order_weight_estimate_linear_and_quadratic(ref):
    """M (direction after block 2) is linear in block 2's down_proj and in its up_proj alone, and quadratic
    (bilinear) in the two together: the estimates are exact alone, and exact + cross term together."""
    met, batches = METRICS["direction"](), _batches("direction")
    m = copy.deepcopy(ref.model)
    g = torch.Generator().manual_seed(2)
    mlp = m.model.layers[2].mlp
    with torch.no_grad():
        for lin in (mlp.up_proj, mlp.down_proj):
            lin.weight.add_(torch.randn(lin.weight.shape, generator=g) * 0.05)
    var = from_model(m, name="toy")
    up, down = "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"
    est = dict(zip([up, down], first_order(ref, var, batches, met, [up, down])))
    m_ref, m_var = _mean(ref, batches, met), _mean(var, batches, met)
    for name, other in ((up, down), (down, up)):
        with unquantized(ref, var, [other]):  # the variant with only `name` changed
            assert _mean(var, batches, met) - m_ref == pytest.approx(est[name], rel=1e-4, abs=1e-7)
    # cross term, computed independently: r . dW_down (silu(gate x) * (dW_up x)) at the read positions
    r = _r_hat()
    ref_mlp = ref.model.model.layers[2].mlp
    d_up, d_down = mlp.up_proj.weight - ref_mlp.up_proj.weight, mlp.down_proj.weight - ref_mlp.down_proj.weight
    sites, _ = sites_of(ref, [Component(2, "mlp")])
    cross, n = 0.0, 0
    for b in batches:
        x = {}
        h = ref_mlp.register_forward_pre_hook(lambda mod, args: x.setdefault("in", args[0]))
        with torch.no_grad():
            ref.model(b.input_ids, attention_mask=b.attention_mask)
        h.remove()
        xin = x["in"][torch.arange(len(b.read_pos)), b.read_pos]
        with torch.no_grad():
            act = torch.nn.functional.silu(ref_mlp.gate_proj(xin)) * (xin @ d_up.T)
            cross += float((act @ d_down.T @ r).double().sum())
        n += len(b.read_pos)
    assert m_var - m_ref == pytest.approx(est[up] + est[down] + cross / n, rel=1e-4, abs=1e-7)


def test_unquantizing_every_linear_gives_the_reference(ref):
    var = quantize(ref, "int4-rtn-g32")
    met, batches = METRICS["refusal-logprob"](), _batches("refusal-logprob")
    names = differing_linears(ref, var)
    assert len(names) == 7 * ref.n_layers
    before = _mean(var, batches, met)
    with unquantized(ref, var, names):
        assert _mean(var, batches, met) == _mean(ref, batches, met)
    assert _mean(var, batches, met) == before  # and the variant is put back


def test_weights_need_float_weights(ref):
    with pytest.raises(AttributionError, match="de-quantized float weights"):
        differing_linears(ref, quantize(ref, "int8-dynamic"))


# ---------------------------------------------------------------- decomposition
def test_decomposition_sums_to_the_projection(ref):
    r, batches = _r_hat(), _batches("direction")
    d = decompose(ref, batches, r, 1)
    assert d.embed + sum(d.attn) + sum(d.mlp) == pytest.approx(d.total, abs=1e-5)
    for attn, heads in zip(d.attn, d.heads):  # Llama's o_proj has no bias
        assert sum(heads) == pytest.approx(attn, abs=1e-5)
    assert d.total == pytest.approx(_mean(ref, batches, Metric("direction", r, 1)), abs=1e-5)


# ---------------------------------------------------------------- bad input
class _Tok:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return self.vocab

    def __len__(self):
        return len(self.vocab)


def test_bad_input_raises_one_line_errors(ref):
    with pytest.raises(AttributionError, match="does not exist"):
        resolve(ref, ["L7.mlp"])
    with pytest.raises(AttributionError, match="does not exist"):
        resolve(ref, ["L0.H9"])
    with pytest.raises(AttributionError, match="unknown component"):
        resolve(ref, ["L0.ffn"])
    with pytest.raises(AttributionError, match="unknown component kind"):
        components(ref, ["linear"])
    import transformers as T

    from conftest import TINY

    torch.manual_seed(0)
    two = from_model(T.LlamaForCausalLM(T.LlamaConfig(**{**TINY, "num_hidden_layers": 2})).eval())
    with pytest.raises(AttributionError, match="2 blocks"):
        check_pair(ref, two)
    a, b = copy.copy(ref), copy.copy(ref)
    a.tokenizer, b.tokenizer = _Tok({"a": 0}), _Tok({"b": 0, "c": 1})
    with pytest.raises(AttributionError, match="another tokenizer"):
        check_pair(a, b)
    for e in (AttributionError, NoGapError):
        assert issubclass(e, __import__("trace_lib.errors").errors.TraceError)


def test_localize_refuses_without_refusals_or_gap(tiny_folder):
    with pytest.raises(NoGapError, match="refuses none"):
        localize(str(tiny_folder), "int4-rtn-g32", n_prompts=3, max_new_tokens=4)
    with pytest.raises(NoGapError, match="includes 0"):
        localize(str(tiny_folder), "fp32", n_prompts=3, refusal_reply="I can't help with that.")


def test_verify_top_patches_the_top_of_atps_list(tiny_folder):
    kw = dict(n_prompts=8, refusal_reply="I can't help with that.", components=["attn", "mlp"])
    triage = localize(str(tiny_folder), "int2-rtn-g32", method="atp", verify_top=3, **kw)
    full = localize(str(tiny_folder), "int2-rtn-g32", method="patch", **kw)
    order = np.argsort(-np.asarray(triage.atp["fraction"]), kind="stable")[:3]
    assert [p["component"] for p in triage.patch] == [triage.atp["components"][i] for i in order]
    truth = {p["component"]: p["gap_restored"] for p in full.patch}
    for p in triage.patch:
        assert p["gap_restored"] == pytest.approx(truth[p["component"]], abs=1e-6)
        assert p["gap_introduced"] is None
    assert triage.settings["verified_top"] == 3
    from trace_lib.report import load_result, render_html

    page = render_html(load_result(json.loads(triage.to_json())))
    assert "restore (AtP" in page and page.count('<tr') >= len(triage.components)


def test_audit_localization_line(tiny_folder):
    """``trace audit --localize``'s record: the localisation's damage line, in the variant's summary and its JSON."""
    from trace_lib.attribution.triage import localize_damage
    from trace_lib.audit.records import VariantAudit
    from trace_lib.compare import resolve_variant
    from trace_lib.datasets.registry import get_dataset
    from trace_lib.models import load_model

    ref = load_model(str(tiny_folder))
    var = resolve_variant(ref, "int2-rtn-g32")
    ds = get_dataset("safety_comprehensive_v1")
    loc = localize_damage(ref, var, ds, verify_top=2, refusal_reply="I can't help with that.")
    assert loc["line"].startswith(("the damage enters mostly at", "the damage could not be placed"))
    assert len(loc["top"]) == 2 and loc["gap"]["n"] > 0
    if loc["top"][0]["gap_restored"] > 0:
        assert loc["top"][0]["component"] in loc["line"]
    none = localize_damage(ref, var, ds, verify_top=2)  # the tiny model refuses nothing: the reason, no ranking
    assert none["line"].startswith("not localised:") and none["top"] == []
    v = VariantAudit("int2-rtn-g32", {}, [], {}, [], {}, None, localization=loc)
    assert VariantAudit.from_dict(json.loads(json.dumps(v.to_dict()))).localization["line"] == loc["line"]


def test_localize_result_round_trip(tiny_folder):
    r = localize(str(tiny_folder), "int2-rtn-g32", n_prompts=8, refusal_reply="I can't help with that.",
                 n_weight_check=2, graddrop=True)
    assert "GradDrop" in r.summary() and len(r.atp["graddrop"]) == len(r.components)
    assert r.gap["lo"] > 0 or r.gap["hi"] < 0
    assert [p["component"] for p in r.patch] == r.components == r.atp["components"]
    assert r.comparison["n"] == len(r.components) and r.weights and r.decomposition
    assert len(r.weights["restored"]) == 4
    again = LocalizeResult.from_dict(json.loads(r.to_json()))
    assert again.summary() == r.summary() and "gap" in r.summary()
    from trace_lib.report import load_result, render_html

    page = render_html(load_result(json.loads(r.to_json())))
    for sid in ("verdict", "components", "atp", "weights", "direction", "models"):
        assert f'id="{sid}"' in page
    assert page.count('class="plot"') == 3 and "the damage enters mostly at" in page
    with pytest.raises(ResultFormatError, match="not a localize result"):
        LocalizeResult.from_dict({"kind": "trace.compare", "version": 1})


# ---------------------------------------------------------------- CLI
def test_cli_localize_writes_json(tiny_folder, tmp_path, capsys):
    from trace_lib.cli import main

    main(["localize", "--model", str(tiny_folder), "-v", "int2-rtn-g32", "--method", "patch", "-c", "mlp",
          "--prompts", "8", "--refusal-reply", "I can't help with that.", "--out", str(tmp_path / "out"),
          "--html", str(tmp_path / "l.html")])
    page = (tmp_path / "l.html").read_text()
    assert 'id="verdict"' in page and 'id="components"' in page and page.count("<svg") >= 1
    data = json.loads((tmp_path / "out" / "localize.json").read_text())
    assert data["kind"] == "trace.localize" and data["version"] == 1
    assert [p["component"] for p in data["patch"]] == ["L0.mlp", "L1.mlp", "L2.mlp"]
    assert data["atp"] is None and data["weights"] is None
    out = capsys.readouterr().out
    assert "[int2-rtn-g32]" in out and "L1.mlp" in out


@pytest.mark.parametrize("argv, message", [
    (["--method", "bogus"], "--method must be one of"),
    (["-c", "L1.ffn"], "--components must be one of"),
    (["-v", "int4-bogus"], "unknown quantization config"),
    (["--prompts", "0"], "--prompts must be an integer >= 1"),
])
def test_cli_localize_bad_options_are_one_line(argv, message, capsys):
    from trace_lib.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["localize", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_cli_localize_nothing_refused_and_missing_layer_are_one_line(tiny_folder, capsys):
    from trace_lib.cli import main

    for argv, message in ((["--prompts", "2"], "refuses none"),
                          (["--prompts", "2", "--refusal-reply", "No.", "-c", "L9.mlp"], "does not exist")):
        with pytest.raises(SystemExit) as exc:
            main(["localize", "--model", str(tiny_folder), "-v", "int4-rtn-g32", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------- the real default model
@pytest.mark.slow
def test_default_model_atp_against_patching(capsys):
    """Spearman(AtP, patching) over the 60 attn/mlp components of default-safety vs gguf-q4_0 is measured and
    printed (not asserted as a number); the top component by patching restores more than a random one."""
    r = localize("default-safety", "gguf-q4_0", components=["attn", "mlp"], n_prompts=4, batch_size=4,
                 with_decomposition=False)
    assert len(r.patch) == 60 and r.comparison["n"] == 60
    with capsys.disabled():
        print(f"\ndefault-safety vs gguf-q4_0, 4 prompts: gap {r.gap['value']:.4f} "
              f"[{r.gap['lo']:.4f}, {r.gap['hi']:.4f}]; Spearman(AtP, inject) {r.comparison['spearman_inject']:.3f}, "
              f"(AtP, restore) {r.comparison['spearman_restore']:.3f}; FNR top10 {r.comparison['fnr_top10']:.2f}; "
              f"{r.damage_line()}")
    ranked = r.ranking()
    other = ranked[1:][int(np.random.default_rng(0).integers(len(ranked) - 1))]
    assert ranked[0]["gap_restored"] > other["gap_restored"]


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "qwen3", "gemma3", "phi3"])
def test_other_families_heads_and_final_residual(arch):
    """Per-head sites exist for every family (GPT-2 Conv1D c_proj, NeoX dense, Qwen3/Gemma 3 o_proj), also on a
    torch.ao int8-dynamic variant (quantized modules), and the final residual restores the whole gap."""
    torch.set_num_threads(1)
    ref = tiny_loaded(arch)
    var = quantize(ref, "int8-dynamic")
    b = [build_batch(_prompts(3), "refusal-logprob", [[5, 6]] * 3, [9])]
    comps = components(ref, ["heads"]) + [Component(ref.n_layers, "resid_pre")]
    run = activation_patch(ref, var, b, Metric(), comps, modes=("restore",))
    assert run.results[-1].gap_restored == pytest.approx(1.0, abs=1e-5)
    assert len(run.results) == 4 * ref.n_layers + 1


def test_residual_read_by_the_direction_metric_is_patchable(ref):
    """M reads the residual after block 1; patching L2.resid_pre (that same residual) restores exactly 1, and
    nothing after it matters."""
    var = from_model(quantize(ref, "int2-rtn-g32").model, name="int2")
    met, batches = Metric("direction", _r_hat(), 1), _batches("direction")
    run = activation_patch(ref, var, batches, met, [Component(2, "resid_pre"), Component(2, "attn"),
                                                    Component(3, "resid_pre")])
    assert [r.gap_restored for r in run.results] == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)



@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen3", "gemma3", "phi3"])
@pytest.mark.parametrize("kind", ["refusal-logprob", "direction"])
def test_replay_from_the_patched_block_gives_the_same_numbers(arch, kind):
    """Starting each patched forward at the patched block (cached residual before it) changes no number."""
    torch.set_num_threads(1)
    ref = tiny_loaded(arch)
    var = quantize(ref, "int8-dynamic" if arch in ("gpt2", "phi3") else "int2-rtn-g32")
    met = Metric() if kind == "refusal-logprob" else Metric("direction", _r_hat(), 1)
    b = _batches(kind)[:1]
    comps = components(ref, ["resid", "attn", "mlp"]) + [Component(2, "head", 1)]
    calls = []
    for m in (ref, var):
        m.arch.layers[0].register_forward_hook(lambda *a: calls.append(1))
    fast = activation_patch(ref, var, b, met, comps)
    n_fast = len(calls)
    slow = activation_patch(ref, var, b, met, comps, replay=False)
    assert n_fast < len(calls) - n_fast  # block 0 ran only for patches at layer 0 and the caches
    for f, s in zip(fast.results, slow.results):
        assert f.gap_restored == pytest.approx(s.gap_restored, abs=1e-6), f.component
        assert f.gap_introduced == pytest.approx(s.gap_introduced, abs=1e-6), f.component


@pytest.mark.parametrize("kind", ["refusal-logprob", "direction"])
def test_unquantize_runs_from_the_linears_block_give_the_same_numbers(ref, kind):
    var = quantize(ref, "int4-rtn-g32")
    met, batches = METRICS[kind](), _batches(kind)
    m_ref, m_var = _mean(ref, batches, met), _mean(var, batches, met)
    args = (ref, var, batches, met, m_ref - m_var, m_var)
    fast = weight_attribution(*args, exact="all")
    slow = weight_attribution(*args, exact="all", replay=False)
    assert fast.restored.keys() == slow.restored.keys() and len(fast.restored) == 21
    for n, v in fast.restored.items():
        assert v == pytest.approx(slow.restored[n], abs=1e-6), n
    with unquantized(ref, var, ["model.layers.1.mlp.down_proj"]):  # and one of them directly
        direct = (_mean(var, batches, met) - m_var) / (m_ref - m_var)
    assert fast.restored["model.layers.1.mlp.down_proj"] == pytest.approx(direct, abs=1e-6)

