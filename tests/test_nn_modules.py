# SPDX-License-Identifier: MIT
"""autoqnn.nn: quantizer modules and drop-in layers."""
import copy
import io

import pytest
import torch
from torch import nn

import autoqnn.functional as AF
import autoqnn.nn as qnn
from autoqnn.nn import QConv2d, QConvTranspose2d, QLinear, Quantizer, SchemeMixture


def test_quantizer_matches_functional_and_learns_bits():
    x = torch.randn(64, 32)
    q = Quantizer("clip", 3)
    torch.testing.assert_close(q(x), AF.quantize(x, "clip", 3))
    ql = Quantizer("pot", 3, learn_bits=True)
    assert isinstance(ql.bits, nn.Parameter)
    (ql(x.requires_grad_()) ** 2).sum().backward()
    assert ql.bits.grad is not None and ql.bits.grad != 0
    with torch.no_grad():
        ql.bits.fill_(9.0)
    ql.clamp_bits_()
    assert ql.int_bits() == 4
    with pytest.raises(ValueError, match="pot.*2..4"):
        Quantizer("pot", 6)
    with pytest.raises(ValueError, match="fixed bitwidth"):
        Quantizer("binary", learn_bits=True)
    with pytest.raises(ValueError, match="unknown scheme"):
        Quantizer("nope")


def test_activation_ema_used_at_eval():
    torch.manual_seed(0)
    q = Quantizer("clip", 3, kind="activation")
    x_eval = torch.randn(256) * 10  # a very different scale than training
    q.eval()
    torch.testing.assert_close(q(x_eval), AF.quantize(x_eval, "clip", 3))  # no EMA yet: batch stats
    q.train()
    for _ in range(20):
        q(torch.randn(256))
    q.eval()
    expected = AF.quantize(x_eval, "clip", 3, params=q.ema_params)
    torch.testing.assert_close(q(x_eval), expected)
    assert not torch.equal(q(x_eval), AF.quantize(x_eval, "clip", 3))
    assert 0.5 < float(q.ema_params[0, 0, 0]) / 0.586 < 1.5  # ~ λ₃·σ of N(0,1)


def test_activation_ema_averages_and_restarts_when_the_bits_change():
    """The EMA update (decided on the device, no host read): the first batch starts it, equal
    bits average with the momentum, a change of the integer bits (QPL) restarts it."""
    q = Quantizer("clip", 3, kind="activation", learn_bits=True, ema_momentum=0.9)
    x1, x2, x3 = torch.randn(500), torch.randn(500) * 3, torch.randn(500) * 7
    p = lambda x, b: AF.scheme_params(x, ["clip"], [b])  # noqa: E731
    q(x1)
    torch.testing.assert_close(q.ema_params, p(x1, 3))
    q(x2)
    torch.testing.assert_close(q.ema_params, p(x1, 3) * 0.9 + p(x2, 3) * 0.1)
    assert q.ema_bits.tolist() == [3.0]
    with torch.no_grad():
        q.bits.fill_(5.2)  # the learned bitwidth now rounds to 5: the average restarts
    q(x3)
    torch.testing.assert_close(q.ema_params, p(x3, 5))
    assert q.ema_bits.tolist() == [5.0]
    q.eval()  # eval uses the restarted EMA at the new bits
    torch.testing.assert_close(q(x1), AF.quantize(x1, "clip", 5, params=q.ema_params))


def test_activation_ema_host_fast_path_sees_outside_writes_of_ema_bits():
    """The EMA skips the device-side bits comparison while the module itself wrote ema_bits last;
    a write from outside (copy_/fill_, load_state_dict, a move) must send it back to the
    comparison, so a change of bits still restarts the average."""
    x1, x2, x3 = torch.randn(300), torch.randn(300) * 2, torch.randn(300) * 5
    p = lambda x: AF.scheme_params(x, ["zoom"], [4], need_bits_grad=False)  # noqa: E731
    q = Quantizer("zoom", 4, kind="activation", ema_momentum=0.5)
    q(x1)
    q(x2)  # fast path: averages
    torch.testing.assert_close(q.ema_params, p(x1) * 0.5 + p(x2) * 0.5, rtol=0, atol=1e-6)
    with torch.no_grad():
        q.ema_bits.fill_(7.0)  # as if the statistics had been collected at 7 bits
    q(x3)  # the bits differ: restart
    torch.testing.assert_close(q.ema_params, p(x3), rtol=0, atol=0)
    assert q.ema_bits.tolist() == [4.0]
    q(x1)  # fast path again
    # a state dict (same scheme and bits) whose statistics were collected at other bits
    other = Quantizer("zoom", 4, kind="activation")
    other(x1)
    with torch.no_grad():
        other.ema_bits.fill_(6.0)
    q.load_state_dict(other.state_dict())
    q(x2)
    torch.testing.assert_close(q.ema_params, p(x2), rtol=0, atol=0)
    # and the mixture's activation EMA takes the same path
    m = SchemeMixture(kind="activation", ema_momentum=0.5)
    m(x1)
    first = m.ema_params.clone()
    m(x2)
    expect = first * 0.5 + AF.scheme_params(x2, m.schemes, m._bits, need_bits_grad=False) * 0.5
    torch.testing.assert_close(m.ema_params, expect, rtol=0, atol=1e-6)


def test_activation_ema_fast_path_is_off_once_compiled():
    """A compiled graph may write ema_bits without bumping its version counter, so a module that
    torch.compile traced keeps the device-side bits comparison in later eager steps too."""
    torch._dynamo.reset()
    q = Quantizer("zoom", 4, kind="activation", ema_momentum=0.5)
    x1, x2, x3 = torch.randn(300), torch.randn(300) * 2, torch.randn(300) * 5
    q(x1)
    assert q.__dict__.get("_ema_seen") is not None and not q.__dict__.get("_ema_fast_off")
    cq = torch.compile(q, backend="aot_eager")
    cq(x2)
    assert q.__dict__.get("_ema_fast_off") is True
    with torch.no_grad():
        q.ema_bits.fill_(6.0)
    q(x3)  # eager again: the bits differ from what the buffer says, so the average restarts
    torch.testing.assert_close(q.ema_params, AF.scheme_params(x3, ["zoom"], [4], need_bits_grad=False),
                               rtol=0, atol=0)


def test_fixed_ema_step_stays_power_of_two():
    q = Quantizer("fixed", 4, kind="activation")
    for s in (1.0, 3.0, 7.0):
        q(torch.randn(128) * s)
    q.eval()
    y = q(torch.randn(128))
    step = q._eval_params([4], y)[0, 0, 0]
    assert torch.log2(step) == torch.round(torch.log2(step))


def test_mixture_gumbel_deterministic_per_seed_and_step():
    a, b = SchemeMixture(kind="weight", seed=3), SchemeMixture(kind="weight", seed=3)
    assert torch.equal(a.gumbel(5), b.gumbel(5))
    assert not torch.equal(a.gumbel(5), a.gumbel(6))
    assert not torch.equal(a.gumbel(5), SchemeMixture(kind="weight", seed=4).gumbel(5))
    x = torch.randn(16, 3, 3, 3)
    a.train()
    a(x)
    a(x)
    assert int(a.step) == 2
    c = SchemeMixture(kind="weight", seed=3)
    c.load_state_dict(a.state_dict())
    assert c._step == 2 and torch.equal(c.gumbel(), a.gumbel())


def test_mixture_gumbel_blocks_are_a_function_of_seed_and_step():
    """The noise is drawn NOISE_BLOCK steps at a time and cached: any query order, block
    boundaries and seed changes give the same value per (seed, step); callers get a copy."""
    from autoqnn.nn.quantizers import NOISE_BLOCK

    a, b = SchemeMixture(kind="weight", seed=9), SchemeMixture(kind="weight", seed=9)
    steps = [0, NOISE_BLOCK - 1, NOISE_BLOCK, 5 * NOISE_BLOCK + 3, 1, NOISE_BLOCK]
    ga = [a.gumbel(s) for s in steps]
    gb = [b.gumbel(s) for s in reversed(steps)][::-1]
    for s, u, v in zip(steps, ga, gb):
        assert torch.equal(u, v), s
    assert len({tuple(g.tolist()) for g in ga}) == len(set(steps))  # distinct steps, distinct noise
    assert torch.equal(ga[2], ga[-1])
    ga[0].fill_(123.0)  # a copy: the cache is untouched
    assert torch.equal(a.gumbel(0), b.gumbel(0)) and not torch.equal(a.gumbel(0), ga[0])
    c = SchemeMixture(kind="weight", seed=10)
    c.gumbel(3)  # caches seed 10's block ...
    c.load_state_dict(a.state_dict())  # ... which the new seed must not reuse
    assert torch.equal(c.gumbel(3), a.gumbel(3))
    # Gumbel(0, 1): mean ~ Euler-Mascheroni, variance ~ pi^2/6 over a few blocks of draws
    g = torch.stack([a.gumbel(s) for s in range(4 * NOISE_BLOCK)]).double()
    assert abs(g.mean().item() - 0.5772) < 0.05 and abs(g.var().item() - 1.6449) < 0.15


def test_mixture_gradients_temperature_and_selection():
    torch.manual_seed(0)
    m = SchemeMixture(kind="weight")
    x = torch.randn(32, 16)
    m(x).sum().backward()
    assert m.theta.grad is not None and m.theta.grad.abs().sum() > 0
    with torch.no_grad():
        m.theta.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 9.0, 0]))
    assert m.chosen() == "clip"
    m.set_temperature(1e-3)
    m.train()
    torch.testing.assert_close(m(x), AF.quantize(x, "clip", 3), rtol=1e-4, atol=1e-4)  # nearly hard
    m.eval()
    torch.testing.assert_close(m(x), AF.quantize(x, "clip", 3))  # argmax at eval
    q = m.to_quantizer()
    assert isinstance(q, Quantizer) and q.scheme == "clip" and q.int_bits() == 3
    assert "clip" in repr(m) and "tau" in repr(m)


def test_coarse_shared_theta_survives_deepcopy():
    theta = nn.Parameter(torch.zeros(8))
    model = nn.ModuleDict({"a": SchemeMixture(kind="weight", theta=theta), "b": SchemeMixture(kind="weight", theta=theta)})
    x = torch.randn(8, 8)
    (model["a"](x).sum() + model["b"](x).sum()).backward()
    assert model["a"].theta is model["b"].theta and theta.grad.abs().sum() > 0
    c = copy.deepcopy(model)
    assert c["a"].theta is c["b"].theta and c["a"].theta is not theta


@pytest.mark.parametrize("cls,args,x", [
    (nn.Conv1d, (4, 6, 3), torch.randn(2, 4, 9)),
    (nn.Conv2d, (4, 6, 3), torch.randn(2, 4, 9, 9)),
    (nn.Conv3d, (2, 3, 3), torch.randn(1, 2, 5, 5, 5)),
    (nn.ConvTranspose1d, (4, 6, 3), torch.randn(2, 4, 9)),
    (nn.ConvTranspose2d, (4, 6, 3), torch.randn(2, 4, 9, 9)),
    (nn.ConvTranspose3d, (2, 3, 3), torch.randn(1, 2, 5, 5, 5)),
    (nn.Linear, (7, 5), torch.randn(3, 7)),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_drop_in_layers(cls, args, x):
    torch.manual_seed(0)
    f = cls(*args)
    qcls = qnn.FLOAT_TO_QUANT[cls]
    built = qcls(*args)  # same constructor signature
    assert sorted(built.state_dict()) == sorted(f.state_dict())
    q = qcls.from_float(f, Quantizer("clip", 3, per_channel=True), Quantizer("clip", 3, kind="activation"))
    assert q.weight is f.weight
    assert set(q.state_dict()) >= set(f.state_dict())
    assert {k.split(".")[0] for k in set(q.state_dict()) - set(f.state_dict())} == {"weight_quant", "act_quant"}
    y = q(x)
    assert y.shape == f(x).shape and not torch.equal(y, f(x))
    qnn.set_quant_enabled(q, False)
    assert torch.equal(q(x), f(x))
    assert type(q.to_float()) is cls and q.to_float().weight is f.weight
    if cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        assert q.weight_quant.channel_dim == 1


def test_conv_transpose_output_size():
    q = QConvTranspose2d(4, 6, 3, stride=2, weight_quant=Quantizer("clip", 3))
    y = q(torch.randn(1, 4, 5, 5), output_size=[12, 12])
    assert y.shape[-2:] == (12, 12)


def test_state_dict_round_trip_file():
    torch.manual_seed(0)

    def build():
        return nn.Sequential(QConv2d(3, 8, 3, weight_quant=SchemeMixture(kind="weight"),
                                     act_quant=SchemeMixture(kind="activation")), nn.ReLU(), nn.Flatten(),
                             QLinear(8 * 6 * 6, 4, weight_quant=Quantizer("pot", 3), act_quant=Quantizer("clip", 4, kind="activation", learn_bits=True)))

    m = build()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(4, 3, 8, 8)).sum().backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = build()
    m2.load_state_dict(torch.load(buf, weights_only=True))
    m.eval()
    m2.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(m2(x), m(x))
    assert m2[0].weight_quant._step == 3 and torch.equal(m2[0].act_quant.ema_params, m[0].act_quant.ema_params)
