# SPDX-License-Identifier: MIT
"""A whole search step under ``torch.compile(fullgraph=True)``: the QSS and QPL quantizers trace
into one graph (no graph break, no recompile from one step to the next), and the compiled steps
compute exactly what the eager steps compute.

The Gumbel noise is a counter-based function of (seed, step, candidate) (``gumbel_noise``): the
eager forward reads it from a cached block, the traced forward computes the step's row from the
``step`` buffer inside the graph. ``aot_eager`` runs the traced graph with the eager kernels, so
"exactly" is bit for bit here (Inductor may reorder float math in the layers around the
quantizers; ``test_inductor_step_close_to_eager`` checks it loosely).
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoqnn.config import QuantConfig
from autoqnn.nn import Quantizer, SchemeMixture, quantizers
from autoqnn.nn.quantizers import NOISE_BLOCK, gumbel_noise
from autoqnn.pipeline import SearchConfig, compile_model, fix_schemes, precision_loss, prepare, set_step


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts from empty Dynamo caches: every test compiles new instances of the same
    classes, and their entries would add up to Dynamo's recompile limit (8 per code object) over
    the file, which fullgraph=True turns into an error."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Net(nn.Module):
    """Small, but with what matters: convs and linears (weight + activation vertices), BN, ReLU."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.relu(self.b2(self.c2(x)))
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        return self.out(F.relu(self.fc(x.flatten(1))))


def _data(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def _qss_model():
    torch.manual_seed(0)
    x, _ = _data()
    return prepare(Net(), SearchConfig(quant=QuantConfig()), x[:2]).train()


def _qpl_model():
    m = _qss_model()
    fix_schemes(m, learn_bits=True)
    return m.train()


class _Graphs:
    """A torch.compile backend that counts the graphs it is given and runs them with aot_eager."""

    def __init__(self):
        self.n = 0

    def __call__(self, gm, example_inputs):
        self.n += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _steps(model, n, *, compiled, qpl=False, start_step=None, backend=None):
    """n SGD steps on a copy of ``model``: eager, under ``torch.compile`` (``compiled=True``) or
    under ``autoqnn.compile_model`` (``compiled="compile_model"``, with its host-bits hooks)."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if compiled == "compile_model":
        fwd = compile_model(model, backend=backend or "aot_eager", fullgraph=True)
    else:
        fwd = torch.compile(model, fullgraph=True, backend=backend) if compiled else model
    x, y = _data()
    losses = []
    if start_step is not None:
        set_step(model, start_step)
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(x), y)
        if qpl:
            loss = loss + precision_loss(model)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return model, torch.stack(losses)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- the noise
def test_gumbel_noise_eager_block_equals_traced_row():
    q = SchemeMixture(kind="weight", seed=77)
    K = len(q.schemes)
    traced = torch.compile(lambda s, t: gumbel_noise(s, t, K), fullgraph=True, backend="aot_eager")
    for s in (0, 1, NOISE_BLOCK - 1, NOISE_BLOCK, 5 * NOISE_BLOCK + 3, 2**33 + 5):
        want = q.gumbel(s)
        st = torch.tensor(s)
        assert torch.equal(gumbel_noise(q.seed, st, K), want), s
        assert torch.equal(traced(q.seed, st), want), s
    rows = gumbel_noise(q.seed, torch.arange(3 * NOISE_BLOCK), K)
    assert rows.shape == (3 * NOISE_BLOCK, K) and rows.dtype == torch.float32
    assert torch.equal(rows[NOISE_BLOCK + 9], q.gumbel(NOISE_BLOCK + 9))


def test_gumbel_noise_is_gumbel_and_decorrelated():
    K = 8
    g = gumbel_noise(torch.tensor(3), torch.arange(40_000), K).double()  # 320k draws
    assert torch.isfinite(g).all()
    euler_gamma = 0.5772156649
    assert abs(g.mean().item() - euler_gamma) < 0.01
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03
    for t in (-1.0, 0.0, 1.0, 3.0):  # CDF exp(-exp(-t))
        assert abs((g <= t).double().mean().item() - math.exp(-math.exp(-t))) < 0.004, t
    c = torch.corrcoef(torch.cat([g[1:], g[:-1]], 1).T)  # candidates and consecutive steps
    off = c - torch.diag(torch.diag(c))
    assert off.abs().max().item() < 0.02


def test_gumbel_noise_depends_on_seed_step_and_candidate():
    st = torch.arange(64)
    seeds = [0, 1, 2**32, -1, 2**62 + 7]
    rows = [gumbel_noise(torch.tensor(s), st, 8) for s in seeds]
    for i in range(len(seeds)):
        assert rows[i].unique().numel() == rows[i].numel()  # no repeat across steps or candidates
        for j in range(i):
            assert not torch.equal(rows[i], rows[j]), (seeds[i], seeds[j])


# ----------------------------------------------------------------------------- whole steps
def test_compiled_qss_steps_equal_eager_in_one_graph():
    m = _qss_model()
    # start two steps before a noise-block boundary: the traced noise must follow the counter
    # across it (the eager side computes a new block there)
    start = NOISE_BLOCK - 2
    ref, le = _steps(m, 4, compiled=False, start_step=start)
    graphs = _Graphs()
    got, lc = _steps(m, 4, compiled=True, start_step=start, backend=graphs)
    assert graphs.n == 1  # one graph, traced once: no recompile from step to step
    assert torch.equal(le, lc)
    _assert_same_state(ref, got)
    mixes = [q for _, q in quantizers(got) if isinstance(q, SchemeMixture)]
    assert mixes and all(int(q.step) == start + 4 for q in mixes)
    # an eager forward after the compiled ones continues from the buffer, not a stale copy
    q = mixes[0]
    assert torch.equal(q._noise(), q.gumbel(start + 4))


def test_compiled_qss_follows_temperature_and_set_step_without_recompiling():
    m = _qss_model()
    graphs = _Graphs()
    mc = copy.deepcopy(m)
    fwd = torch.compile(mc, fullgraph=True, backend=graphs)
    x, _ = _data()
    for step, tau in ((10, 5.0), (500, 1.0), (3, 0.25)):
        for mod in (m, mc):
            set_step(mod, step)
            for _, q in quantizers(mod):
                if isinstance(q, SchemeMixture):
                    q.set_temperature(tau)
        assert torch.equal(fwd(x), m(x)), (step, tau)
    assert graphs.n == 1


def test_compiled_qpl_steps_equal_eager_in_one_graph():
    m = _qpl_model()
    assert any(q.learn_bits for _, q in quantizers(m))
    ref, le = _steps(m, 4, compiled=False, qpl=True)
    graphs = _Graphs()
    got, lc = _steps(m, 4, compiled=True, qpl=True, backend=graphs)
    assert graphs.n == 1
    assert torch.equal(le, lc)
    _assert_same_state(ref, got)


def _learned(model):
    return [q for _, q in quantizers(model) if getattr(q, "learn_bits", False)]


class _TwoLearned(nn.Module):
    """A linear layer with a learned-bits weight quantizer and a learned-bits activation one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 5)
        self.qw = Quantizer("clip", 3, learn_bits=True)
        self.qa = Quantizer("fixed", 4, learn_bits=True, kind="activation")

    def forward(self, x):
        return F.linear(self.qa(x.flatten(1)[:, :16]), self.qw(self.fc.weight), self.fc.bias)


def test_compile_model_qpl_steps_equal_eager_in_one_graph_with_host_bits():
    """compile_model's QPL step: the hooks copy the learned bits to the host before each forward
    and the graph's ops read those copies; the steps still equal eager bit for bit, in one graph
    (a copy is refreshed in place, so it stays the same graph input)."""
    m = _qpl_model()
    ref, le = _steps(m, 4, compiled=False, qpl=True)
    graphs = _Graphs()
    got, lc = _steps(m, 4, compiled="compile_model", qpl=True, backend=graphs)
    assert graphs.n == 1
    assert torch.equal(le, lc)
    _assert_same_state(ref, got)
    qs = _learned(got)
    assert qs
    for q in qs:  # the copies hold the bits of the last forward; disarmed after it
        assert q._bits_mirror.device.type == "cpu"
        assert q.__dict__["_host_armed"] is False
    # the last forward came before the last optimizer step: refresh to compare with the bits now
    from autoqnn.nn import refresh_host_bits

    assert refresh_host_bits(got) == len(qs)
    for q in qs:
        assert float(q._bits_mirror) == q.int_bits()


def test_compiled_graph_quantizes_with_the_host_copies(monkeypatch):
    """The graph's ops read the host copies, not the device bits: with the refresh skipped, a
    changed learned bitwidth goes unseen (the documented contract of a stale copy), and with
    the refresh it is seen, in the same graph. A plain torch.compile of the same model (copies
    disarmed) reads the device bits."""
    import autoqnn.nn as qnn

    m = _TwoLearned().eval()
    x, _ = _data()
    graphs = _Graphs()
    cm = compile_model(m, backend=graphs, fullgraph=True)
    with torch.no_grad():
        before = m(x)
        assert torch.equal(cm(x), before)
        w = [q for q in _learned(m) if q.kind == "weight"][0]
        old = w.int_bits()
        new = old - 1 if old > 2 else old + 1
        w.bits.fill_(float(new))
        after = m(x)
        assert not torch.equal(after, before)
        monkeypatch.setattr(qnn, "_refresh", lambda qs: None)  # the hooks' refresh
        assert torch.equal(cm(x), before)  # stale copy: the old bits
        monkeypatch.undo()
        assert torch.equal(cm(x), after)
        assert graphs.n == 1
        w.__dict__["_bits_mirror"].fill_(float(old))  # stale, but disarmed: not read
        assert torch.equal(torch.compile(m, backend="aot_eager", fullgraph=True)(x), after)


def test_host_bits_hooks_serve_an_eager_forward_too():
    """Armed copies are read by eager quantizer calls as well (a Dynamo fallback runs them
    eagerly inside the hooked forward): same values and gradients as without them."""
    from autoqnn.nn import use_host_bits

    m = _TwoLearned()
    m2 = copy.deepcopy(m)

    class Wrap(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    wrapped = Wrap(m)
    h = use_host_bits(wrapped, m)
    x, y = _data()
    F.cross_entropy(wrapped(x), y).backward()
    F.cross_entropy(m2(x), y).backward()
    for (n, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.equal(a.grad, b.grad), n
    assert all(q.__dict__["_host_armed"] is False for q in _learned(m))
    for handle in h:
        handle.remove()


def test_quantizer_added_after_the_hooks_reads_its_device_bits():
    """The hooks serve the learned-bits quantizers present when they were installed; one that
    replaces them later (fix_schemes after compile_model) is never armed: correct, unsynced."""
    from autoqnn.nn import use_host_bits

    m = _TwoLearned().eval()
    use_host_bits(m, m)
    m.qw = Quantizer("pot", 3, learn_bits=True)
    x, _ = _data()
    with torch.no_grad():
        y = m(x)
        assert "_host_armed" not in m.qw.__dict__ and "_bits_mirror" not in m.qw.__dict__
        m.qw.bits.fill_(4.0)
        assert not torch.equal(m(x), y)


def test_refresh_host_bits_keeps_unchanged_copies_and_rejects_non_finite_bits():
    from autoqnn.nn import refresh_host_bits, use_host_bits

    m = _TwoLearned()
    qs = _learned(m)
    assert refresh_host_bits(m) == len(qs) == 2
    first = [q._bits_mirror for q in qs]
    v0 = [q._bits_mirror._version for q in qs]
    with torch.no_grad():
        qs[0].bits.add_(0.2)  # same integer bits: the copy is not touched
        qs[1].bits.fill_(float(qs[1].int_bits()) + 1.0)
    refresh_host_bits(m)
    assert all(q._bits_mirror is t for q, t in zip(qs, first))
    assert qs[0]._bits_mirror._version == v0[0]
    assert qs[1]._bits_mirror._version > v0[1]
    assert float(qs[1]._bits_mirror) == qs[1].int_bits()
    with torch.no_grad():
        qs[0].bits.fill_(float("nan"))
    refresh_host_bits(m)
    assert torch.isnan(qs[0]._bits_mirror)
    use_host_bits(m, m)  # hooks on the model itself: an eager forward with armed copies
    with pytest.raises(ValueError, match="finite"):
        m(_data()[0])
    assert qs[0].__dict__["_host_armed"] is False  # disarmed although the forward raised


_EXPLICIT = ["torch"] + (["cpp"] if __import__("autoqnn")._ext.HAS_EXT else [])


@pytest.mark.parametrize("backend", _EXPLICIT)
@pytest.mark.parametrize("kind", ["weight", "activation", "mixture"])
def test_explicit_backends_trace_in_one_graph(backend, kind):
    """Quantizers with an explicit backend trace without a break too (the check that the backend
    has its kernels queries the dispatcher once, at trace time) and equal eager."""
    torch.manual_seed(0)
    if kind == "mixture":
        q = SchemeMixture(backend=backend)
    else:
        q = Quantizer("clip", 3, kind=kind, backend=backend)
    q.train()
    q2 = copy.deepcopy(q)
    x = torch.randn(6, 20, requires_grad=True)
    graphs = _Graphs()
    cq = torch.compile(q2, backend=graphs, fullgraph=True)
    for _ in range(2):
        y, y2 = q(x), cq(x)
        assert torch.equal(y, y2)
        g = torch.autograd.grad(y.square().sum(), x)[0]
        g2 = torch.autograd.grad(y2.square().sum(), x)[0]
        assert torch.equal(g, g2)
    assert graphs.n == 1


@pytest.mark.parametrize("make", [_qss_model, _qpl_model], ids=["qss", "qpl"])
def test_compiled_step_with_changing_batch_size_recompiles_once(make):
    """A last, smaller batch (or any new batch size): Dynamo recompiles once with a dynamic batch
    dimension (the fake kernels and the quantizers' Python take symbolic sizes), then serves
    every size from that graph; values and gradients equal eager throughout."""
    m = make()
    m2 = copy.deepcopy(m)
    graphs = _Graphs()
    cm = compile_model(m, backend=graphs)
    x, y = _data(32)
    for n in (16, 12, 8, 16, 5):
        out, ref = cm(x[:n]), m2(x[:n])
        assert torch.equal(out, ref), n
        F.cross_entropy(out, y[:n]).backward()
        F.cross_entropy(ref, y[:n]).backward()
    assert graphs.n == 2
    for (name, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.equal(a.grad, b.grad), name


def _fixed_model():
    """The fine-tuning phase's model: one scheme per vertex, fixed integer bits."""
    m = _qss_model()
    fix_schemes(m, learn_bits=False)
    return m.train()


def test_compiled_finetune_steps_equal_eager_in_one_graph():
    m = _fixed_model()
    assert all(not q.learn_bits for _, q in quantizers(m))
    ref, le = _steps(m, 3, compiled=False)
    graphs = _Graphs()
    got, lc = _steps(m, 3, compiled=True, backend=graphs)
    assert graphs.n == 1
    assert torch.equal(le, lc)
    _assert_same_state(ref, got)


@pytest.mark.parametrize("make", [_qss_model, _qpl_model, _fixed_model], ids=["qss", "qpl", "fixed"])
def test_compiled_eval_equals_eager(make):
    m, _ = _steps(make(), 2, compiled=False, qpl=make is _qpl_model)
    m.eval()
    x, _ = _data()
    fwd = torch.compile(copy.deepcopy(m), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(fwd(x), m(x))


def test_compiled_eval_uses_batch_statistics_when_the_ema_does_not_fit_the_bits():
    m, _ = _steps(_qpl_model(), 2, compiled=False, qpl=True)
    m.eval()
    acts = [q for _, q in quantizers(m) if q.kind == "activation" and q.learn_bits]
    assert acts
    with torch.no_grad():  # learned bits moved since the last training step: EMA is stale
        acts[0].bits.fill_(float(acts[0].int_bits()) + 1.0)
    x, _ = _data()
    mc = copy.deepcopy(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # eager warns that it uses batch stats
        with torch.no_grad():
            want = m(x)
    with torch.no_grad():
        got = torch.compile(mc, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, want)



# ----------------------------------------------------------------------------- Inductor's layouts
_LAYOUT_OPS = ("scheme_params", "mixture", "mixture_backward")


class _LayoutSpy:
    """Records the layout of x at every CPU call of the quantizer ops: a Python CPU kernel in
    front of the C++ one, which runs the reference kernel (it keeps layouts the same way) until
    ``remove()``. ``seen`` maps op name -> list of (x.dim(), x is channels-last and not
    contiguous)."""

    def __init__(self):
        from autoqnn.ops import reference as ref

        self.seen = {name: [] for name in _LAYOUT_OPS}
        kernels = {"scheme_params": ref.scheme_params_ref, "mixture": ref.mixture_ref,
                   "mixture_backward": ref.mixture_backward_ref}

        def spy(name):
            xi = 1 if name == "mixture_backward" else 0

            def kernel(*args):
                x = args[xi]
                self.seen[name].append((x.dim(), x.dim() == 4 and not x.is_contiguous()
                                        and x.is_contiguous(memory_format=torch.channels_last)))
                return kernels[name](*args)
            return kernel

        self._lib = torch.library.Library("autoqnn", "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name in _LAYOUT_OPS:
                self._lib.impl(name, spy(name), "CPU")

    def remove(self):
        """Back to the registered CPU kernels (the C++ ones)."""
        if self._lib is not None:
            self._lib._destroy()
            self._lib = None


@pytest.fixture
def layout_spy():
    spy = _LayoutSpy()
    try:
        yield spy
    finally:
        spy.remove()


def _has_flexible_tag():
    return getattr(torch.Tag, "flexible_layout", None) is not None


def test_quantizer_ops_are_tagged_flexible_layout():
    from autoqnn.ops import _schema

    if not _has_flexible_tag():
        pytest.skip("this torch has no flexible_layout tag")
    for name in _schema.FLEXIBLE_LAYOUT_OPS:
        for op in (name, f"{name}_cuda") if name in _schema.GPU_TWIN_OPS else (name,):
            assert torch.Tag.flexible_layout in getattr(torch.ops.autoqnn, op).default.tags, op
    for name in _schema.BATCHED_OPS:  # flat x: Inductor's default constraint
        assert torch.Tag.flexible_layout not in getattr(torch.ops.autoqnn, name).default.tags, name


def test_inductor_step_close_to_eager(layout_spy):
    """One training step of ``compile_model`` (Inductor) against eager. The quantizers round, so
    a float reordering upstream can move an element by one level: nearly all outputs and
    gradients agree closely, the loss and the activation EMAs to 1e-3.

    Inductor runs the convolutions of this contiguous model channels-last (its layout
    optimisation: on by default for oneDNN and for conv-heavy GPU graphs; forced here). The ops
    are tagged ``flexible_layout``, so Inductor hands them its channels-last activations and
    weights as they are, instead of copying each one to the contiguous layout and the output
    back (measured on the CPU: the Inductor code's own time per VGG-like QSS step went from
    11.8-17.1 to 8.1-11.7 ms)."""
    pytest.importorskip("torch._inductor")
    import autoqnn
    from torch._inductor import config as inductor_config

    m = _qss_model()
    x, y = _data()
    ref = copy.deepcopy(m)
    out_ref = ref(x)
    F.cross_entropy(out_ref, y).backward()
    for v in layout_spy.seen.values():
        v.clear()
    mc = copy.deepcopy(m)
    with inductor_config.patch(layout_optimization=True, force_layout_optimization=True):
        compiled = autoqnn.compile_model(mc, fullgraph=True)
        out = compiled(x)
        F.cross_entropy(out, y).backward()
    assert torch.isclose(out, out_ref, rtol=1e-3, atol=1e-3).float().mean().item() > 0.95
    torch.testing.assert_close(F.cross_entropy(out, y), F.cross_entropy(out_ref, y), rtol=1e-3, atol=1e-3)
    for (n, a), (_, b) in zip(ref.named_parameters(), mc.named_parameters()):
        close = torch.isclose(b.grad, a.grad, rtol=1e-2, atol=1e-4).float().mean().item()
        assert close > 0.9, (n, close)
    for (_, a), (_, b) in zip(quantizers(ref), quantizers(mc)):
        if isinstance(a, SchemeMixture):
            assert int(a.step) == int(b.step) == 1
        if a.kind == "activation":
            torch.testing.assert_close(a.ema_params, b.ema_params, rtol=1e-3, atol=1e-5)
    # every op ran once per quantizer, forward and backward
    seen = layout_spy.seen
    nq = len(list(quantizers(m)))
    assert len(seen["mixture"]) == nq and len(seen["mixture_backward"]) == nq
    if _has_flexible_tag():
        for name in _LAYOUT_OPS:
            # c2's and c3's weights and inputs (c1 and out are not quantized, fc's are 2-D):
            # every 4-D tensor the ops see is channels-last, as Inductor laid it out
            assert [cl for d, cl in seen[name] if d == 4] == [True] * 4, (name, seen[name])
    # a second step of the same compiled graphs (no recompile) on the C++ kernels, which now get
    # those channels-last buffers
    counts = {k: len(v) for k, v in seen.items()}
    layout_spy.remove()
    with inductor_config.patch(layout_optimization=True, force_layout_optimization=True):
        out = compiled(x)
        F.cross_entropy(out, y).backward()
    out_ref = ref(x)
    F.cross_entropy(out_ref, y).backward()
    assert {k: len(v) for k, v in seen.items()} == counts  # the spy is gone
    assert torch.isclose(out, out_ref, rtol=1e-3, atol=1e-3).float().mean().item() > 0.95
    for (n, a), (_, b) in zip(ref.named_parameters(), mc.named_parameters()):
        close = torch.isclose(b.grad, a.grad, rtol=1e-2, atol=1e-4).float().mean().item()
        assert close > 0.9, (n, close)


# ----------------------------------------------------------------------------- the pipeline
def _search(compile_opt, tmp_path=None):
    import autoqnn
    from autoqnn.data import load_fashion_mnist

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the shipped-subset notice
        train, val = load_fashion_mnist("train", limit=256), load_fashion_mnist("test", limit=128)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10))
    cfg = SearchConfig(float_epochs=1, search_epochs=2, precision_epochs=1, finetune_epochs=1, batch_size=64,
                       optimizer="adam", lr=3e-3, weight_target=2.0, act_target=2.0, seed=0,
                       compile=compile_opt, quant=QuantConfig(exclude_first_last=False))
    return autoqnn.search(model, train, val, cfg, quiet=True)


def test_search_with_compile_makes_the_same_decisions_as_eager(monkeypatch):
    eager = _search(False)
    real, calls = torch.compile, []

    def spy(model, **kw):
        calls.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    comp = _search("aot_eager")
    assert calls == [{"backend": "aot_eager", "fullgraph": False}] * 4  # one per training phase
    assert [(p.name, p.scheme, p.bits) for p in comp.plan] == [(p.name, p.scheme, p.bits) for p in eager.plan]
    assert comp.quant_accuracy == eager.quant_accuracy and comp.float_accuracy == eager.float_accuracy
    le = [h["train_loss"] for h in eager.history if "train_loss" in h]
    lc = [h["train_loss"] for h in comp.history if "train_loss" in h]
    assert lc == le
    assert comp.config["compile"] == "aot_eager" and eager.config["compile"] is False


def test_compile_options_are_validated():
    with pytest.raises(ValueError, match="unknown torch.compile backend 'nope'"):
        SearchConfig(compile="nope")
    with pytest.raises(ValueError, match="compile must be True, False"):
        SearchConfig(compile=3)
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        SearchConfig(compile=True, compile_mode="fastest")
    with pytest.raises(ValueError, match="applies to the Inductor backend"):
        SearchConfig(compile="aot_eager", compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="batch_weights and compile cannot be combined"):
        SearchConfig(compile=True, batch_weights=True)
    c = SearchConfig(compile=True, compile_mode="reduce-overhead")
    assert SearchConfig.from_dict(c.to_dict()).to_dict() == c.to_dict()


def test_compile_model_passes_mode_and_layout_options(monkeypatch):
    import autoqnn

    real, calls = torch.compile, []

    def spy(model, **kw):
        calls.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    net = nn.Linear(2, 2)
    autoqnn.compile_model(net)
    autoqnn.compile_model(net, mode="max-autotune-no-cudagraphs", layout_optimization=False)
    autoqnn.compile_model(net, backend="aot_eager", fullgraph=True)
    assert calls[0] == {"backend": "inductor", "fullgraph": False}
    assert calls[1]["options"]["layout_optimization"] is False and calls[1]["options"]["max_autotune"] is True
    assert calls[2] == {"backend": "aot_eager", "fullgraph": True}
    with pytest.raises(ValueError, match="apply to the Inductor backend"):
        autoqnn.compile_model(net, backend="aot_eager", mode="reduce-overhead")
    with pytest.raises(ValueError, match="apply to the Inductor backend"):
        autoqnn.compile_model(net, backend="aot_eager", layout_optimization=False)
    with pytest.raises(ValueError, match="compile mode must be one of"):
        autoqnn.compile_model(net, mode="warp-speed")


def test_compile_model_turns_cuda_graphs_off_for_learned_bits(monkeypatch):
    """A CUDA graph replay keeps the bits of its capture: compile_model compiles a model with
    learned bitwidths without CUDA graphs (warning), and leaves them on for fixed bits."""
    import autoqnn

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    with pytest.warns(RuntimeWarning, match="without CUDA graphs"):
        autoqnn.compile_model(_TwoLearned(), mode="reduce-overhead")
    assert calls[-1]["options"]["triton.cudagraphs"] is False
    with pytest.warns(RuntimeWarning, match="without CUDA graphs"):
        autoqnn.compile_model(_TwoLearned(), mode="max-autotune")
    assert calls[-1]["options"]["triton.cudagraphs"] is False and calls[-1]["options"]["max_autotune"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autoqnn.compile_model(_fixed_model(), mode="reduce-overhead")
        autoqnn.compile_model(_TwoLearned(), mode="max-autotune-no-cudagraphs")
    assert calls[-2]["options"]["triton.cudagraphs"] is True


def test_cli_compile_flag_reaches_the_config():
    from autoqnn.cli import build_configs, build_parser

    args = build_parser().parse_args(["search", "--compile"])
    assert build_configs(args)[1].compile is True
    args = build_parser().parse_args(["search", "--compile", "aot_eager"])
    assert build_configs(args)[1].compile == "aot_eager"
    args = build_parser().parse_args(["search"])
    assert build_configs(args)[1].compile is False


# ----------------------------------------------------------------------------- on a GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("make", [_qss_model, _qpl_model], ids=["qss", "qpl"])
def test_cuda_compiled_steps_equal_eager_in_one_graph(make):
    """The same as the CPU tests with the model and the data on the GPU: the traced step runs the
    device's kernels (the CUDA or Triton ops, the in-graph noise) and equals the eager step."""
    qpl = make is _qpl_model
    m = make().cuda()

    def run(compiled, backend=None):
        mm = copy.deepcopy(m)
        opt = torch.optim.SGD(mm.parameters(), lr=0.05, momentum=0.9)
        fwd = torch.compile(mm, fullgraph=True, backend=backend) if compiled else mm
        x, y = (t.cuda() for t in _data())
        out = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(fwd(x), y) + (precision_loss(mm) if qpl else 0)
            loss.backward()
            opt.step()
            out.append(loss.detach())
        return mm, torch.stack(out)

    ref, le = run(False)
    graphs = _Graphs()
    got, lc = run(True, graphs)
    assert graphs.n == 1
    assert torch.equal(le, lc)
    _assert_same_state(ref, got)
    _, li = run(True, "inductor")  # Inductor: one graph too (fullgraph), close to eager
    torch.testing.assert_close(li, le, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["weight", "activation"])
@pytest.mark.parametrize("pruned", [False, True], ids=["all", "pruned"])
def test_compiled_argmax_eval_equals_eager_with_non_finite_inputs(kind, pruned):
    """Traced, eval's argmax is a one-hot mixture over the K candidates: with ±Inf and NaN in x
    it must still give exactly the chosen candidate's values (every candidate maps ±Inf to a
    finite level and NaN to NaN, so the zero weights add exact zeros)."""
    q = SchemeMixture(kind=kind, seed=1)
    K = len(q.schemes)
    with torch.no_grad():
        q.theta.copy_(torch.linspace(-1, 1, K).roll(3))  # argmax: not the first candidate
    if pruned:
        q.update_pruning(threshold=0.99, patience=1)  # keeps only the argmax...
        q.active[0] = True  # ...and one more
        q._refresh_from_buffers()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 33, generator=g)
    if kind == "activation":
        x = x.abs()
        q.train()
        q(x)  # EMA statistics from finite data
    x[0, :3] = torch.tensor([float("inf"), float("nan"), -float("inf") if kind == "weight" else 0.0])
    q.eval()
    with torch.no_grad():
        want = q(x)
        got = torch.compile(copy.deepcopy(q), fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


@cuda
def test_cuda_reduce_overhead_qss_step_close_to_eager():
    """``compile_mode="reduce-overhead"``: Inductor's CUDA graphs, partitioned around what they
    cannot hold (the ops' bits are a CPU tensor, read on the host while the launches are set up;
    fixed during QSS, so a replay is right). This checks the step runs under them and computes
    what the eager step does; whether the partitions pay is the compiled_step benchmark's job."""
    import autoqnn

    m = _qss_model().cuda()

    def run(mode):
        mm = copy.deepcopy(m)
        opt = torch.optim.SGD(mm.parameters(), lr=0.05, momentum=0.9)
        fwd = autoqnn.compile_model(mm, mode=mode) if mode else mm
        x, y = (t.cuda() for t in _data())
        out = []
        for _ in range(4):
            torch.compiler.cudagraph_mark_step_begin()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()
            out.append(loss.detach().clone())  # a graph replay reuses its output memory
        return torch.stack(out)

    torch.testing.assert_close(run("reduce-overhead"), run(None), rtol=0.05, atol=0.05)


def test_compiled_qss_after_pruning_recompiles_once_and_equals_eager():
    """Candidate pruning changes which candidates a vertex evaluates (a Python-side list): the
    compiled model traces again once, then follows the pruned mixture exactly."""
    m = _qss_model()
    mc = copy.deepcopy(m)
    graphs = _Graphs()
    fwd = torch.compile(mc, fullgraph=True, backend=graphs)
    x, _ = _data()
    assert torch.equal(fwd(x), m(x))
    for mod in (m, mc):
        for _, q in quantizers(mod):
            if isinstance(q, SchemeMixture):
                with torch.no_grad():
                    q.theta.copy_(torch.arange(len(q.schemes), dtype=torch.float32))
                q.update_pruning(threshold=0.3, patience=1)
    assert any(len(q._active) < len(q.schemes) for _, q in quantizers(mc) if isinstance(q, SchemeMixture))
    for _ in range(2):
        assert torch.equal(fwd(x), m(x))
    assert graphs.n == 2


@cuda
def test_cuda_compile_model_qpl_step_does_not_sync(monkeypatch):
    """On a GPU, compile_model's QPL step: after warm-up, forward, precision loss and backward
    cause no stream sync except the one host-bits refresh per step (run here with sync debug off),
    because the graph's ops read the host copies of the learned bits."""
    import autoqnn.nn as qnn

    m = _qpl_model().cuda()
    cm = compile_model(m, backend="aot_eager", fullgraph=True)
    x, y = (t.cuda() for t in _data())
    opt = torch.optim.SGD(m.parameters(), lr=0.05)

    def step():
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(cm(x), y) + precision_loss(m)).backward()
        opt.step()

    for _ in range(2):  # compile, caches of small device constants
        step()
    real = qnn._refresh  # what the hooks call

    def refresh(qs):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real(qs)
        finally:
            torch.cuda.set_sync_debug_mode("warn")

    monkeypatch.setattr(qnn, "_refresh", refresh)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert syncs == [], syncs[:3]
