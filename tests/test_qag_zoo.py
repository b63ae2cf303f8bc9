# SPDX-License-Identifier: MIT
"""QAG on real architectures nobody here wrote: torchvision 0.29 classification models built
without weights. A representative set runs every time; the rest is marked slow
(``python -m pytest -m slow tests/test_qag_zoo.py``)."""
import pytest
import torch

tv = pytest.importorskip("torchvision")

import autoqnn.nn as qnn  # noqa: E402
from autoqnn.config import QuantConfig  # noqa: E402
from autoqnn.qag import convert  # noqa: E402

M = tv.models


def _vit(m):
    # torchvision initialises the ViT head to zero: no gradient would reach anything before it
    torch.nn.init.normal_(m.heads.head.weight, std=0.02)
    return m


def _small_vit():
    return _vit(M.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64,
                                    mlp_dim=128))


# name -> (constructor, input size)
FAST = {
    "resnet18": (lambda: M.resnet18(), 32),
    "mobilenet_v3_small": (lambda: M.mobilenet_v3_small(), 32),
    "squeezenet1_0": (lambda: M.squeezenet1_0(), 32),
    "shufflenet_v2_x0_5": (lambda: M.shufflenet_v2_x0_5(), 32),
    "efficientnet_b0": (lambda: M.efficientnet_b0(), 32),
    "vit_small": (_small_vit, 32),
    "swin_t": (lambda: M.swin_t(), 32),
    "alexnet": (lambda: M.alexnet(), 64),
    "vgg11_bn": (lambda: M.vgg11_bn(), 32),
    "resnet50": (lambda: M.resnet50(), 32),
    "mobilenet_v2": (lambda: M.mobilenet_v2(), 32),
    "inception_v3": (lambda: M.inception_v3(aux_logits=False, init_weights=False), 75),
    "googlenet": (lambda: M.googlenet(aux_logits=False, init_weights=False), 32),
    "densenet121": (lambda: M.densenet121(), 32),
    "regnet_y_400mf": (lambda: M.regnet_y_400mf(), 32),
    "mnasnet0_5": (lambda: M.mnasnet0_5(), 32),
    "convnext_tiny": (lambda: M.convnext_tiny(), 32),
}
SLOW = {  # every model of the issue list runs by default except the full-size ViT
    "vit_b_16": (lambda: _vit(M.vit_b_16()), 224),
}
CASES = [pytest.param(n, *v, id=n) for n, v in FAST.items()] + [
    pytest.param(n, *v, id=n, marks=pytest.mark.slow) for n, v in SLOW.items()]

EXPENSIVE = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.Linear)


def _count_expensive(model):
    n = 0
    for m in model.modules():
        if isinstance(m, EXPENSIVE):
            n += 1
        if isinstance(m, torch.nn.MultiheadAttention):
            n += 1  # its packed input projection (out_proj is a Linear, counted above)
    return n


@pytest.mark.parametrize("name,ctor,size", CASES)
def test_torchvision_model(name, ctor, size):
    torch.manual_seed(0)
    model = ctor().eval()
    x = torch.randn(2, 3, size, size)
    qmodel, report = convert(model, QuantConfig(), example_inputs=(x,), strict=True)

    # every Conv/Linear is a vertex: quantized, or the configured first/last exclusion
    n = _count_expensive(model)
    assert len(report.vertices) == n
    excluded = [v for v in report.vertices if not v.quantized]
    assert len(excluded) == 2 and all("first" in v.reason or "last" in v.reason for v in excluded)
    assert report.coverage == 1.0
    assert all(v.weight_elements and v.params for v in report.vertices)
    assert sum(v.act_elements is not None for v in report.vertices) >= n - 2 * sum(
        isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())

    # quantizers off: exactly the float model (eval mode, untouched BN statistics)
    qmodel.eval()
    qnn.set_quant_enabled(qmodel, False)
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-5, atol=1e-5)
    qnn.set_quant_enabled(qmodel, True)

    # train mode with mixtures: forward + backward reach every quantizer's θ
    qmodel.train()
    y = qmodel(x)
    assert torch.isfinite(y).all()
    y.float().logsumexp(1).mean().backward()
    quants = [q for _, q in qnn.quantizers(qmodel)]
    assert len(quants) == 2 * (n - 2)
    for q in quants:
        assert q.theta.grad is not None and torch.isfinite(q.theta.grad).all()
    assert sum(bool(q.theta.grad.abs().sum() > 0) for q in quants) >= 0.9 * len(quants)

    # state_dict round-trips into a freshly converted copy of the same architecture
    qmodel.eval()
    with torch.no_grad():
        ref = qmodel(x)
    torch.manual_seed(1)
    fresh, _ = convert(ctor().eval(), QuantConfig(), example_inputs=(x,))
    fresh.load_state_dict(qmodel.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref)
