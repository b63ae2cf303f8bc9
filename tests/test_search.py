# SPDX-License-Identifier: MIT
"""QSS / QPL / Algorithm 2: schedule, Gumbel statistics, precision loss, budget repair, finalize,
pruning, the end-to-end search on real Fashion-MNIST images, determinism, checkpoints."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch import nn

import autoqnn
from autoqnn import pipeline as S
from autoqnn.config import QuantConfig
from autoqnn.nn import Quantizer, SchemeMixture, quantizers
from autoqnn.schemes import scheme_info


def small_cnn(classes=4):
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, classes))


def toy_data(n=256, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    w = torch.randn(64, classes, generator=g)
    y = (x.flatten(1) @ w).argmax(1)
    return torch.utils.data.TensorDataset(x, y)


# ---------------------------------------------------------------------------------- schedule
def test_temperature_schedule_matches_spec():
    c = QuantConfig(tau0=5.0, gamma=2.0, tau_min=1e-3)
    assert c.temperature(0, 10) == 5.0
    assert math.isclose(c.temperature(5, 10), 5.0 * 0.5 ** 2)
    assert c.temperature(10, 10) == 1e-3  # floored
    taus = [c.temperature(e, 10) for e in range(11)]
    assert all(a > b for a, b in zip(taus, taus[1:-1]))  # strictly decreasing until the floor


def test_on_epoch_end_sets_next_temperature():
    m = S.prepare(small_cnn(), S.SearchConfig(search_epochs=4), torch.randn(2, 1, 8, 8))
    info = S.on_epoch_end(m, 0, 4)
    assert math.isclose(info["tau"], 5.0 * 0.75)
    for _, q in quantizers(m):
        assert isinstance(q, SchemeMixture) and math.isclose(q._tau, 3.75)
    assert set(info["probs"]) == {n for n, q in quantizers(m)}


# ---------------------------------------------------------------------------------- Gumbel
def test_gumbel_argmax_frequencies_converge_to_softmax():
    mix = SchemeMixture(kind="weight", seed=3)
    with torch.no_grad():
        mix.theta.copy_(torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 0.0, -1.0, 0.3]))
    p = torch.softmax(mix.theta.detach(), 0)
    n = 20000
    counts = torch.zeros(8)
    for t in range(n):
        counts[int(torch.argmax(mix.theta.detach() + mix.gumbel(t)))] += 1
    freq = counts / n
    # 4.5 standard errors per candidate
    se = torch.sqrt(p * (1 - p) / n)
    assert torch.all((freq - p).abs() < 4.5 * se + 1e-3), (freq, p)


def test_gumbel_same_noise_for_same_seed_and_step():
    a, b = SchemeMixture(kind="weight", seed=11), SchemeMixture(kind="weight", seed=11)
    assert torch.equal(a.gumbel(7), b.gumbel(7))
    assert not torch.equal(a.gumbel(7), a.gumbel(8))


# ---------------------------------------------------------------------------------- precision loss
def test_precision_loss_value_and_gradient():
    cfg = S.SearchConfig(quant=QuantConfig(mode="fixed", weight_schemes=("clip",), act_schemes=("clip",),
                                           learn_bits=True, exclude_first_last=False),
                         weight_target=2.0, act_target=3.0, mu_w=1.0, mu_a=0.5)
    m = S.prepare(small_cnn(), cfg, torch.randn(2, 1, 8, 8))
    qs = dict(quantizers(m))
    ws = {n: q for n, q in qs.items() if q.kind == "weight"}
    acts = {n: q for n, q in qs.items() if q.kind == "activation"}
    bits = [3.0, 4.0, 5.0, 6.0, 2.0]
    for q, b in zip(ws.values(), bits):
        with torch.no_grad():
            q.bits.fill_(b)
    nW = {n: q.elements for n, q in ws.items()}
    N = sum(nW.values())
    bbar = sum(q.int_bits() * nW[n] for n, q in ws.items()) / N
    nA = {n: q.elements for n, q in acts.items()}
    NA = sum(nA.values())
    abar = sum(q.int_bits() * nA[n] for n, q in acts.items()) / NA
    loss = S.precision_loss(m)
    assert math.isclose(loss.item(), (bbar - 2.0) ** 2 + 0.5 * (abar - 3.0) ** 2, rel_tol=1e-5)
    loss.backward()
    for n, q in ws.items():
        expect = 2 * (bbar - 2.0) * nW[n] / N
        assert math.isclose(float(q.bits.grad), expect, rel_tol=1e-4, abs_tol=1e-7), n
    for n, q in acts.items():
        expect = 0.5 * 2 * (abar - 3.0) * nA[n] / NA
        assert math.isclose(float(q.bits.grad), expect, rel_tol=1e-4, abs_tol=1e-7), n


def test_activation_elements_are_per_sample():
    cfg = S.SearchConfig(quant=QuantConfig(mode="fixed", weight_schemes=("clip",), act_schemes=("clip",),
                                           exclude_first_last=False))
    m = S.prepare(small_cnn(), cfg, torch.randn(5, 1, 8, 8))
    qs = dict(quantizers(m))
    assert qs["0.act_quant"].elements == 64  # 1x8x8 per sample
    assert qs["0.weight_quant"].elements == 8 * 9
    assert qs["8.act_quant"].elements == 256


def test_impossible_target_is_a_clear_error():
    cfg = S.SearchConfig(quant=QuantConfig(act_schemes=("clip", "pot")), act_target=1.5)
    with pytest.raises(S.BudgetError, match="activation target 1.5"):
        S.prepare(small_cnn(), cfg, torch.randn(2, 1, 8, 8))


# ---------------------------------------------------------------------------------- budget repair
@pytest.mark.parametrize("trial", range(12))
def test_repair_random_plans_end_within_budget_and_ranges(trial):
    rnd = random.Random(trial)
    schemes = ["clip", "pot", "zoom", "fixed", "residual", "binary", "ternary"]
    cfg = S.SearchConfig(quant=QuantConfig(mode="fixed", weight_schemes=("clip",), act_schemes=("clip",),
                                           exclude_first_last=False),
                         weight_target=rnd.choice([2.0, 2.5, 3.0, 4.2]), act_target=rnd.choice([2.0, 2.7, 3.5]))
    m = S.prepare(small_cnn(), cfg, torch.randn(4, 1, 8, 8))
    plan = {}
    bits = {}
    for n, q in quantizers(m):
        s = rnd.choice(schemes if q.kind == "weight" else schemes[:5])
        info = scheme_info(s)
        plan[n] = s
        bits[n] = rnd.randint(info.min_bits, info.max_bits)
    S.apply_schemes(m, plan, learn_bits=False, bits=bits)
    calib = (torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,)))
    steps = S.repair_budget(m, calib_inputs=calib[0], calib_targets=calib[1], loss_fn=nn.functional.cross_entropy)
    out = S.plan_of(m)
    for p in out:
        info = scheme_info(p.scheme)
        assert info.min_bits <= p.bits <= info.max_bits
        assert p.bits <= bits[p.name]  # repair only lowers
    for kind, t in (("weight", cfg.weight_target), ("activation", cfg.act_target)):
        avg = S._plan_average(out, kind)
        mins = [scheme_info(p.scheme).min_bits for p in out if p.kind == kind]
        if min(mins) <= t:
            assert avg <= t + 1e-9
    assert all(s["to"] == s["from"] - 1 for s in steps)


def test_repair_prefers_low_sensitivity_layers():
    """Two weight tensors of equal size: the repair lowers the one whose quantization error
    barely changes (a tensor of near-constant magnitude) before the Gaussian one."""
    lin1, lin2 = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
    model = nn.Sequential(nn.Linear(64, 64), lin1, lin2, nn.Linear(64, 2))
    cfg = S.SearchConfig(quant=QuantConfig(mode="fixed", weight_schemes=("zoom",), act_schemes=("clip",),
                                           quantize_activations=False),
                         weight_target=3.5, act_target=8)
    qm = S.prepare(model, cfg, torch.randn(2, 64))
    with torch.no_grad():
        qm[1].weight.copy_(torch.randn(64, 64))
        # two-valued weights: zoom at 3 or 4 bits represents them (almost) exactly
        qm[2].weight.copy_(torch.sign(torch.randn(64, 64)))
    S.apply_schemes(qm, {"1.weight_quant": "zoom", "2.weight_quant": "zoom"}, learn_bits=False,
                    bits={"1.weight_quant": 4, "2.weight_quant": 4})
    steps = S.repair_budget(qm)
    assert steps[0]["quantizer"] == "2.weight_quant"
    assert S._plan_average(S.plan_of(qm), "weight") <= 3.5


def test_repair_size_budget():
    cfg = S.SearchConfig(quant=QuantConfig(mode="fixed", weight_schemes=("clip",), act_schemes=("clip",),
                                           exclude_first_last=False), weight_target=8, act_target=8)
    m = S.prepare(small_cnn(), cfg, torch.randn(2, 1, 8, 8))
    before = S.model_size_bytes(m)["quantized"]
    budget = before - 1000
    S.repair_budget(m, size_budget_bytes=budget)
    assert S.model_size_bytes(m)["quantized"] <= budget
    with pytest.raises(S.BudgetError, match="model size"):
        S.repair_budget(m, size_budget_bytes=10)


def test_model_size_counts_packed_bits():
    cfg = S.SearchConfig(quant=QuantConfig(mode="fixed", weight_schemes=("clip",), act_schemes=("clip",),
                                           exclude_first_last=False, weight_bits=4))
    m = S.prepare(small_cnn(), cfg, torch.randn(2, 1, 8, 8))
    sz = S.model_size_bytes(m)
    f = small_cnn()
    float_bytes = sum(p.numel() * 4 for p in f.parameters())
    assert sz["float_model"] == float_bytes
    wq = sum(mod.weight.numel() for mod in f.modules() if isinstance(mod, (nn.Conv2d, nn.Linear)))
    bias = float_bytes - 4 * wq
    assert sz["quantized"] == bias + sum(math.ceil(p.elements * 4 / 8) + 4 for p in S.plan_of(m) if p.kind == "weight")
    assert sz["quantized"] < sz["int8"] < sz["float_model"]


# ---------------------------------------------------------------------------------- finalize
def test_finalize_equals_argmax_mixture_at_zero_temperature():
    torch.manual_seed(0)
    cfg = S.SearchConfig(budget="soft")
    m = S.prepare(small_cnn(), cfg, torch.randn(2, 1, 8, 8))
    m.train()
    for _ in range(2):  # activation EMA statistics
        m(torch.randn(16, 1, 8, 8))
    for _, q in quantizers(m):
        with torch.no_grad():
            q.theta.copy_(torch.randn_like(q.theta) * 3)
    S.set_temperature(m, 1e-3)
    x = torch.randn(6, 1, 8, 8)
    m.eval()
    for _, q in quantizers(m):
        q.eval_selection = "soft"  # softmax(θ/τ) at τ→0 is one-hot on the argmax
    y_soft = m(x)
    chosen = {n: q.chosen() for n, q in quantizers(m)}
    plan = S.finalize(m)
    assert {p.name: p.scheme for p in plan} == chosen
    assert all(isinstance(q, Quantizer) and not q.learn_bits for _, q in quantizers(m))
    torch.testing.assert_close(m(x), y_soft, rtol=1e-5, atol=1e-5)


def test_fix_schemes_then_learned_bits_round_in_finalize():
    cfg = S.SearchConfig(precision_epochs=1, budget="soft")
    m = S.prepare(small_cnn(), cfg, torch.randn(2, 1, 8, 8))
    chosen = S.fix_schemes(m)
    assert all(isinstance(q, Quantizer) for _, q in quantizers(m))
    learned = [q for _, q in quantizers(m) if q.learn_bits]
    assert learned, "multi-bit schemes get learnable bits"
    for q, v in zip(learned, [2.4, 3.6, 5.49, 2.51]):
        with torch.no_grad():
            q.bits.fill_(v)
    expect = {id(q): q.int_bits() for q in learned}
    names = {id(q): n for n, q in quantizers(m)}
    plan = {p.name: p for p in S.finalize(m)}
    for q in learned:
        p = plan[names[id(q)]]
        assert p.bits == expect[id(q)] and p.learned_bits is not None
    assert set(plan) == set(chosen)


def test_clamp_keeps_learned_bits_in_scheme_range():
    q = Quantizer("pot", 3, learn_bits=True)
    with torch.no_grad():
        q.bits.fill_(9.7)
    q.clamp_bits_()
    assert q.int_bits() == 4  # PotQ: 2..4
    with torch.no_grad():
        q.bits.fill_(-3)
    q.clamp_bits_()
    assert q.int_bits() == 2


# ---------------------------------------------------------------------------------- pruning
def test_candidate_pruning_drops_low_probability_schemes():
    mix = SchemeMixture(kind="weight")
    with torch.no_grad():
        mix.theta.copy_(torch.tensor([5.0, 0, 0, 0, 0, 0, 0, -9.0]))
    assert mix.update_pruning(0.05, patience=2) == []  # patience not reached yet
    pruned = mix.update_pruning(0.05, patience=2)
    assert "binary" not in pruned and "pot" in pruned
    assert mix.chosen() == "binary"
    mix.train()
    w = torch.randn(16, 8)
    y = mix(w)
    y.sum().backward()
    assert mix.theta.grad[7] == 0  # pruned: out of the softmax
    sd = mix.state_dict()
    fresh = SchemeMixture(kind="weight")
    fresh.load_state_dict(sd)
    assert fresh.active_schemes == mix.active_schemes
    # an old state dict without the pruning buffers still loads
    del sd["active"], sd["below"]
    SchemeMixture(kind="weight").load_state_dict(sd)


# ---------------------------------------------------------------------------------- config
def test_search_config_validation_and_roundtrip():
    with pytest.raises(ValueError, match="budget"):
        S.SearchConfig(budget="maybe")
    with pytest.raises(ValueError, match="search_epochs"):
        S.SearchConfig(search_epochs=-1)
    with pytest.raises(ValueError, match="unknown SearchConfig option"):
        S.SearchConfig.from_dict({"epochz": 3})
    c = S.SearchConfig(weight_target=2.0, quant=QuantConfig(granularity="coarse"))
    d = json.loads(json.dumps(c.to_dict()))
    c2 = S.SearchConfig.from_dict(d)
    assert c2.to_dict() == c.to_dict() and c2.quant.granularity == "coarse"


# ---------------------------------------------------------------------------------- the search
def _fmnist(n_train=512, n_val=256):
    from autoqnn.data import load_fashion_mnist

    return load_fashion_mnist("train", limit=n_train), load_fashion_mnist("test", limit=n_val)


def test_search_end_to_end_on_fashion_mnist(tmp_path):
    torch.manual_seed(0)
    train, val = _fmnist()
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))
    cfg = S.SearchConfig(float_epochs=3, search_epochs=2, precision_epochs=2, finetune_epochs=1, batch_size=64,
                         optimizer="adam", lr=3e-3, weight_target=2.0, act_target=2.0, bits_lr=0.05, seed=0,
                         checkpoint_dir=str(tmp_path / "ck"), quant=QuantConfig(exclude_first_last=False))
    res = autoqnn.search(model, train, val, cfg, quiet=True)
    float_hist = [h for h in res.history if h["phase"] == "float"]
    assert float_hist[-1]["train_loss"] < float_hist[0]["train_loss"] * 0.9 or float_hist[-1]["train_loss"] < 1.0
    assert res.float_accuracy > 0.5
    assert res.quant_accuracy > 0.3
    assert res.weight_bits <= 2.0 + 1e-9 and res.act_bits <= 2.0 + 1e-9
    assert [h["phase"] for h in res.history if h["phase"] != "round"] == \
        ["float"] * 3 + ["search"] * 2 + ["precision"] * 2 + ["finetune"]
    s_hist = [h for h in res.history if h["phase"] == "search"]
    assert s_hist[0]["tau"] == 5.0 and s_hist[1]["tau"] == 2.5 and s_hist[0]["probs"]
    assert res.size["quantized"] < res.size["float_model"] / 8
    assert (tmp_path / "ck" / "result.json").is_file()
    assert all(isinstance(q, Quantizer) for _, q in quantizers(res.model))
    # the plan is what the model computes
    for p in res.plan:
        q = res.model.get_submodule(p.name)
        assert (q.scheme, q.int_bits()) == (p.scheme, p.bits)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_search_is_deterministic_for_a_seed(backend):
    """Same seed, same backend, deterministic mode: the same decisions (fused kernels and the
    pure-PyTorch reference alike)."""
    data = toy_data(192)
    cfg = dict(search_epochs=2, precision_epochs=1, finetune_epochs=0, batch_size=64, weight_target=2.5,
               act_target=3.0, seed=5, deterministic=True, quant=QuantConfig(exclude_first_last=False, backend=backend))
    torch.manual_seed(0)
    r1 = autoqnn.search(small_cnn(), data, None, S.SearchConfig(**cfg), quiet=True)
    torch.manual_seed(0)
    r2 = autoqnn.search(small_cnn(), data, None, S.SearchConfig(**cfg), quiet=True)
    assert [(p.name, p.scheme, p.bits) for p in r1.plan] == [(p.name, p.scheme, p.bits) for p in r2.plan]
    assert r1.schemes_searched == r2.schemes_searched
    assert not torch.are_deterministic_algorithms_enabled()  # torch's global flag restored afterwards


def _search_twice(option, **cfg):
    """Two deterministic searches of the same model and data, ``option`` False then True."""
    data = toy_data(192)
    cfg = dict(batch_size=64, seed=3, deterministic=True, quant=QuantConfig(exclude_first_last=False), **cfg)
    runs = []
    for value in (False, True):
        torch.manual_seed(0)
        runs.append(autoqnn.search(small_cnn(), data, None, S.SearchConfig(**{option: value}, **cfg), quiet=True))
    return runs


def test_search_with_batched_weights_matches_the_per_layer_search(monkeypatch):
    """SearchConfig.batch_weights=True (every QSS weight vertex in one batched call per step)
    changes how the weights are quantized, not what: the same plan, probabilities and losses."""
    made = []

    class Counting(S.WeightBatcher):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(S, "WeightBatcher", Counting)
    r1, r2 = _search_twice("batch_weights", search_epochs=2, precision_epochs=0, finetune_epochs=0)
    assert [(p.name, p.scheme, p.bits) for p in r1.plan] == [(p.name, p.scheme, p.bits) for p in r2.plan]
    h1 = [(h.get("train_loss"), h.get("probs")) for h in r1.history if h.get("phase") == "search"]
    h2 = [(h.get("train_loss"), h.get("probs")) for h in r2.history if h.get("phase") == "search"]
    assert len(h1) == 2 and h1[0][0] is not None and h1 == h2
    assert len(made) == 1 and made[0].calls == 2 * 3  # batched: 2 epochs x 3 steps (192 / 64)
    assert not made[0]._handles  # removed when the phase ended
    with pytest.raises(ValueError, match="batch_weights"):
        S.SearchConfig(batch_weights="yes")


def test_search_channels_last_keeps_the_layout_and_the_decisions():
    """SearchConfig.channels_last: the convolution weights are channels-last in every phase (so are
    the activations the convolutions produce, through the quantizers), and the search decides what
    the contiguous one decides: the statistics are the same numbers summed in another order."""
    runs = _search_twice("channels_last", search_epochs=2, precision_epochs=1, finetune_epochs=1)
    for cl, run in zip((False, True), runs):
        convs = [m for m in run.model.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) == cl for m in convs
                             if m.weight.shape[1] > 1)
        if cl:  # the quantized model's convolutions run NHWC, their outputs channels-last
            x = torch.randn(4, *toy_data(192)[0][0].shape)
            outs = []
            hs = [m.register_forward_hook(lambda mod, i, o: outs.append(o)) for m in convs]
            run.model.eval()(x)
            for h in hs:
                h.remove()
            assert any(o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous() for o in outs)
    r1, r2 = runs
    assert [(p.name, p.scheme, p.bits) for p in r1.plan] == [(p.name, p.scheme, p.bits) for p in r2.plan]
    l1 = [h["train_loss"] for h in r1.history if "train_loss" in h]
    l2 = [h["train_loss"] for h in r2.history if "train_loss" in h]
    assert len(l1) == len(l2) == 4 and all(abs(a - b) <= 1e-3 * abs(a) for a, b in zip(l1, l2)), (l1, l2)
    with pytest.raises(ValueError, match="channels_last"):
        S.SearchConfig(channels_last="yes")


def test_search_coarse_grained_shares_one_scheme_per_kind():
    torch.manual_seed(1)
    cfg = S.SearchConfig(search_epochs=1, precision_epochs=0, finetune_epochs=0, batch_size=64,
                         quant=QuantConfig(granularity="coarse", exclude_first_last=False))
    res = autoqnn.search(small_cnn(), toy_data(128), None, cfg, quiet=True)
    assert len({p.scheme for p in res.plan if p.kind == "weight"}) == 1
    assert len({p.scheme for p in res.plan if p.kind == "activation"}) == 1


def test_search_fixed_mode_skips_qss_and_learns_bits():
    cfg = S.SearchConfig(search_epochs=3, precision_epochs=2, finetune_epochs=0, batch_size=64, bits_lr=0.2,
                         weight_target=2.0, act_target=2.0,
                         quant=QuantConfig(mode="fixed", weight_schemes=("clip",), act_schemes=("clip",)))
    res = autoqnn.search(small_cnn(), toy_data(256), None, cfg, quiet=True)
    phases = [h["phase"] for h in res.history]
    assert "search" not in phases and phases.count("precision") == 2
    bits_hist = [h["bits"] for h in res.history if h["phase"] == "precision"]
    assert any(v < 3.0 for v in bits_hist[-1].values())  # the precision loss pulled bits down
    assert res.weight_bits <= 2.0 and res.act_bits <= 2.0


def test_search_with_pruning_records_pruned_candidates():
    cfg = S.SearchConfig(search_epochs=3, precision_epochs=0, finetune_epochs=0, batch_size=32,
                         prune_threshold=0.124, prune_patience=1, theta_lr=0.5,
                         quant=QuantConfig(exclude_first_last=False))
    res = autoqnn.search(small_cnn(), toy_data(256), None, cfg, quiet=True)
    pruned = [h.get("pruned") for h in res.history if h["phase"] == "search"]
    assert any(pruned)


def test_search_rejects_tiny_dataset():
    with pytest.raises(ValueError, match="fewer than one batch"):
        autoqnn.search(small_cnn(), toy_data(10), None, S.SearchConfig(batch_size=64), quiet=True)


def test_checkpoint_is_weights_only_and_resume_done_is_stable(tmp_path):
    cfg = S.SearchConfig(search_epochs=1, precision_epochs=1, finetune_epochs=1, batch_size=64, seed=2,
                         checkpoint_dir=str(tmp_path), quant=QuantConfig(exclude_first_last=False))
    torch.manual_seed(0)
    r1 = autoqnn.search(small_cnn(), toy_data(128), None, cfg, quiet=True)
    ck = S.latest_checkpoint(tmp_path)
    assert ck is not None and ck.name.startswith("ckpt-4-")
    state = torch.load(ck, map_location="cpu", weights_only=True)  # no pickled code objects
    assert state["phase"] == "done"
    assert len(list(tmp_path.glob("ckpt-*.pt"))) <= 2
    assert not list(tmp_path.glob(".*tmp*"))
    cfg.resume = "auto"
    r2 = autoqnn.search(small_cnn(), toy_data(128), None, cfg, quiet=True)
    assert [(p.name, p.scheme, p.bits) for p in r1.plan] == [(p.name, p.scheme, p.bits) for p in r2.plan]
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(r1.model(x), r2.model(x))


def test_resume_with_different_quant_config_is_refused(tmp_path):
    cfg = S.SearchConfig(search_epochs=1, precision_epochs=0, finetune_epochs=0, batch_size=64,
                         checkpoint_dir=str(tmp_path))
    autoqnn.search(small_cnn(), toy_data(128), None, cfg, quiet=True)
    cfg2 = S.SearchConfig(search_epochs=1, precision_epochs=0, finetune_epochs=0, batch_size=64,
                          checkpoint_dir=str(tmp_path), resume="auto", quant=QuantConfig(weight_bits=4))
    with pytest.raises(ValueError, match="different quantization config"):
        autoqnn.search(small_cnn(), toy_data(128), None, cfg2, quiet=True)


def test_qss_training_step_reads_no_tensor_values_on_the_host(monkeypatch):
    """On a GPU every host read of a tensor value (item, tolist, bool/float/int, torch.equal) in
    a quantizer's training forward synchronises the stream and stalls the pipeline. A QSS step
    (forward + backward + optimizer step) makes none from autoqnn's code. Checked on CPU by
    counting the calls whose caller is in the autoqnn package."""
    import traceback

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    qm = S.prepare(model, S.SearchConfig(quant=QuantConfig(), precision_epochs=0), x[:2])
    qm.train()
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)

    def step():
        loss = nn.functional.cross_entropy(qm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # first step: EMA starts, caches fill
    reads = []

    def spy(name, fn):
        def wrapped(*a, **k):
            frames = traceback.extract_stack(limit=4)[:-1]
            caller = frames[-1].filename if frames else ""
            if "/autoqnn/" in caller.replace("\\", "/") and "/tests/" not in caller:
                reads.append((name, f"{caller}:{frames[-1].lineno}"))
            return fn(*a, **k)
        return wrapped

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "equal", spy("equal", torch.equal))
    step()
    step()
    monkeypatch.undo()
    assert reads == [], reads
    assert any(isinstance(q, SchemeMixture) and q.kind == "activation" for _, q in quantizers(qm))


def test_calibration_batch_is_the_same_on_every_rank(monkeypatch):
    """The round-and-repair step's calibration batch (loss sensitivities, activation
    recalibration) must not depend on the rank: ranks that saw different batches repaired the
    bit budget differently and ended with different plans. Training batches stay sharded."""
    ds = torch.utils.data.TensorDataset(torch.arange(100.0).unsqueeze(1), torch.zeros(100, dtype=torch.long))

    def first_batch(rank, shard):
        monkeypatch.setattr(S, "_dist", lambda: (None, rank, 2))
        return next(iter(S._loader(ds, 16, 3, 999_999, True, 0, 0, shard=shard)))[0]

    assert torch.equal(first_batch(0, False), first_batch(1, False))
    assert not torch.equal(first_batch(0, True), first_batch(1, True))
    # the unsharded batch is what one process (world size 1) used before: rank 0's first batch
    assert torch.equal(first_batch(0, False), first_batch(0, True))
