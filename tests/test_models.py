"""Model families: sizes against the published numbers and an independent analytic count, forward/backward,
train/eval, freezing, feature outputs, checkpoints, the published-checkpoint mapping, validation, kernels."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from workloads.models import (
    build_model,
    count_flops,
    count_params,
    list_models,
    load_checkpoint,
    load_published_rednet,
    save_checkpoint,
    validate_model_config,
    visualize_kernels,
)

BLOCKS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
WIDTHS = (64, 128, 256, 512)
# name: (params M, tolerance M, GFLOPs or None); GFLOPs within 5%.
PUBLISHED = {
    "rednet26": (9.23, 0.02, 1.73),
    "rednet38": (12.39, 0.02, 2.22),
    "rednet50": (15.54, 0.02, 2.71),
    "rednet101": (25.65, 0.02, 4.74),
    "rednet152": (33.99, 0.02, 6.79),
    "cednet50": (16.3, 0.1, None),
    "resnet50": (25.557032, 0.0, 4.1),  # torchvision resnet50, to the parameter
}


def meta_model(name, **kw):
    with torch.device("meta"):
        return build_model(name, **kw)


# ------------------------------------------------------------------------------------------------------------
# Independent analytic sizes, written from the architecture description (not from our modules).
def _out(h, k, s, p):
    return (h + 2 * p - k) // s + 1


def _op(family, c, k, stride, h, w, gc=16, r=4, cg=16):
    """(params, MACs, out h, out w) of one spatial operator on an h x w input."""
    if family == "resnet":
        ho, wo = _out(h, k, stride, k // 2), _out(w, k, stride, k // 2)
        return c * c * k * k, c * c * k * k * ho * wo, ho, wo
    g, hid = c // gc, c // r
    ho, wo = -(-h // stride), -(-w // stride)  # the pooled kernel map and the output: ceil(h / stride)
    params = c * hid + 2 * hid + hid * k * k * g + k * k * g
    macs = (c * hid + hid * k * k * g) * ho * wo + k * k * c * ho * wo
    if family == "cednet":
        params += c * (c // cg) * 9  # the 3x3 channel conv (padding 1) and the gate multiply, on the input
        macs += c * (c // cg) * 9 * h * w + c * h * w
    return params, macs, ho, wo


def analytic_size(name, h=224, w=224, num_classes=1000, in_ch=3):
    family, depth = name[:6], int(name[6:])
    k = 3 if family == "resnet" else 7
    sk = {"rednet": 3, "cednet": 7, "resnet": 7}[family]
    params = macs = 0
    if family == "resnet":
        h, w = _out(h, sk, 2, sk // 2), _out(w, sk, 2, sk // 2)
        params += in_ch * 64 * sk * sk + 2 * 64
        macs += in_ch * 64 * sk * sk * h * w
    else:
        h, w = _out(h, 3, 2, 1), _out(w, 3, 2, 1)
        params += in_ch * 32 * 9 + 64
        macs += in_ch * 32 * 9 * h * w
        p, m, h, w = _op(family, 32, sk, 1, h, w)
        params, macs = params + p + 64, macs + m
        params += 32 * 64 * 9 + 128
        macs += 32 * 64 * 9 * h * w
    h, w = _out(h, 3, 2, 1), _out(w, 3, 2, 1)  # max-pool
    cin = 64
    for s, (n, width) in enumerate(zip(BLOCKS[depth], WIDTHS)):
        for b in range(n):
            stride = 2 if (b == 0 and s > 0) else 1
            cout = 4 * width
            params += cin * width + 2 * width
            macs += cin * width * h * w
            p, m, ho, wo = _op(family, width, k, stride, h, w)
            params, macs = params + p + 2 * width, macs + m
            params += width * cout + 2 * cout
            macs += width * cout * ho * wo
            if stride != 1 or cin != cout:
                params += cin * cout + 2 * cout
                macs += cin * cout * ho * wo
            cin, h, w = cout, ho, wo
    params += cin * num_classes + num_classes
    macs += cin * num_classes
    return params, macs


# ------------------------------------------------------------------------------------------------------------
def test_list_models_has_all_fifteen():
    names = list_models()
    assert len(names) == 15 and len(set(names)) == 15
    for fam in ("rednet", "cednet", "resnet"):
        for d in (26, 38, 50, 101, 152):
            assert f"{fam}{d}" in names


@pytest.mark.parametrize("name", list_models())
def test_sizes_of_all_fifteen_models(name):
    model = meta_model(name)
    params, macs = count_params(model), count_flops(model)
    exp_params, exp_macs = analytic_size(name)
    assert params == exp_params
    assert macs == exp_macs
    if name in PUBLISHED:
        p_m, tol, gflops = PUBLISHED[name]
        assert abs(params / 1e6 - p_m) <= tol + 1e-9, (name, params)
        if gflops is not None:
            assert abs(macs / 1e9 - gflops) / gflops <= 0.05, (name, macs)


@pytest.mark.parametrize("name", ["rednet26", "cednet50", "resnet38"])
def test_flops_follow_odd_input_sizes(name):
    model = meta_model(name, num_classes=10, in_channels=1)
    for hw in ((97, 113), (33, 65), (224, 161)):
        assert count_flops(model, (1, 1) + hw) == analytic_size(name, *hw, num_classes=10, in_ch=1)[1], hw
    assert count_flops(model, (3, 1, 97, 113)) == 3 * count_flops(model, (1, 1, 97, 113))


def test_resnet50_is_torchvision_resnet50():
    import torchvision

    with torch.device("meta"):
        tv = torchvision.models.resnet50()
    ours = meta_model("resnet50")
    assert count_params(ours) == count_params(tv) == 25_557_032
    assert count_flops(ours) == count_flops(tv)
    assert 4.05e9 < count_flops(ours) < 4.15e9


# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rednet26():
    torch.manual_seed(0)
    return build_model("rednet26", zero_init_residual=False)


def test_forward_224_and_eval_is_deterministic(rednet26):
    # Counting on a real (non-meta) model: same numbers, weights and mode untouched.
    rednet26.train()
    w = rednet26.layer1[0].conv2
    before = {k: v.clone() for k, v in rednet26.state_dict().items() if "layer1.0" in k}
    assert count_flops(rednet26) == count_flops(meta_model("rednet26"))
    assert rednet26.training and w.training
    assert all(torch.equal(v, rednet26.state_dict()[k]) for k, v in before.items())
    rednet26.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        y1, y2 = rednet26(x), rednet26(x)
    assert y1.shape == (1, 1000) and torch.isfinite(y1).all()
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("name", ["cednet26", "resnet26"])
def test_features_at_odd_size_have_the_right_strides_and_channels(name):
    model = build_model(name, out_indices=(0, 1, 2, 3)).eval()
    assert model.out_channels == (256, 512, 1024, 2048) and model.out_strides == (4, 8, 16, 32)
    assert getattr(model, "fc", None) is None
    x = torch.randn(1, 3, 97, 113)
    with torch.no_grad():
        feats = model(x)
    assert isinstance(feats, tuple) and len(feats) == 4
    for f, c, s in zip(feats, model.out_channels, model.out_strides):
        assert f.shape == (1, c, math.ceil(97 / s), math.ceil(113 / s))
    sub = build_model(name, out_indices=[1, 3]).eval()
    with torch.no_grad():
        f1, f3 = sub(x)
    assert sub.out_channels == (512, 2048) and f1.shape[1:] == (512, 13, 15) and f3.shape[1:] == (2048, 4, 4)


def test_num_classes_zero_returns_pooled_features():
    model = build_model("resnet26", num_classes=0).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2048)


def test_backward_reaches_every_parameter(rednet26):
    rednet26.train()
    x = torch.randn(2, 3, 64, 72)
    loss = nn.functional.cross_entropy(rednet26(x), torch.tensor([1, 2]))
    rednet26.zero_grad()
    loss.backward()
    for n, p in rednet26.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    # The kernel generator of an operator learns.
    op = rednet26.layer2[0].conv2
    assert any(p.grad.abs().sum() > 0 for p in op.parameters())
    rednet26.zero_grad()


def test_train_updates_bn_stats_and_drop_path_is_random_only_in_training():
    torch.manual_seed(0)
    model = build_model("rednet26", drop_path_rate=0.5, zero_init_residual=False, num_classes=4)
    x = torch.randn(2, 3, 48, 48)
    bn = model.layer1[0].bn1
    before = bn.running_mean.clone()
    model.train()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.equal(bn.running_mean, before)
    assert not torch.allclose(a, b)  # different residual branches dropped
    model.eval()
    frozen_stats = bn.running_mean.clone()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert torch.equal(c, d) and torch.equal(bn.running_mean, frozen_stats)
    # Rates grow linearly from 0 (first block) to drop_path_rate (last block).
    assert isinstance(model.layer1[0].drop_path, nn.Identity)
    assert model.layer4[-1].drop_path.p == pytest.approx(0.5)


def test_zero_init_residual_and_kaiming_init():
    model = meta_model("rednet26")
    real = build_model("resnet26")
    for layer in (real.layer1, real.layer4):
        assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for b in layer)
    assert float(real.layer1[0].bn1.weight.detach().min()) == 1.0
    w = real.layer3[0].conv1.weight.detach()  # kaiming normal, fan_out = 256 * 1 * 1
    assert abs(float(w.std()) - math.sqrt(2 / 256)) < 0.01
    assert build_model("resnet26", zero_init_residual=False).layer1[0].bn3.weight.min() == 1.0
    assert model.cfg.zero_init_residual


def test_frozen_stages_and_norm_eval():
    model = build_model("rednet26", frozen_stages=1, num_classes=4)
    model.train()
    for n, p in model.named_parameters():
        frozen = n.startswith(("stem.", "layer1."))
        assert p.requires_grad is not frozen, n
    for n, m in model.named_modules():
        if n.startswith(("stem", "layer1")):
            assert not m.training, n
        elif n.startswith("layer2"):
            assert m.training, n
    assert count_params(model, trainable_only=True) < count_params(model)
    # Frozen BN statistics do not move in training mode.
    rm = model.stem[0].bn.running_mean.clone()
    model(torch.randn(2, 3, 40, 40)).sum().backward()
    assert torch.equal(model.stem[0].bn.running_mean, rm)
    assert model.layer1[0].conv1.weight.grad is None and model.layer2[0].conv1.weight.grad is not None

    stem_only = build_model("resnet26", frozen_stages=0).train()
    assert not any(p.requires_grad for p in stem_only.stem.parameters())
    assert all(p.requires_grad for p in stem_only.layer1.parameters())

    ne = build_model("cednet26", norm_eval=True, out_indices=(3,)).train()
    bns = [m for m in ne.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert ne.layer2[0].conv1.training


# ------------------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    model = build_model("cednet26", num_classes=7, kernel_size=5, out_indices=None).eval()
    path = save_checkpoint(tmp_path / "sub" / "m.pt", model, extra={"epoch": 3, "metrics": {"top1": 0.5}})
    raw = torch.load(path, weights_only=True)
    assert raw["arch_name"] == "cednet26" and raw["arch_overrides"]["kernel_size"] == 5
    loaded, extra = load_checkpoint(path)
    assert extra == {"epoch": 3, "metrics": {"top1": 0.5}}
    assert loaded.arch_name == "cednet26" and loaded.arch_overrides == model.arch_overrides
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    x = torch.randn(1, 3, 48, 48)
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    with pytest.raises(ValueError, match="extra"):
        save_checkpoint(tmp_path / "bad.pt", model, extra={"obj": object()})
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a cvolution-lab model checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    for map_location in (None, torch.device("cpu"), {"cpu": "cpu"}, lambda storage, loc: storage):  # all kinds
        again, _ = load_checkpoint(path, map_location=map_location)
        assert all(torch.equal(again.state_dict()[k], v) for k, v in sd_a.items())
    payload = torch.load(path, weights_only=True)
    payload["extra"] = None
    del payload["state_dict"]["fc.bias"]
    torch.save(payload, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "fc\.bias"'):  # strict loading
        load_checkpoint(tmp_path / "partial.pt")
    payload["state_dict"]["fc.bias"] = sd_a["fc.bias"]
    torch.save(payload, tmp_path / "no_extra.pt")
    assert load_checkpoint(tmp_path / "no_extra.pt")[1] == {}
    with pytest.raises(ValueError, match="build_model"):
        save_checkpoint(tmp_path / "x.pt", nn.Linear(2, 2))


def published_rednet_state_dict(depth, num_classes=1000, seed=0):
    """A state dict with the published mmcls RedNet layout, from its naming rules.

    mmcls RedNet: `backbone.stem` = [ConvModule(3->32, 3x3 s2), involution(32, k=3), BN(32), ReLU,
    ConvModule(32->64, 3x3)]; bottlenecks `conv1`/`bn1`, `conv2` = involution(width, 7, stride), `bn2`,
    `conv3`/`bn3`, `downsample.0` (1x1 conv) / `downsample.1` (BN); involution = `conv1` ConvModule (1x1 conv
    without bias + `bn`) and `conv2` ConvModule (1x1 conv with bias, K*K*groups outputs, no norm);
    classifier `head.fc`. BNs carry weight, bias, running_mean, running_var, num_batches_tracked.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def t(*shape):
        return torch.randn(*shape, generator=g)

    def bn(prefix, c):
        sd.update({f"{prefix}.weight": t(c), f"{prefix}.bias": t(c), f"{prefix}.running_mean": t(c),
                   f"{prefix}.running_var": t(c).abs() + 0.5,
                   f"{prefix}.num_batches_tracked": torch.tensor(5)})

    def involution(prefix, c, k):
        sd[f"{prefix}.conv1.conv.weight"] = t(c // 4, c, 1, 1)
        bn(f"{prefix}.conv1.bn", c // 4)
        sd[f"{prefix}.conv2.conv.weight"] = t(k * k * (c // 16), c // 4, 1, 1)
        sd[f"{prefix}.conv2.conv.bias"] = t(k * k * (c // 16))

    sd["backbone.stem.0.conv.weight"] = t(32, 3, 3, 3)
    bn("backbone.stem.0.bn", 32)
    involution("backbone.stem.1", 32, 3)
    bn("backbone.stem.2", 32)
    sd["backbone.stem.4.conv.weight"] = t(64, 32, 3, 3)
    bn("backbone.stem.4.bn", 64)
    cin = 64
    for s, (n, w) in enumerate(zip(BLOCKS[depth], WIDTHS)):
        for b in range(n):
            p = f"backbone.layer{s + 1}.{b}"
            sd[f"{p}.conv1.weight"] = t(w, cin, 1, 1)
            bn(f"{p}.bn1", w)
            involution(f"{p}.conv2", w, 7)
            bn(f"{p}.bn2", w)
            sd[f"{p}.conv3.weight"] = t(4 * w, w, 1, 1)
            bn(f"{p}.bn3", 4 * w)
            if b == 0:
                sd[f"{p}.downsample.0.weight"] = t(4 * w, cin, 1, 1)
                bn(f"{p}.downsample.1", 4 * w)
            cin = 4 * w
    sd["head.fc.weight"] = t(num_classes, 2048)
    sd["head.fc.bias"] = t(num_classes)
    return {"meta": {"mmcls_version": "0.12.0"}, "state_dict": sd}


def _operator_parts(op):
    """(kernel-reducing conv, its BN, kernel-spanning conv) of an operator, found by role, not by name."""
    convs = [m for m in op.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    reduce = next(m for m in convs if m.in_channels == op.channels)
    span = next(m for m in convs if m.out_channels == op.kernel_size ** 2 * op.groups)
    bn = next(m for m in op.modules() if isinstance(m, nn.BatchNorm2d))
    return reduce, bn, span


def test_published_rednet_checkpoint_maps_onto_our_model(tmp_path):
    ckpt = published_rednet_state_dict(26)
    sd = ckpt["state_dict"]
    model = build_model("rednet26")
    result = load_published_rednet(model, ckpt)
    assert result == {"missing": [], "unexpected": []}
    assert torch.equal(model.fc.weight, sd["head.fc.weight"])
    assert torch.equal(model.stem[0].conv.weight, sd["backbone.stem.0.conv.weight"])
    assert torch.equal(model.stem[2].running_var, sd["backbone.stem.2.running_var"])
    assert torch.equal(model.layer2[0].downsample[1].bias, sd["backbone.layer2.0.downsample.1.bias"])
    for path, op in (("backbone.stem.1", model.stem[1]), ("backbone.layer3.2.conv2", model.layer3[2].conv2)):
        reduce, bn, span = _operator_parts(op)
        assert torch.equal(reduce.weight, sd[f"{path}.conv1.conv.weight"])
        assert torch.equal(bn.running_mean, sd[f"{path}.conv1.bn.running_mean"])
        assert torch.equal(span.weight, sd[f"{path}.conv2.conv.weight"])
        assert torch.equal(span.bias, sd[f"{path}.conv2.conv.bias"])

    # From a file, into a features-only backbone: the classifier keys are skipped.
    torch.save(ckpt, tmp_path / "rednet26.pth")
    backbone = build_model("rednet26", out_indices=(0, 1, 2, 3))
    assert load_published_rednet(backbone, tmp_path / "rednet26.pth")["unexpected"] == []
    assert torch.equal(backbone.layer4[0].conv3.weight, sd["backbone.layer4.0.conv3.weight"])


def test_published_rednet_reports_missing_and_unexpected_keys():
    sd = dict(published_rednet_state_dict(26)["state_dict"])
    del sd["backbone.layer2.0.bn1.weight"]
    sd["backbone.layer2.0.extra_conv.weight"] = torch.zeros(3)
    model = build_model("rednet26")
    with pytest.raises(ValueError) as err:
        load_published_rednet(model, sd)
    msg = str(err.value)
    assert "missing keys (1): layer2.0.bn1.weight" in msg
    assert "unexpected keys (1): backbone.layer2.0.extra_conv.weight" in msg
    res = load_published_rednet(model, sd, strict=False)
    assert res["missing"] == ["layer2.0.bn1.weight"]
    # Wrong depth / classes: shape mismatches and missing blocks are reported.
    with pytest.raises(ValueError, match="shape mismatches"):
        load_published_rednet(build_model("rednet26", num_classes=10), published_rednet_state_dict(26))
    with pytest.raises(ValueError, match="unexpected keys"):
        load_published_rednet(model, published_rednet_state_dict(38))


def test_published_key_mapping_rules():
    """mmcls key -> our key: `head.fc.` -> `fc.`, `backbone.` stripped, operator suffixes through the operator's
    own map (identity for a suffix it does not list), and None for keys outside backbone and head."""
    from workloads.models.checkpoint import _published_to_ours

    maps = {"stem.1": {"conv1.conv.weight": "reduce.weight"}, "layer12.3.conv2": {"conv2.conv.bias": "span.bias"}}
    assert {key: _published_to_ours(key, maps) for key in [
        "head.fc.weight", "head.other.weight", "data_preprocessor.mean", "xbackbone.stem.0.weight",
        "backbone.stem.1.conv1.conv.weight", "backbone.stem.1.conv1.bn.weight",
        "backbone.layer12.3.conv2.conv2.conv.bias", "backbone.layer1.0.conv2.conv2.conv.bias",
        "backbone.layer12.3.conv2", "backbone.layer12.3.conv1.conv2.conv.bias",
    ]} == {
        "head.fc.weight": "fc.weight", "head.other.weight": None, "data_preprocessor.mean": None,
        "xbackbone.stem.0.weight": None,
        "backbone.stem.1.conv1.conv.weight": "stem.1.reduce.weight",
        "backbone.stem.1.conv1.bn.weight": "stem.1.conv1.bn.weight",
        "backbone.layer12.3.conv2.conv2.conv.bias": "layer12.3.conv2.span.bias",
        "backbone.layer1.0.conv2.conv2.conv.bias": "layer1.0.conv2.conv2.conv.bias",  # no map for this layer
        "backbone.layer12.3.conv2": "layer12.3.conv2",
        "backbone.layer12.3.conv1.conv2.conv.bias": "layer12.3.conv1.conv2.conv.bias",
    }


def test_published_rednet_errors_are_exact_and_non_strict_loads_what_fits():
    ckpt = published_rednet_state_dict(26)
    model = build_model("rednet26", num_classes=10)
    fc_before = model.fc.weight.clone()
    with pytest.raises(ValueError) as err:
        load_published_rednet(model, ckpt)
    assert str(err.value) == ("published checkpoint does not fit rednet26: shape mismatches (2): fc.weight: "
                              "checkpoint (1000, 2048) vs model (10, 2048); fc.bias: checkpoint (1000,) vs model (10,)")
    assert load_published_rednet(model, ckpt, strict=False) == {"missing": [], "unexpected": []}
    assert torch.equal(model.fc.weight, fc_before)  # the mismatched head is skipped, the rest loaded
    assert torch.equal(model.layer1[0].conv1.weight, ckpt["state_dict"]["backbone.layer1.0.conv1.weight"])
    sd = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith("num_batches_tracked")}
    del sd["backbone.stem.0.bn.bias"], sd["head.fc.bias"]
    sd["data_preprocessor.mean"] = sd["data_preprocessor.std"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        load_published_rednet(build_model("rednet26"), sd)  # BN counters are optional
    assert str(err.value) == ("published checkpoint does not fit rednet26: missing keys (2): stem.0.bn.bias, "
                              "fc.bias | unexpected keys (2): data_preprocessor.mean, data_preprocessor.std")
    with pytest.raises(ValueError, match="^expected a state dict or a checkpoint path, got int$"):
        load_published_rednet(model, 3)


def test_published_rednet_skips_head_keys_wherever_they_stand_for_a_model_without_operators_or_head():
    """A registry-like model with no involution layers (no `operator_names`) and no classifier attribute: head
    keys are skipped even before the backbone's in the file, and the backbone keys that fit are loaded."""
    weight = published_rednet_state_dict(26)["state_dict"]["backbone.stem.0.conv.weight"]

    class StemOnly(nn.Module):
        arch_name = "stem-only"

        def __init__(self):
            super().__init__()
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2], bias=False)
            self.stem = nn.ModuleDict({"0": nn.ModuleDict({"conv": conv})})

    model = StemOnly()
    head_first = {"head.fc.weight": torch.zeros(2, 2), "backbone.stem.0.conv.weight": weight}
    assert load_published_rednet(model, head_first) == {"missing": [], "unexpected": []}
    assert torch.equal(model.stem["0"]["conv"].weight, weight)


def test_only_registry_models_are_saved(tmp_path):
    with pytest.raises(ValueError, match=r"^model was not built by workloads\.models\.build_model "
                                         r"\(no arch_name attribute\)$"):
        save_checkpoint(tmp_path / "linear.pt", nn.Linear(2, 2))
    assert not list(tmp_path.iterdir())


def test_checkpoint_extra_and_meta_weights_are_refused_by_name(tmp_path):
    model = build_model("resnet26", num_classes=2)
    for extra, message in [
        ({"a": [1, (2, {"b": object()})]}, "checkpoint extra: extra['a'][1][1]['b'] is a object; only "
         "dict/list/tuple/str/int/float/bool/None/tensor values can be loaded with weights_only=True"),
        ({"a": {(1, 2): 3}}, "checkpoint extra: key (1, 2) in extra['a'] must be a str or int"),
    ]:
        with pytest.raises(ValueError) as err:
            save_checkpoint(tmp_path / "bad.pt", model, extra=extra)
        assert str(err.value) == message
    ok = {"n": None, "b": True, 1: 2.5, "t": torch.ones(2), "l": [("x", 1)]}
    _, extra = load_checkpoint(save_checkpoint(tmp_path / "ok.pt", model, extra=ok))
    assert extra.keys() == ok.keys() and extra["l"] == [("x", 1)] and extra["n"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.pt"]  # no .tmp left behind
    assert torch.load(save_checkpoint(tmp_path / "ok.pt", model), weights_only=True)["extra"] == {}
    overrides, model.arch_overrides = model.arch_overrides, {"num_classes": 2, "act": nn.ReLU}
    with pytest.raises(ValueError, match=r"^checkpoint extra: arch_overrides\['act'\] is a type; "):
        save_checkpoint(tmp_path / "bad.pt", model)
    model.arch_overrides = overrides
    with pytest.raises(ValueError, match=r"^cannot save a model whose weights are on the meta device \(no data\)$"):
        save_checkpoint(tmp_path / "meta.pt", model.to("meta"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path / "list.pt")
    assert str(err.value) == f"{tmp_path / 'list.pt'}: not a cvolution-lab model checkpoint (expected format " \
                             "'cvlab-model/1')"


# ------------------------------------------------------------------------------------------------------------
def test_bad_names_and_overrides():
    with pytest.raises(ValueError, match="unknown model 'rednet27'.*rednet26.*resnet152"):
        build_model("rednet27")
    with pytest.raises(ValueError, match="did you mean 'kernel_size'"):
        validate_model_config("rednet50", kernal_size=5)
    with pytest.raises(ValueError, match="valid overrides: .*kernel_size"):
        validate_model_config("resnet50", group_channels=8)
    with pytest.raises(ValueError, match=r"group_channels=24 .*'stem\.1' \(32 channels.*1, 2, 4, 8, 16, 32"):
        build_model("rednet50", group_channels=24)
    with pytest.raises(ValueError, match=r"channel_groups=64 .*'stem\.1'"):
        validate_model_config("cednet26", channel_groups=64)
    with pytest.raises(ValueError, match=r"reduction_ratio=64 .*'stem\.1'.*1\.\.32"):
        validate_model_config("rednet26", reduction_ratio=64)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        validate_model_config("cednet26", kernel_size=4)
    with pytest.raises(ValueError, match="out_indices"):
        validate_model_config("rednet26", out_indices=[3, 1])
    with pytest.raises(ValueError, match="frozen_stages"):
        validate_model_config("rednet26", frozen_stages=5)
    with pytest.raises(ValueError, match="drop_path_rate"):
        validate_model_config("rednet26", drop_path_rate=1.5)
    with pytest.raises(ValueError, match="must be an integer"):
        validate_model_config("rednet26", group_channels=8.5)
    cfg = validate_model_config("cednet101", group_channels=8, reduction_ratio=2, out_indices=[0, 3])
    assert cfg["group_channels"] == 8 and cfg["out_indices"] == (0, 3) and cfg["channel_groups"] == 16


def test_validation_agrees_with_the_operators():
    """validate_model_config accepts exactly what the real layers accept (built on the meta device)."""
    for gc in (3, 16, 24, 64):
        for rr in (3, 32, 33):
            for cg in (12, 32):
                kw = {"group_channels": gc, "reduction_ratio": rr, "channel_groups": cg}
                try:
                    validate_model_config("cednet26", **kw)
                    ok = True
                except ValueError:
                    ok = False
                if ok:
                    meta_model("cednet26", **kw)
                else:
                    with pytest.raises((ValueError, TypeError)):
                        meta_model("cednet26", **kw)


# ------------------------------------------------------------------------------------------------------------
def test_visualize_kernels_writes_a_png(tmp_path, rednet26):
    from PIL import Image

    img = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    path = visualize_kernels(rednet26, img, out_png=tmp_path / "k.png")
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        assert np.asarray(im.convert("L")).std() > 0  # not a blank canvas
    path2 = visualize_kernels(rednet26, torch.randn(1, 3, 48, 48), layer="stem.1", out_png=tmp_path / "s.png",
                              max_groups=2, grid=3)
    assert (tmp_path / "s.png").stat().st_size > 0 and path2.endswith("s.png")
    with pytest.raises(ValueError, match=r"valid layers: stem\.1, layer1\.0\.conv2"):
        visualize_kernels(rednet26, img, layer="layer9.0.conv2", out_png=tmp_path / "x.png")
    with pytest.raises(ValueError, match="no involution"):
        visualize_kernels(meta_model("resnet26"), img, out_png=tmp_path / "y.png")
