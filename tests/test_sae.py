"""Tests for trace_lib.sae: model semantics, SAELens/sparsify I/O, training, and metrics (CPU, seconds)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trace_lib.errors import SAEError, TraceError
from trace_lib.sae import (
    SAE,
    SAEConfig,
    SAETrainingConfig,
    ce_loss_recovered,
    check_sae_fits,
    dead_fraction,
    dense_fraction,
    evaluate_sae,
    explained_variance,
    feature_frequencies,
    geometric_median,
    hookpoint_to_hook_name,
    load_sae,
    load_sae_dir,
    mean_l0,
    save_sae,
    train_sae,
)

HOOK = "blocks.5.hook_resid_post"
PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls are far faster single-threaded; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- helpers
def hand_sae(arch: str, **kw) -> SAE:
    """d_in=2, d_sae=3 SAE with small hand-picked weights."""
    sae = SAE(SAEConfig(d_in=2, d_sae=3, architecture=arch, k=2 if arch == "topk" else None, hook_name=HOOK, **kw))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0, 2.0], [0.5, 1.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.5, -0.5]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.tensor([1.0, 0.1, 2.0]))
    return sae


def random_sae(arch: str, d_in: int = 8, d_sae: int = 16, seed: int = 0, **kw) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=3 if arch == "topk" else None,
                        hook_name=HOOK, model_name="toy", **kw))
    with torch.no_grad():
        for name in PARAMS:
            p = getattr(sae, name)
            p.copy_(torch.randn(p.shape, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=g))
    return sae


def sparse_data(n: int = 16384, d: int = 32, m: int = 64, k: int = 4, seed: int = 0):
    """x = codes @ D: k of m non-negative ground-truth latents active per row, D random unit rows in R^d."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(m, d, generator=g)
    dictionary = dictionary / dictionary.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=g).argsort(dim=1)[:, :k]
    codes = torch.zeros(n, m)
    codes.scatter_(1, idx, torch.rand(n, k, generator=g) + 0.5)
    return codes @ dictionary, dictionary


def same_weights(a: SAE, b: SAE) -> bool:
    names = PARAMS + (("threshold",) if a.cfg.architecture == "jumprelu" else ())
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in names)


# ---------------------------------------------------------------------------------------------- model
X3 = torch.tensor([[1.0, 2.0], [0.0, -1.0], [2.0, 0.0]])  # 3 tokens, d_in=2


def hand_pre(x: torch.Tensor) -> torch.Tensor:
    """Pre-activations of hand_sae computed by hand: (x - b_dec) @ W_enc + b_enc."""
    rows = []
    for x0, x1 in x.tolist():
        a0, a1 = x0 - 0.5, x1 + 0.5
        rows.append([a0 * 1.0 + a1 * 0.5 + 0.0, -a0 + a1 + 0.5, 2 * a0 - a1 - 0.5])
    return torch.tensor(rows)


def test_hand_pre_activations_are_what_we_think():
    # token 0: a=(0.5, 2.5) -> [1.75, 2.5, -2.0]; token 1: a=(-0.5, -0.5) -> [-0.75, 0.5, -1.0]
    # token 2: a=(1.5, 0.5) -> [1.75, -0.5, 2.0]
    assert torch.allclose(hand_pre(X3), torch.tensor([[1.75, 2.5, -2.0], [-0.75, 0.5, -1.0], [1.75, -0.5, 2.0]]))
    assert torch.allclose(hand_sae("relu").encode_pre(X3), hand_pre(X3))


def test_encode_relu_matches_hand_computation():
    sae = hand_sae("relu")
    z = sae.encode(X3)
    assert z.shape == (3, 3)
    assert torch.allclose(z, torch.tensor([[1.75, 2.5, 0.0], [0.0, 0.5, 0.0], [1.75, 0.0, 2.0]]))
    x_hat = sae.decode(z)
    assert x_hat.shape == (3, 2)
    # z @ W_dec + b_dec: token 0 -> (1.75 + 0.5, 2.5 - 0.5)
    assert torch.allclose(x_hat[0], torch.tensor([2.25, 2.0]))
    assert torch.allclose(sae(X3), x_hat)


def test_encode_topk_matches_hand_computation():
    sae = hand_sae("topk")  # k=2
    z = sae.encode(X3)
    # token 0: top-2 of [1.75, 2.5, -2] -> keep 1.75, 2.5; token 1: top-2 of [-0.75, 0.5, -1] -> 0.5 and
    # ReLU(-0.75)=0 (SAELens: topk, then ReLU); token 2: top-2 of [1.75, -0.5, 2] -> 1.75, 2.
    assert torch.allclose(z, torch.tensor([[1.75, 2.5, 0.0], [0.0, 0.5, 0.0], [1.75, 0.0, 2.0]]))


def test_encode_jumprelu_matches_hand_computation():
    sae = hand_sae("jumprelu")  # threshold [1, 0.1, 2]
    z = sae.encode(X3)
    # token 0: 1.75>1 keep, 2.5>0.1 keep; token 1: 0.5>0.1 keep; token 2: 1.75>1 keep, 2.0 not > 2.0 -> 0
    assert torch.allclose(z, torch.tensor([[1.75, 2.5, 0.0], [0.0, 0.5, 0.0], [1.75, 0.0, 0.0]]))


def test_apply_b_dec_to_input_false_and_input_scaling():
    sae = hand_sae("relu", apply_b_dec_to_input=False)
    assert torch.allclose(sae.encode_pre(X3), X3 @ sae.W_enc + sae.b_enc)
    scaled = hand_sae("relu", normalize_activations="expected_average_only_in", norm_scaling_factor=2.0)
    plain = hand_sae("relu")
    # encode applies the factor, decode undoes it: codes are those of 2x, reconstructions come back in raw units
    assert torch.allclose(scaled.encode(X3), plain.encode(2 * X3))
    assert torch.allclose(scaled(X3), plain(2 * X3) / 2)
    folded = hand_sae("relu", normalize_activations="expected_average_only_in", norm_scaling_factor=2.0)
    folded.fold_scaling_factor()
    assert folded.cfg.input_scale is None
    assert torch.allclose(folded.encode(X3), scaled.encode(X3))
    assert torch.allclose(folded(X3), scaled(X3))


def test_topk_gives_exactly_k_nonzeros_per_row():
    sae = random_sae("topk", d_in=8, d_sae=16)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive
    z = sae.encode(torch.randn(50, 8, generator=torch.Generator().manual_seed(1)))
    assert ((z != 0).sum(dim=-1) == 3).all()
    # with fewer than k positive pre-activations, SAELens semantics give fewer non-zeros (never more)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
    assert ((sae.encode(torch.randn(5, 8)) != 0).sum(dim=-1) <= 3).all()


def test_encode_accepts_leading_dims_and_rejects_wrong_width():
    sae = random_sae("relu")
    assert sae.encode(torch.randn(2, 5, 8)).shape == (2, 5, 16)
    assert sae(torch.randn(2, 5, 8)).shape == (2, 5, 8)
    with pytest.raises(SAEError, match="last dimension 8"):
        sae.encode(torch.randn(4, 7))


def test_config_validation():
    with pytest.raises(SAEError, match="relu, topk, jumprelu"):
        SAEConfig(d_in=4, d_sae=8, architecture="gated")
    with pytest.raises(SAEError, match="needs an integer k"):
        SAEConfig(d_in=4, d_sae=8, architecture="topk")
    with pytest.raises(SAEError, match="between 1 and d_sae"):
        SAEConfig(d_in=4, d_sae=8, architecture="topk", k=9)
    with pytest.raises(SAEError, match="normalize_activations"):
        SAEConfig(d_in=4, d_sae=8, architecture="relu", normalize_activations="layer_norm")
    assert issubclass(SAEError, TraceError)


# ---------------------------------------------------------------------------------------------- I/O
@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_save_load_round_trip_is_bit_exact(arch: str, tmp_path: Path):
    sae = random_sae(arch, metadata={"note": "hello"})
    folder = save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    tensors = load_file(folder / "sae_weights.safetensors")
    expected = set(PARAMS) | ({"threshold"} if arch == "jumprelu" else set())
    assert set(tensors) == expected
    assert tensors["W_enc"].shape == (8, 16) and tensors["W_dec"].shape == (16, 8)
    cfg = json.loads((folder / "cfg.json").read_text())
    for key in ("d_in", "d_sae", "architecture", "hook_name", "dtype", "device", "apply_b_dec_to_input",
                "normalize_activations", "model_name"):
        assert key in cfg
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    assert cfg["device"] == "cpu" and cfg["hook_name"] == HOOK and cfg["hook_layer"] == 5
    assert ("k" in cfg) == (arch == "topk")
    loaded = load_sae(folder)
    assert loaded.cfg.architecture == arch and loaded.cfg.hook_name == HOOK
    assert loaded.cfg.metadata == {"note": "hello"}
    assert same_weights(sae, loaded)
    x = torch.randn(10, 8)
    assert torch.equal(sae.encode(x), loaded.encode(x))


def test_save_overwrites_existing_sae_folder_but_not_other_folders(tmp_path: Path):
    a, b = random_sae("topk", seed=1), random_sae("topk", seed=2)
    save_sae(a, tmp_path / "sae")
    save_sae(b, tmp_path / "sae")
    assert same_weights(load_sae(tmp_path / "sae"), b)
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temporary leftovers
    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("mine")
    with pytest.raises(SAEError, match="not an SAE folder"):
        save_sae(a, other)


def test_save_folds_scaling_factor_unless_asked_not_to(tmp_path: Path):
    sae = random_sae("jumprelu", normalize_activations="expected_average_only_in", norm_scaling_factor=3.0)
    x = torch.randn(20, 8)
    kept = load_sae(save_sae(sae, tmp_path / "kept", fold_scaling=False))
    assert kept.cfg.norm_scaling_factor == 3.0 and same_weights(kept, sae)
    folded = load_sae(save_sae(sae, tmp_path / "folded"))
    assert folded.cfg.normalize_activations == "none" and folded.cfg.input_scale is None
    assert sae.cfg.input_scale == 3.0  # the caller's SAE is untouched
    assert torch.allclose(folded.encode(x), sae.encode(x), atol=1e-5)
    assert torch.allclose(folded(x), sae(x), atol=1e-5)


# ---------------------------------------------------------------------------------------------- content hash
def _changed(sae: SAE, name: str, delta: float = 0.25) -> SAE:
    """A copy of ``sae`` with one entry of parameter ``name`` moved by ``delta``."""
    out = copy.deepcopy(sae)
    with torch.no_grad():
        getattr(out, name).view(-1)[0] += delta
    return out


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_content_hash_covers_every_weight_and_the_encode_config(arch: str):
    """Equal SAEs hash alike; a change to any weight -- b_enc and threshold included, with W_enc equal (what the
    old W_enc-only identity could not tell apart) -- or to what encode/decode read changes the hash."""
    sae = random_sae(arch)
    h = sae.content_hash()
    assert len(h) == 64 and h == random_sae(arch).content_hash() == copy.deepcopy(sae).content_hash()
    names = PARAMS + (("threshold",) if arch == "jumprelu" else ())
    hashes = {h}
    for name in names:
        other = _changed(sae, name)
        assert torch.equal(other.W_enc, sae.W_enc) == (name != "W_enc")
        hashes.add(other.content_hash())
    assert len(hashes) == len(names) + 1
    assert SAE(SAEConfig(**{**sae.cfg.to_dict(), "apply_b_dec_to_input": False})).content_hash() != \
        SAE(sae.cfg).content_hash()
    scaled = copy.deepcopy(sae)
    scaled.cfg.normalize_activations, scaled.cfg.norm_scaling_factor = "expected_average_only_in", 2.0
    assert scaled.content_hash() != h
    assert copy.deepcopy(sae).to(torch.float64).content_hash() != h  # another dtype encodes differently
    if arch == "topk":
        other = copy.deepcopy(sae)
        other.cfg.k = 4
        assert other.content_hash() != h
    # what encode/decode do not read is left out
    renamed = copy.deepcopy(sae)
    renamed.cfg.hook_name, renamed.cfg.model_name, renamed.cfg.metadata = "blocks.0.hook_resid_pre", "x", {"a": 1}
    assert renamed.content_hash() == h


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_content_hash_survives_a_saelens_round_trip(arch: str, tmp_path: Path):
    sae = random_sae(arch, metadata={"note": "hello"})
    assert load_sae(save_sae(sae, tmp_path / "sae")).content_hash() == sae.content_hash()
    # a scaling factor is folded on save: the copy hashes like the folded SAE
    scaled = random_sae(arch, normalize_activations="expected_average_only_in", norm_scaling_factor=3.0)
    back = load_sae(save_sae(scaled, tmp_path / "scaled"))
    assert back.content_hash() == copy.deepcopy(scaled).fold_scaling_factor().content_hash()
    assert back.content_hash() != scaled.content_hash()


def test_checkpoint_from_another_init_from_sae_is_refused(tmp_path: Path):
    """The training key holds the starting SAE's content hash: an init_from SAE differing only in b_enc (or a
    JumpReLU threshold) gives another key and its checkpoint is refused; an equal copy resumes."""
    from trace_lib.sae.training.trainer import training_key

    x, _ = sparse_data(n=1000, d=16, m=32)
    for arch in ("relu", "jumprelu"):
        init = random_sae(arch, d_in=16, d_sae=32)
        cfg = SAETrainingConfig(architecture=arch, d_sae=32, epochs=1, **FAST)
        key = training_key(cfg, 16, init)
        assert key == training_key(cfg, 16, copy.deepcopy(init)) != training_key(cfg, 16, None)
        names = ("b_enc", "threshold") if arch == "jumprelu" else ("b_enc",)
        assert all(training_key(cfg, 16, _changed(init, name)) != key for name in names)
    folder = tmp_path / "ckpt"
    train_sae(x, cfg, HOOK, checkpoint_dir=folder, progress=False, max_steps=2, init_from=init)
    with pytest.raises(SAEError, match="different training config"):
        train_sae(x, cfg, HOOK, checkpoint_dir=folder, progress=False, init_from=_changed(init, "b_enc"))
    _, log = train_sae(x, cfg, HOOK, checkpoint_dir=folder, progress=False, init_from=copy.deepcopy(init))
    assert log["resumed_from_step"] == 2


def write_sparsify(folder: Path, sae: SAE, **cfg_extra) -> None:
    """A sparsify-format folder equivalent to a topk SAE with apply_b_dec_to_input=True."""
    folder.mkdir(parents=True)
    cfg = {"activation": "topk", "expansion_factor": 2, "normalize_decoder": True, "num_latents": sae.cfg.d_sae,
           "k": sae.cfg.k, "multi_topk": False, "skip_connection": False, "transcode": False,
           "d_in": sae.cfg.d_in, **cfg_extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {
            "encoder.weight": sae.W_enc.detach().T.contiguous(),
            "encoder.bias": sae.b_enc.detach().clone(),
            "W_dec": sae.W_dec.detach().clone(),
            "b_dec": sae.b_dec.detach().clone(),
        },
        str(folder / "sae.safetensors"),
    )


def test_sparsify_folder_loads_with_same_codes_as_saelens(tmp_path: Path):
    ref = random_sae("topk")
    write_sparsify(tmp_path / "layers.5", ref)
    sp = load_sae(tmp_path / "layers.5")
    assert sp.cfg.architecture == "topk" and sp.cfg.k == 3 and sp.cfg.hook_name == HOOK
    assert sp.cfg.metadata["source_format"] == "sparsify"
    x = torch.randn(64, 8)
    assert torch.equal(sp.encode(x), ref.encode(x))
    assert torch.equal(sp(x), ref(x))
    # sparsify's own recipe (ReLU first, then top-k) gives the same code vectors
    pre = torch.relu((x - ref.b_dec) @ ref.W_enc + ref.b_enc)
    top = pre.topk(3, dim=-1)
    sparsify_codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    assert torch.equal(sp.encode(x), sparsify_codes)
    # num_latents=0 means d_in * expansion_factor
    write_sparsify(tmp_path / "layers.7", random_sae("topk", d_in=8, d_sae=16), num_latents=0)
    assert load_sae(tmp_path / "layers.7").cfg.d_sae == 16


def test_hookpoint_names_map_to_transformerlens():
    assert hookpoint_to_hook_name("layers.5") == "blocks.5.hook_resid_post"
    assert hookpoint_to_hook_name("model.layers.12") == "blocks.12.hook_resid_post"
    assert hookpoint_to_hook_name("gpt_neox.layers.3") == "blocks.3.hook_resid_post"
    assert hookpoint_to_hook_name("layers.2.mlp") == "blocks.2.hook_mlp_out"
    assert hookpoint_to_hook_name("layers.2.self_attn") == "blocks.2.hook_attn_out"
    assert hookpoint_to_hook_name("blocks.4.hook_resid_pre") == "blocks.4.hook_resid_pre"


def test_load_sae_dir_returns_dict_keyed_by_hook(tmp_path: Path):
    a = random_sae("relu", seed=1)
    b = random_sae("jumprelu", seed=2)
    b.cfg.hook_name = "blocks.7.hook_resid_post"
    save_sae(a, tmp_path / "saes" / "five")
    save_sae(b, tmp_path / "saes" / "seven")
    write_sparsify(tmp_path / "saes" / "layers.3", random_sae("topk", seed=3))
    (tmp_path / "saes" / "empty_dir").mkdir()
    saes = load_sae_dir(tmp_path / "saes")
    assert sorted(saes) == ["blocks.3.hook_resid_post", "blocks.5.hook_resid_post", "blocks.7.hook_resid_post"]
    assert same_weights(saes[HOOK], a)
    assert saes["blocks.3.hook_resid_post"].cfg.architecture == "topk"
    # a single SAE folder is a dict of one
    assert list(load_sae_dir(tmp_path / "saes" / "five")) == [HOOK]
    # two SAEs for one hook is an error
    save_sae(random_sae("relu", seed=4), tmp_path / "saes" / "five_again")
    with pytest.raises(SAEError, match="two SAEs .* are for blocks.5.hook_resid_post"):
        load_sae_dir(tmp_path / "saes")


def test_loads_pre_6_saelens_topk_config(tmp_path: Path):
    sae = random_sae("topk")
    folder = save_sae(sae, tmp_path / "old")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["k"]
    cfg.update(architecture="standard", activation_fn_str="topk", activation_fn_kwargs={"k": 3})
    del cfg["activation_fn"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(folder)
    assert loaded.cfg.architecture == "topk" and loaded.cfg.k == 3


def test_loads_saelens_topk_with_rescale_acts_by_decoder_norm(tmp_path: Path):
    sae = random_sae("topk")  # decoder rows are not unit norm
    folder = save_sae(sae, tmp_path / "rescaled")
    _edit_cfg(folder, rescale_acts_by_decoder_norm=True)
    loaded = load_sae(folder)
    x = torch.randn(32, 8)
    # SAELens TopKSAE with the flag: topk(ReLU) of pre * ||W_dec||, decode (z / ||W_dec||) @ W_dec + b_dec
    norms = sae.W_dec.norm(dim=-1)
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc) * norms
    top = pre.topk(3, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    assert torch.allclose(loaded.encode(x), z, atol=1e-5)
    assert torch.allclose(loaded(x), (z / norms) @ sae.W_dec + sae.b_dec, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
def _edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_load_errors_are_clear(tmp_path: Path):
    with pytest.raises(SAEError, match="does not exist"):
        load_sae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEError, match="no cfg.json in"):
        load_sae(tmp_path / "empty")
    good = save_sae(random_sae("topk"), tmp_path / "multi" / "a")
    with pytest.raises(SAEError, match="load_sae_dir"):
        load_sae(good.parent)

    f = save_sae(random_sae("relu"), tmp_path / "missing")
    _edit_cfg(f, d_in=None)
    with pytest.raises(SAEError, match="missing required field 'd_in'"):
        load_sae(f)

    f = save_sae(random_sae("relu"), tmp_path / "shape")
    _edit_cfg(f, d_sae=17)
    with pytest.raises(SAEError, match=r"W_enc has shape \[8, 16\] but cfg.json .* implies \[8, 17\]"):
        load_sae(f)

    f = save_sae(random_sae("relu"), tmp_path / "arch")
    _edit_cfg(f, architecture="gated")
    with pytest.raises(SAEError, match="unknown SAE architecture 'gated'.*supports standard/relu, topk, jumprelu"):
        load_sae(f)

    f = save_sae(random_sae("topk"), tmp_path / "nok")
    _edit_cfg(f, k=None, activation_fn_kwargs=None)
    with pytest.raises(SAEError, match="'k'"):
        load_sae(f)

    f = save_sae(random_sae("relu"), tmp_path / "nan")
    tensors = load_file(f / "sae_weights.safetensors")
    tensors["W_dec"][3, 2] = float("nan")
    save_file(tensors, str(f / "sae_weights.safetensors"))
    with pytest.raises(SAEError, match="W_dec contains NaN/Inf"):
        load_sae(f)

    f = save_sae(random_sae("relu"), tmp_path / "trunc")
    (f / "sae_weights.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(SAEError, match="not safetensors"):
        load_sae(f)

    f = save_sae(random_sae("relu"), tmp_path / "nojson")
    (f / "cfg.json").write_text("{not json")
    with pytest.raises(SAEError, match="not valid JSON"):
        load_sae(f)

    f = save_sae(random_sae("relu"), tmp_path / "norm")
    _edit_cfg(f, normalize_activations="layer_norm")
    with pytest.raises(SAEError, match="unsupported normalize_activations 'layer_norm'"):
        load_sae(f)

    sp = tmp_path / "layers.1"
    write_sparsify(sp, random_sae("topk"), activation="groupmax")
    with pytest.raises(SAEError, match="unsupported sparsify activation 'groupmax'"):
        load_sae(sp)


def test_check_sae_fits():
    sae = SAE(SAEConfig(d_in=512, d_sae=1024, architecture="relu", hook_name=HOOK, model_name="gpt2"))
    check_sae_fits(sae, HOOK, 512)
    check_sae_fits(sae, "layers.5", 512)  # sparsify spelling of the same hook
    with pytest.raises(
        SAEError, match="SAE for blocks.5.hook_resid_post has d_in=512 but the model's width there is 576: "
    ):
        check_sae_fits(sae, HOOK, 576)
    with pytest.raises(SAEError, match="applied at blocks.6.hook_resid_post"):
        check_sae_fits(sae, "blocks.6.hook_resid_post", 512)


# ---------------------------------------------------------------------------------------------- training
FAST = dict(batch_size=256, lr=3e-3, device="cpu")


def test_topk_training_recovers_ground_truth():
    x, dictionary = sparse_data()
    cfg = SAETrainingConfig(architecture="topk", k=4, d_sae=128, epochs=4, **FAST)
    sae, log = train_sae(x, cfg, HOOK, progress=False, model_name="toy")
    assert log["steps"] == 4 * 16384 // 256 and log["tokens"] == 4 * 16384
    assert log["tokens_per_s"] > 0 and math.isfinite(log["final_mse"])
    assert sae.cfg.hook_name == HOOK and sae.cfg.model_name == "toy" and sae.cfg.k == 4
    assert sae.cfg.input_scale is None  # the scaling factor was folded into the weights
    assert sae.cfg.metadata["norm_scaling_factor_folded"] == pytest.approx(log["norm_scaling_factor"])
    metrics = evaluate_sae(sae, x)
    assert metrics["explained_variance"] > 0.9
    assert metrics["l0"] <= 4
    decoder = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best_cos = (dictionary @ decoder.T).max(dim=1).values
    assert (best_cos > 0.9).float().mean() > 0.9


def test_decoder_refit_is_the_least_squares_decoder_and_keeps_the_codes():
    """refit_decoder against an independent least-squares solve on the same codes (torch.linalg.lstsq on the
    design [F, 1]): same reconstruction; the latents that fire are the same and each code is only rescaled."""
    from trace_lib.sae.training import SAETrainer as _Trainer

    x, _ = sparse_data(n=3000, d=16, m=32)
    cfg = SAETrainingConfig(architecture="relu", d_sae=48, epochs=2, l1_coefficient=2.0, **FAST)
    trained, _ = train_sae(x, cfg, HOOK, progress=False)
    t = _Trainer(cfg, 16, torch.device("cpu"), 10)
    t.initialise(x)
    for name in PARAMS:  # the trained SAE, in raw units (scale 1)
        getattr(t.sae, name).data.copy_(getattr(trained, name))
    t.scale = 1.0
    codes = t.sae.encode(x)
    alive = (codes > 0).any(dim=0)
    design = torch.cat([codes[:, alive], torch.ones(len(x), 1)], dim=1).double()
    sol = torch.linalg.lstsq(design, x.double()).solution
    lstsq_recon = (design @ sol).float()
    stats = t.refit_decoder(x.split(700), ridge=1e-9)
    new_codes = t.sae.encode(x)
    assert torch.equal(new_codes > 0, codes > 0)
    per_latent = new_codes.sum(dim=0) / codes.sum(dim=0).clamp_min(1e-12)
    assert torch.allclose(new_codes, codes * per_latent, rtol=1e-4, atol=1e-5)  # one factor per latent
    recon = t.sae.decode(new_codes)
    assert torch.allclose(recon, lstsq_recon, atol=2e-4)
    assert torch.allclose(t.sae.W_dec.norm(dim=1), trained.W_dec.norm(dim=1), rtol=1e-5)  # norms as trained
    mse = (x - recon).pow(2).sum(dim=1).mean().item()
    assert stats["refit_mse_after"] == pytest.approx(mse, rel=1e-3)
    assert stats["refit_mse_after"] < stats["refit_mse_before"]
    # train_sae with refit_decoder=True: the same codes' support as without, a lower training-set MSE
    refit, log = train_sae(x, SAETrainingConfig(**{**cfg.to_dict(), "refit_decoder": True}), HOOK, progress=False)
    assert torch.equal(refit.encode(x) > 0, trained.encode(x) > 0)
    assert log["refit_mse_after"] < log["refit_mse_before"]
    assert refit.cfg.metadata["decoder_refit"]["refit_mse_after"] == log["refit_mse_after"]
    assert (x - refit(x)).pow(2).sum(dim=1).mean() < (x - trained(x)).pow(2).sum(dim=1).mean()


def test_target_l0_steers_the_l1_coefficient_to_the_target():
    """From L1 coefficients 10x apart, the dual-ascent controller ends near L0 = 6 with about the same
    coefficient (the one that gives that L0), and each run's coefficient is recorded."""
    x, _ = sparse_data(n=8192, d=32, m=64, k=4)
    finals = []
    for start in (0.3, 3.0):
        # a toy run settles sooner than a real one: the controller may start at 20% of training
        cfg = SAETrainingConfig(architecture="relu", d_sae=128, epochs=8, l1_coefficient=start, target_l0=6.0,
                                l1_adapt_rate=0.02, l1_adapt_window=(0.2, 0.8), **FAST)
        sae, log = train_sae(x, cfg, HOOK, progress=False)
        l0 = (sae.encode(x) > 0).sum(dim=1).float().mean().item()
        assert 6.0 * 0.75 < l0 < 6.0 * 1.25, (start, l0)
        assert sae.cfg.metadata["final_l1_coefficient"] == log["final_l1_coefficient"]
        finals.append(log["final_l1_coefficient"])
    assert max(finals) / min(finals) < 1.5
    # without a target the coefficient stays where it was set
    _, log = train_sae(x, SAETrainingConfig(architecture="relu", d_sae=128, epochs=1, l1_coefficient=0.3, **FAST),
                       HOOK, progress=False)
    assert log["final_l1_coefficient"] == 0.3


def test_target_l0_and_refit_are_checked():
    with pytest.raises(SAEError, match="target_l0 steers the L1 coefficient of a relu SAE"):
        SAETrainingConfig(architecture="topk", target_l0=10)
    with pytest.raises(SAEError, match="target_l0 must be positive"):
        SAETrainingConfig(architecture="relu", target_l0=0)
    with pytest.raises(SAEError, match="l1_adapt_window must be two fractions"):
        SAETrainingConfig(architecture="relu", target_l0=10, l1_adapt_window=(0.8, 0.2))


def test_training_is_deterministic_and_seed_dependent():
    x, _ = sparse_data(n=2048, d=16, m=32)
    cfg = SAETrainingConfig(architecture="topk", k=4, d_sae=32, epochs=2, **FAST)
    a, _ = train_sae(x, cfg, HOOK, progress=False)
    b, _ = train_sae(x, cfg, HOOK, progress=False)
    assert same_weights(a, b)
    c, _ = train_sae(x, SAETrainingConfig(architecture="topk", k=4, d_sae=32, epochs=2, seed=1, **FAST), HOOK,
                     progress=False)
    assert not torch.equal(a.W_dec, c.W_dec)


def test_stream_inputs():
    x, _ = sparse_data(n=3000, d=16, m=32)
    chunks = list(x.split(700))
    cfg = SAETrainingConfig(architecture="topk", k=4, d_sae=32, epochs=2, shuffle_buffer_tokens=1024, **FAST)
    from_list, log = train_sae(chunks, cfg, HOOK, progress=False)
    assert log["total_steps"] == math.ceil(2 * 3000 / 256) == log["steps"]
    # a one-shot generator has unknown length (no LR decay) and is kept in memory for the second epoch
    _, log = train_sae((c for c in chunks), cfg, HOOK, progress=False)
    assert log["total_steps"] is None and log["steps"] == math.ceil(2 * 3000 / 256)
    # with total_tokens the schedule is fixed, and a list and a callable replaying it give the same weights
    cfg = SAETrainingConfig(architecture="topk", k=4, d_sae=32, total_tokens=7000, shuffle_buffer_tokens=1024, **FAST)
    from_list, log = train_sae(chunks, cfg, HOOK, progress=False)
    assert log["steps"] == math.ceil(7000 / 256) and not log["data_exhausted"]
    from_callable, _ = train_sae(lambda: iter(chunks), cfg, HOOK, progress=False)
    assert same_weights(from_list, from_callable)
    # a one-shot generator is read once: training stops when it runs out
    _, log = train_sae((c for c in chunks), cfg, HOOK, progress=False)
    assert log["data_exhausted"] and log["steps"] == math.ceil(3000 / 256)


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "relu-target-l0-refit"])
def test_interrupted_training_resumes_to_identical_weights(arch: str, tmp_path: Path):
    x, _ = sparse_data(n=2000, d=16, m=32)
    extra = {"target_l0": 3.0, "refit_decoder": True} if arch.startswith("relu-") else {}
    cfg = SAETrainingConfig(architecture=arch.split("-")[0], k=4, d_sae=32, epochs=3, checkpoint_every=5,
                            dead_feature_window=512, resample_every=7, **extra, **FAST)
    full, full_log = train_sae(x, cfg, HOOK, progress=False)
    assert full_log["steps"] == 24

    # (1) stop with max_steps, then resume
    part, log = train_sae(x, cfg, HOOK, checkpoint_dir=tmp_path / "a", progress=False, max_steps=11)
    assert log["steps"] == 11 and log["stopped_at_max_steps"]
    assert (tmp_path / "a" / "checkpoint.safetensors").exists()
    resumed, log = train_sae(x, cfg, HOOK, checkpoint_dir=tmp_path / "a", progress=False)
    assert log["resumed_from_step"] == 11 and log["steps"] == 24 and not log["stopped_at_max_steps"]
    assert same_weights(full, resumed)

    # (2) crash in a callback after step 13: the step-10 checkpoint is resumed
    def crash(step: int, losses: dict) -> None:
        assert "loss" in losses and "mse" in losses
        if step == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(x, cfg, HOOK, checkpoint_dir=tmp_path / "b", progress=False, callback=crash)
    resumed, log = train_sae(x, cfg, HOOK, checkpoint_dir=tmp_path / "b", progress=False)
    assert log["resumed_from_step"] == 10
    assert same_weights(full, resumed)

    # (3) a finished checkpoint is returned without retraining
    again, log = train_sae(x, cfg, HOOK, checkpoint_dir=tmp_path / "b", progress=False)
    assert log["new_steps"] == 0 and same_weights(full, again)


def test_streamed_training_resumes_to_identical_weights(tmp_path: Path):
    x, _ = sparse_data(n=3000, d=16, m=32)
    chunks = list(x.split(500))
    cfg = SAETrainingConfig(architecture="topk", k=4, d_sae=32, total_tokens=6000, shuffle_buffer_tokens=1024,
                            checkpoint_every=4, dead_feature_window=512, **FAST)
    full, _ = train_sae(chunks, cfg, HOOK, progress=False)
    train_sae(lambda: iter(chunks), cfg, HOOK, checkpoint_dir=tmp_path / "c", progress=False, max_steps=9)
    with pytest.raises(SAEError, match="different activations"):  # a list is not the same input as a callable
        train_sae(chunks, cfg, HOOK, checkpoint_dir=tmp_path / "c", progress=False)
    resumed, log = train_sae(lambda: iter(chunks), cfg, HOOK, checkpoint_dir=tmp_path / "c", progress=False)
    assert log["resumed_from_step"] == 9
    assert same_weights(full, resumed)
    # a one-shot stream that ends before the checkpoint's step cannot be resumed
    one_shot = SAETrainingConfig(architecture="topk", k=4, d_sae=32, shuffle_buffer_tokens=1024, **FAST)
    train_sae(iter(chunks), one_shot, HOOK, checkpoint_dir=tmp_path / "d", progress=False, max_steps=9)
    with pytest.raises(SAEError, match="hold only 4 batches but the checkpoint is at step 9"):
        train_sae(iter(chunks[:2]), one_shot, HOOK, checkpoint_dir=tmp_path / "d", progress=False)


def test_checkpoint_from_another_config_or_data_is_refused(tmp_path: Path):
    x, _ = sparse_data(n=1000, d=16, m=32)
    cfg = SAETrainingConfig(architecture="topk", k=4, d_sae=32, epochs=1, **FAST)
    train_sae(x, cfg, HOOK, checkpoint_dir=tmp_path, progress=False, max_steps=2)
    other = SAETrainingConfig(architecture="topk", k=8, d_sae=32, epochs=1, **FAST)
    with pytest.raises(SAEError, match="different training config"):
        train_sae(x, other, HOOK, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(SAEError, match="different hook"):
        train_sae(x, cfg, "blocks.1.hook_resid_post", checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(SAEError, match="different activations"):
        train_sae(x + 1, cfg, HOOK, checkpoint_dir=tmp_path, progress=False)


def test_training_input_errors_name_the_problem():
    cfg = SAETrainingConfig(architecture="topk", k=2, d_sae=8, **FAST)
    good = torch.randn(100, 4)
    bad = torch.randn(100, 4)
    bad[7, 1] = float("nan")
    with pytest.raises(SAEError, match="activation chunk 2 contains NaN"):
        train_sae(iter([good, good, bad, good]), cfg, HOOK, progress=False)
    inf = good.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(SAEError, match="chunk 0 contains Inf"):
        train_sae(inf, cfg, HOOK, progress=False)
    with pytest.raises(SAEError, match="no activations"):
        train_sae(iter([]), cfg, HOOK, progress=False)
    with pytest.raises(SAEError, match="no activations"):
        train_sae(torch.empty(0, 4), cfg, HOOK, progress=False)
    with pytest.raises(SAEError, match="width 5 but"):
        train_sae([good, torch.randn(10, 5)], cfg, HOOK, progress=False)
    with pytest.raises(SAEError, match="unknown SAE architecture"):
        SAETrainingConfig(architecture="gated")
    with pytest.raises(SAEError, match="k=9 is larger than d_sae=8"):
        train_sae(good, SAETrainingConfig(architecture="topk", k=9, d_sae=8, **FAST), HOOK, progress=False)


def _sae_with_dead_latents(arch: str, dictionary: torch.Tensor, d_sae: int = 64) -> SAE:
    """First half of the latents sit on ground-truth directions; the second half is dead.

    topk: the second half are random directions with tiny encoder norm (positive but never in the top k);
    relu: the second half have b_enc = -100 (never positive).
    """
    d = dictionary.shape[1]
    half = d_sae // 2
    g = torch.Generator().manual_seed(1)
    rand = torch.randn(d_sae - half, d, generator=g)
    rand = rand / rand.norm(dim=1, keepdim=True)
    sae = SAE(SAEConfig(d_in=d, d_sae=d_sae, architecture=arch, k=4 if arch == "topk" else None, hook_name=HOOK))
    with torch.no_grad():
        sae.W_dec[:half] = dictionary[:half]
        sae.W_enc[:, :half] = dictionary[:half].T
        sae.W_dec[half:] = rand
        if arch == "topk":
            sae.W_enc[:, half:] = rand.T * 0.05
        else:
            sae.W_enc[:, half:] = rand.T
            sae.b_enc[half:] = -100.0
    return sae


def test_auxk_loss_revives_dead_latents():
    x, dictionary = sparse_data(d=16, m=64)
    init = _sae_with_dead_latents("topk", dictionary)
    assert evaluate_sae(init, x)["dead_fraction"] == pytest.approx(0.5)
    results = {}
    for coef in (0.0, 1 / 32):
        cfg = SAETrainingConfig(architecture="topk", k=4, d_sae=64, epochs=2, lr=1e-3, batch_size=256, device="cpu",
                                auxk_coefficient=coef, dead_feature_window=1024, normalize_activations="none")
        sae, _ = train_sae(x, cfg, HOOK, progress=False, init_from=init)
        results[coef] = evaluate_sae(sae, x)
    assert results[0.0]["dead_fraction"] >= 0.4  # without AuxK the dead half gets no gradient
    assert results[1 / 32]["dead_fraction"] < results[0.0]["dead_fraction"] - 0.2
    assert results[1 / 32]["explained_variance"] > results[0.0]["explained_variance"]


def test_relu_resampling_revives_dead_latents():
    x, dictionary = sparse_data(n=8192, d=16, m=64, k=3)  # more true directions than live latents
    init = _sae_with_dead_latents("relu", dictionary)
    assert evaluate_sae(init, x)["dead_fraction"] == pytest.approx(0.5)
    results = {}
    for resample in (False, True):
        cfg = SAETrainingConfig(architecture="relu", d_sae=64, epochs=3, l1_coefficient=0.5, resample_dead=resample,
                                dead_feature_window=1024, resample_every=20, normalize_activations="none", **FAST)
        sae, _ = train_sae(x, cfg, HOOK, progress=False, init_from=init)
        results[resample] = evaluate_sae(sae, x)["dead_fraction"]
    assert results[False] == pytest.approx(0.5)
    assert results[True] < 0.15


def test_warm_start_keeps_the_function(tmp_path: Path):
    """init_from re-expresses the SAE in scaled units (and unit-norm decoder) without changing what it computes."""
    x, _ = sparse_data(n=1024, d=16, m=32)
    init = random_sae("jumprelu", d_in=16, d_sae=32)
    with torch.no_grad():
        init.W_dec.mul_(3.0)
    cfg = SAETrainingConfig(architecture="jumprelu", d_sae=32, lr=1e-12, epochs=1, lr_warmup_steps=1, **{
        k: v for k, v in FAST.items() if k != "lr"})
    sae, log = train_sae(x, cfg, HOOK, progress=False, init_from=init)
    assert log["norm_scaling_factor"] != 1.0
    assert torch.allclose(sae(x), init(x), atol=1e-3, rtol=1e-3)
    with pytest.raises(SAEError, match="init_from SAE is"):
        train_sae(x, SAETrainingConfig(architecture="topk", k=4, d_sae=32, **FAST), HOOK, progress=False,
                  init_from=init)


def test_geometric_median_resists_outliers():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    gm = geometric_median(pts)
    assert gm.norm() < 2.0 < pts.mean(dim=0).norm()


# ---------------------------------------------------------------------------------------------- fast TopK path
@pytest.mark.parametrize("shape", [(1024, 2304, 64), (100, 256, 8), (7, 100, 3), (5, 64, 32), (3, 48, 1)])
def test_chunked_topk_selects_what_torch_topk_selects(shape):
    from trace_lib.sae.training.steps import chunked_topk as _topk

    n, m, k = shape
    pre = torch.randn(n, m, generator=torch.Generator().manual_seed(m))
    ref = pre.topk(k, dim=-1)
    values, indices = _topk(pre, k)
    assert torch.equal(values.sort(dim=1).values, ref.values.sort(dim=1).values)
    assert torch.equal(indices.sort(dim=1).values, ref.indices.sort(dim=1).values)
    assert torch.equal(pre.gather(1, indices), values)


def test_sparse_decoder_equals_dense_decode():
    """embedding_bag over the k selected latents reconstructs what codes @ W_dec does."""
    sae = random_sae("topk", d_in=24, d_sae=96)
    sae.cfg.k = 7
    x = torch.randn(50, 24, generator=torch.Generator().manual_seed(3))
    codes = sae.encode(x)
    top = sae.encode_pre(x).topk(7, dim=-1)
    sparse = torch.nn.functional.embedding_bag(top.indices, sae.W_dec, per_sample_weights=torch.relu(top.values),
                                               mode="sum") + sae.b_dec
    assert torch.allclose(sparse, codes @ sae.W_dec + sae.b_dec, atol=1e-5, rtol=1e-5)
    assert torch.allclose(sparse, sae.decode(codes), atol=1e-5, rtol=1e-5)


def _trainer_pair(apply_b_dec: bool, dead: int, seed: int = 0):
    from trace_lib.sae.training import SAETrainer as _Trainer

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=g) * torch.linspace(0.2, 3.0, 32) + 0.5
    cfg = SAETrainingConfig(architecture="topk", k=8, d_sae=256, batch_size=128, device="cpu",
                            apply_b_dec_to_input=apply_b_dec, dead_feature_window=1000, auxk_k=24)
    pair = []
    for impl in ("fast", "reference"):
        t = _Trainer(cfg, 32, torch.device("cpu"), 10, impl)
        t.initialise(x)
        t.tokens_since_fired[:dead] = 5000  # `dead` latents count as dead: AuxK runs when dead > 0
        pair.append(t)
    return pair, x[:128] * pair[0].scale


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("dead", [0, 10, 200])  # no AuxK, AuxK over every dead latent, AuxK top-k of them
def test_sparse_topk_step_matches_dense_reference(apply_b_dec: bool, dead: int):
    (fast, ref), x = _trainer_pair(apply_b_dec, dead)
    losses, fired = fast._topk_sparse_grads(x)
    ref_losses, ref_fired = ref._dense_grads(x)
    assert set(losses) == set(ref_losses)
    for key, value in ref_losses.items():
        assert losses[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    assert (losses["auxk"].item() > 0) == (dead > 0)
    assert torch.equal(fired, ref_fired)
    for name, p in ref.params.items():
        got = fast.params[name].grad
        assert got.shape == p.grad.shape and got.is_contiguous()
        assert torch.allclose(got, p.grad, rtol=1e-5, atol=1e-5 * p.grad.abs().max().item()), name
    # a whole step (parallel-gradient removal, clipping, Adam, decoder renormalisation) lands in the same place
    (fast, ref), x = _trainer_pair(apply_b_dec, dead)
    fast.train_step(x)
    ref.train_step(x)
    for name, p in ref.params.items():
        assert torch.allclose(fast.params[name], p, rtol=1e-5, atol=1e-6), name
    assert torch.equal(fast.tokens_since_fired, ref.tokens_since_fired)


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("step", [0, 9])  # inside the L1 warm-up (coefficient 1/5 of its value) and after it
@pytest.mark.parametrize("bias", [-8.0, 3.0])  # L0 below d_sae/8 (sparse maths) and above (the dense fallback)
def test_sparse_relu_step_matches_dense_reference(apply_b_dec: bool, step: int, bias: float):
    from trace_lib.sae.training import SAETrainer as _Trainer

    torch.manual_seed(3)
    x = torch.randn(600, 32) * 2 + 0.5
    cfg = SAETrainingConfig(architecture="relu", d_sae=256, batch_size=128, device="cpu", l1_coefficient=0.3,
                            apply_b_dec_to_input=apply_b_dec, sparsity_warmup_steps=5, resample_dead=False)
    pair = []
    for impl in ("fast", "reference"):
        t = _Trainer(cfg, 32, torch.device("cpu"), 10, impl)
        t.initialise(x)
        t.step = step
        with torch.no_grad():  # decoder rows of unequal norm, so the L1 term's decoder gradient is exercised
            t.sae.W_dec.mul_(torch.linspace(0.5, 2.0, 256).unsqueeze(1))
            t.sae.b_enc.copy_(torch.linspace(bias, 0.5, 256))
        pair.append(t)
    fast, ref = pair
    xb = x[:128] * fast.scale
    losses, fired = fast._relu_sparse_grads(xb)
    ref_losses, ref_fired = ref._dense_grads(xb)
    assert set(losses) == set(ref_losses)
    for key, value in ref_losses.items():
        assert losses[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    assert (0 < losses["l0_mean"].item() < 256 / 8) == (bias < 0)
    assert torch.equal(fired, ref_fired) and (bias > 0 or not bool(fired.all()))
    for name, p in ref.params.items():
        got = fast.params[name].grad
        assert got.shape == p.grad.shape and got.is_contiguous()
        assert torch.allclose(got, p.grad, rtol=1e-5, atol=1e-5 * p.grad.abs().max().item()), name


def test_fast_and_reference_training_agree_and_share_checkpoints(tmp_path: Path):
    x, _ = sparse_data(n=2048, d=16, m=32)
    cfg = SAETrainingConfig(architecture="topk", k=4, d_sae=64, epochs=2, checkpoint_every=4,
                            dead_feature_window=512, **FAST)
    fast, fast_log = train_sae(x, cfg, HOOK, progress=False)
    ref, ref_log = train_sae(x, cfg, HOOK, progress=False, implementation="reference")
    for name in PARAMS:
        assert torch.allclose(getattr(fast, name), getattr(ref, name), atol=1e-4), name
    for key in ("final_loss", "final_mse", "final_auxk", "final_l0_mean", "final_explained_variance"):
        assert fast_log[key] == pytest.approx(ref_log[key], rel=1e-4, abs=1e-6), key
    # the implementation is not part of the config hash: a reference checkpoint resumes on the fast path
    train_sae(x, cfg, HOOK, checkpoint_dir=tmp_path, progress=False, max_steps=6, implementation="reference")
    resumed, log = train_sae(x, cfg, HOOK, checkpoint_dir=tmp_path, progress=False)
    assert log["resumed_from_step"] == 6
    for name in PARAMS:
        assert torch.allclose(getattr(resumed, name), getattr(fast, name), atol=1e-4), name
    with pytest.raises(SAEError, match="implementation must be one of"):
        train_sae(x, cfg, HOOK, progress=False, implementation="sparse")


def test_fast_topk_training_is_deterministic_with_threads():
    """Parallel embedding_bag / sort / fused Adam still give bit-identical weights run to run."""
    torch.set_num_threads(2)  # the autouse fixture restores the setting
    x, _ = sparse_data(n=4096, d=32, m=64)
    cfg = SAETrainingConfig(architecture="topk", k=8, d_sae=256, epochs=2, batch_size=1024, device="cpu",
                            dead_feature_window=1024)
    a, _ = train_sae(x, cfg, HOOK, progress=False)
    b, _ = train_sae(x, cfg, HOOK, progress=False)
    assert same_weights(a, b)


def test_trained_sae_saves_and_loads(tmp_path: Path):
    x, _ = sparse_data(n=1024, d=16, m=32)
    sae, _ = train_sae(x, SAETrainingConfig(architecture="topk", k=4, d_sae=32, **FAST), HOOK, progress=False)
    loaded = load_sae(save_sae(sae, tmp_path / "trained"))
    assert same_weights(sae, loaded)
    assert loaded.cfg.metadata["trained_by"] == "trace"


# ---------------------------------------------------------------------------------------------- metrics
def test_explained_variance_hand_example():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0): total variance 1 + 1 = 2
    x_hat = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # residual sum 1
    assert explained_variance(x, x_hat) == pytest.approx(0.5)
    assert explained_variance(x, x) == pytest.approx(1.0)
    mean = x.mean(dim=0, keepdim=True).expand_as(x)
    assert explained_variance(x, mean) == pytest.approx(0.0)
    # total variance across tokens, not the per-token average ("legacy") form
    x2 = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    x2_hat = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    total_var = ((x2 - x2.mean(0)) ** 2).sum()
    assert explained_variance(x2, x2_hat) == pytest.approx(1 - 1 / total_var.item())


def test_ce_loss_recovered_hand_example():
    assert ce_loss_recovered(clean_loss=2.0, sae_loss=2.5, zero_ablation_loss=4.0) == pytest.approx(0.75)
    assert ce_loss_recovered(2.0, 2.0, 4.0) == pytest.approx(1.0)
    assert ce_loss_recovered(2.0, 4.0, 4.0) == pytest.approx(0.0)
    assert ce_loss_recovered(2.0, 5.0, 4.0) == pytest.approx(-0.5)
    assert math.isnan(ce_loss_recovered(2.0, 2.5, 2.0))


def test_sparsity_metrics_on_constructed_codes():
    codes = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert mean_l0(codes) == pytest.approx(4 / 3)
    freqs = feature_frequencies(codes)
    assert torch.allclose(freqs, torch.tensor([0.0, 2 / 3, 0.0, 2 / 3], dtype=torch.float64))
    assert dead_fraction(freqs) == pytest.approx(0.5)
    assert dense_fraction(freqs, threshold=0.5) == pytest.approx(0.5)
    assert dense_fraction(freqs, threshold=0.7) == 0.0


def test_evaluate_sae_streams_and_counts_dead_latents():
    sae = random_sae("relu", d_in=8, d_sae=16)
    with torch.no_grad():
        sae.b_enc[:5] = -1e4  # latents 0..4 can never fire
        sae.b_enc[5:] = 1e4  # latents 5..15 always fire (dense)
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(3))
    whole = evaluate_sae(sae, x, batch_size=64)
    streamed = evaluate_sae(sae, (c for c in x.split(300)), batch_size=64)
    assert whole["tokens"] == streamed["tokens"] == 1000
    assert whole["n_dead"] == 5 and whole["dead_fraction"] == pytest.approx(5 / 16)
    assert whole["n_dense"] == 11 and whole["dense_fraction"] == pytest.approx(11 / 16)
    assert whole["l0"] == pytest.approx(11.0)
    assert streamed["explained_variance"] == pytest.approx(whole["explained_variance"], rel=1e-9)
    assert whole["explained_variance"] == pytest.approx(explained_variance(x, sae(x).detach()), rel=1e-6)
    mse = ((x - sae(x).detach()) ** 2).sum(-1).mean().item()
    assert whole["mse"] == pytest.approx(mse, rel=1e-5)
    bad = x.clone()
    bad[400, 0] = float("nan")
    with pytest.raises(SAEError, match="chunk 1 contains NaN"):
        evaluate_sae(sae, iter(bad.split(300)))
    with pytest.raises(SAEError, match="no activations"):
        evaluate_sae(sae, iter([]))
    with pytest.raises(SAEError, match="width 7 but d_in is 8"):
        evaluate_sae(sae, torch.randn(3, 7))


def test_ce_loss_splice_identity_and_zero(tiny_folder):
    """Splicing the identity in gives the clean loss exactly; splicing zeros gives the zero-ablation loss."""
    from trace_lib.capture.inputs import chunk_batches, pack_texts
    from trace_lib.models import load_model
    from trace_lib.sae.splice import ce_loss_with_sae

    loaded = load_model(tiny_folder)
    ids = pack_texts(loaded.tokenizer, ["The quick brown fox jumps over the lazy dog. " * 20], 32, max_sequences=4)
    batches = list(chunk_batches(ids, 2))
    same = ce_loss_with_sae(loaded, lambda x: x, "blocks.1.hook_resid_post", batches)
    assert same["ce_loss_sae"] == same["ce_loss_clean"] and same["ce_loss_recovered"] == 1.0
    zero = ce_loss_with_sae(loaded, torch.zeros_like, "blocks.1.hook_resid_post", batches)
    assert zero["ce_loss_sae"] == zero["ce_loss_zero"] and zero["ce_loss_recovered"] == 0.0
    # the clean loss is the model's own next-token loss from position 1 on (position 0 follows nothing useful)
    with torch.no_grad():
        expected = []
        for b in batches:
            logits = loaded.model(**b).logits[:, 1:-1]
            expected.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["input_ids"][:, 2:],
                                                               reduction="none").flatten())
    assert same["ce_loss_clean"] == pytest.approx(torch.cat(expected).mean().item(), rel=1e-6)


def test_sae_cache_key_is_model_hook_and_config(tiny_folder):
    import dataclasses

    from trace_lib.models import load_model
    from trace_lib.quant import quantize
    from trace_lib.sae.store import SAEDataPlan, default_training_config, sae_folder

    loaded = load_model(tiny_folder)
    cfg, plan = default_training_config(), SAEDataPlan()
    base = sae_folder(loaded, cfg, plan)
    assert sae_folder(load_model(tiny_folder), default_training_config(), SAEDataPlan()) == base
    assert sae_folder(loaded, dataclasses.replace(cfg, k=cfg.k + 1), plan) != base
    assert sae_folder(loaded, cfg, dataclasses.replace(plan, seed=plan.seed + 1)) != base
    assert sae_folder(quantize(loaded, "int8-rtn-g32"), cfg, plan) != base
    assert loaded.content_hash in str(base)  # one folder per model hash; one subfolder per hook inside it
