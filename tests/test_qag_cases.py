# SPDX-License-Identifier: MIT
"""QAG on hand-made hard cases: data-dependent control flow, functional calls, weight sharing,
an LSTM next to convs, overrides, strict mode, idempotence, BatchNorm/Dropout, torch.compile."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoqnn.nn as qnn
from autoqnn.config import LayerOverride, QuantConfig
from autoqnn.qag import QAGError, convert


class Branchy(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it) plus a functional conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.fw = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.a(x) if x.sum() > 0 else self.b(x)
        x = F.conv2d(x, self.fw, padding=1)
        return self.head(x.mean((2, 3)))


class Traceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.w1 = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
        self.w2 = nn.Parameter(torch.randn(16, 8) * 0.1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.conv2d(x, self.w1, padding=1)
        x = F.linear(x.mean((2, 3)), self.w2)
        return self.head(x)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.again = self.block  # the same module under two names
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.block(x))
        x = F.relu(self.again(x))
        return self.head(x.mean((2, 3)))


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        y, _ = self.lstm(x.transpose(1, 2))
        return self.head(y[:, -1])


class BNDrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.c2(F.relu(self.bn(self.c1(x))))
        return self.fc(self.drop(x.mean((2, 3))))


X = torch.randn(2, 3, 8, 8)


def _off_equals_float(model, qmodel, *inputs):
    model.eval()
    qmodel.eval()
    qnn.set_quant_enabled(qmodel, False)
    with torch.no_grad():
        torch.testing.assert_close(qmodel(*inputs), model(*inputs))
    qnn.set_quant_enabled(qmodel, True)


def test_data_dependent_control_flow_and_functional_fallback():
    torch.manual_seed(0)
    model = Branchy()
    qmodel, rep = convert(model, QuantConfig(), example_inputs=(X,), strict=True)
    by = {v.name: v for v in rep.vertices}
    assert isinstance(qmodel.a, qnn.QConv2d) and isinstance(qmodel.b, qnn.QConv2d)  # b never ran: still swapped
    assert by["fw"].kind == "functional" and by["fw"].quantized and by["fw"].op_type == "conv2d"
    assert by["fw"].act_elements == 8 * 8 * 8 and by["fw"].macs == 8 * 8 * 8 * 8 * 9
    # the functional call really goes through its quantizers: theta gets a gradient
    qmodel.train()
    qmodel(X).sum().backward()
    fq = qmodel._qag_functional["fw"]
    assert fq.weight_quant.theta.grad is not None and fq.weight_quant.theta.grad.abs().sum() > 0
    _off_equals_float(model, qmodel, X)


def test_untraceable_functional_calls_without_examples_are_reported():
    with pytest.warns(RuntimeWarning, match="not looked for"):
        qmodel, rep = convert(Branchy(), QuantConfig())
    assert any("not looked for" in n for n in rep.notes)
    assert "fw" not in {v.name for v in rep.vertices}


def test_traceable_functional_calls_found_by_fx_without_examples():
    torch.manual_seed(0)
    model = Traceable()
    qmodel, rep = convert(model, QuantConfig(exclude_first_last=False))
    by = {v.name: v for v in rep.vertices}
    assert by["w1"].kind == "functional" and by["w1"].quantized and by["w2"].op_type == "linear"
    qmodel.train()
    qmodel(X).sum().backward()
    for k in ("w1", "w2"):
        assert qmodel._qag_functional[k].weight_quant.theta.grad.abs().sum() > 0
    _off_equals_float(model, qmodel, X)


def test_weight_sharing_one_vertex_one_set_of_quantizers():
    torch.manual_seed(0)
    model = Shared()
    qmodel, rep = convert(model, QuantConfig(), example_inputs=(X,))
    assert qmodel.block is qmodel.again and isinstance(qmodel.block, qnn.QConv2d)
    assert [v.name for v in rep.vertices].count("block") == 1
    assert "again" not in [v.name for v in rep.vertices]
    _off_equals_float(model, qmodel, X)


def test_lstm_left_float_and_reported():
    model = WithLSTM()
    x = torch.randn(2, 4, 10)
    qmodel, rep = convert(model, QuantConfig(exclude_first_last=False), example_inputs=(x,), strict=True)
    assert isinstance(qmodel.lstm, nn.LSTM)
    assert [u["name"] for u in rep.unsupported] == ["lstm"] and "float" in rep.unsupported[0]["reason"]
    assert isinstance(qmodel.conv1, qnn.QConv1d) and isinstance(qmodel.head, qnn.QLinear)
    assert "lstm" in rep.to_markdown()


def test_first_last_exclusion_follow_execution_order():
    class Reordered(nn.Module):  # defined head-first, executed stem-first
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 4)
            self.mid = nn.Conv2d(8, 8, 3, padding=1)
            self.stem = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return self.head(self.mid(self.stem(x)).mean((2, 3)))

    _, rep = convert(Reordered(), QuantConfig(), example_inputs=(X,))
    by = {v.name: v for v in rep.vertices}
    assert "first" in by["stem"].reason and "last" in by["head"].reason and by["mid"].quantized
    assert [v.name for v in rep.vertices] == ["stem", "mid", "head"]


def test_overrides_regex_later_wins_and_fixed_mode():
    cfg = QuantConfig(mode="fixed", weight_schemes=["pot"], act_schemes=["clip"], exclude_first_last=False,
                      overrides=[LayerOverride(r"c.", weight_bits=4), LayerOverride("c2", weight_schemes=["zoom"]),
                                 LayerOverride("fc", exclude=True)])
    qmodel, rep = convert(BNDrop(), cfg, example_inputs=(X,))
    assert qmodel.c1.weight_quant.scheme == "pot" and qmodel.c1.weight_quant.int_bits() == 4
    assert qmodel.c2.weight_quant.scheme == "zoom" and qmodel.c2.weight_quant.int_bits() == 3  # later wins
    assert isinstance(qmodel.fc, nn.Linear) and not isinstance(qmodel.fc, qnn.QLinear)
    assert {v.name: v for v in rep.vertices}["fc"].reason.startswith("excluded: override")
    assert rep.coverage == 1.0


def test_strict_raises_on_unquantized_vertex():
    class UnsupportedMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(8, 8)
            self.att = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x, kv):
            return self.head(self.att(self.stem(x), kv, kv)[0])

    m = UnsupportedMHA()
    args = (torch.randn(2, 3, 8), torch.randn(2, 5, 4))
    _, rep = convert(m, QuantConfig(), example_inputs=args)
    assert not {v.name: v for v in rep.vertices}["att.in_proj"].quantized
    with pytest.raises(QAGError, match="att.in_proj"):
        convert(m, QuantConfig(), example_inputs=args, strict=True)


def test_convert_is_idempotent_and_not_inplace_by_default():
    model = BNDrop()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q1, r1 = convert(model, QuantConfig(), example_inputs=(X,))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, qnn.QuantLayerMixin) for m in model.modules())
    q2, r2 = convert(q1, QuantConfig(), example_inputs=(X,))
    assert list(q2.state_dict()) == list(q1.state_dict())
    assert [type(m) for m in q2.modules()] == [type(m) for m in q1.modules()]
    assert [(v.name, v.quantized) for v in r2.vertices] == [(v.name, v.quantized) for v in r1.vertices]


def test_batchnorm_dropout_behave_as_before():
    torch.manual_seed(0)
    model = BNDrop()
    qmodel, _ = convert(model, QuantConfig(), example_inputs=(X,))
    qnn.set_quant_enabled(qmodel, False)
    model.train()
    qmodel.train()
    torch.manual_seed(5)
    a = model(X)
    torch.manual_seed(5)
    b = qmodel(X)  # same dropout mask, same batch statistics
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(qmodel.bn.running_mean, model.bn.running_mean)
    _off_equals_float(model, qmodel, X)


def test_compiled_converted_model_runs():
    torch.manual_seed(0)
    qmodel, _ = convert(Branchy(), QuantConfig(), example_inputs=(X,))
    qmodel.train()
    cm = torch.compile(qmodel, backend="aot_eager")
    y = cm(X)
    y.sum().backward()
    assert torch.isfinite(y).all()
    qmodel.eval()
    with torch.no_grad():
        torch.testing.assert_close(cm(X), qmodel(X))


def test_report_serialises():
    import json

    _, rep = convert(Branchy(), QuantConfig(), example_inputs=(X,))
    d = json.loads(rep.to_json())
    assert d["coverage"] == rep.coverage and len(d["vertices"]) == len(rep.vertices)
    md = rep.to_markdown()
    assert "| vertex |" in md and "fw" in md
