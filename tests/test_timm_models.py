"""RedNet / CedNet / ResNet baseline as timm models: registry, parameter counts, features, pretrained_cfg."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch

import workloads.models as wm
from workloads.models.timm_registry import PUBLISHED, TimmBottleneckNet, timm_model_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registered_names_and_timms_own_resnets_untouched():
    for family in ("rednet", "cednet"):
        assert timm.list_models(f"{family}*") == [f"{family}{d}" for d in (26, 38, 50, 101, 152)]
    assert timm.list_models("*_cvlab") == [f"resnet{d}_cvlab" for d in (26, 38, 50, 101, 152)]
    assert [timm_model_name(n) for n in wm.list_models()] == timm.list_models("rednet*") + timm.list_models(
        "cednet*") + timm.list_models("*_cvlab")
    with torch.device("meta"):
        assert type(timm.create_model("resnet50")).__module__ == "timm.models.resnet"  # timm's own, not ours


def test_importing_the_models_registers_them_with_timm():
    """`import workloads.models` imports its timm registry, as timm's own model modules register on import;
    without timm (a lent GPU machine's stack) the package still imports and builds models."""
    code = (
        "import workloads.models, timm\n"
        "assert timm.list_models('rednet*') == ['rednet26', 'rednet38', 'rednet50', 'rednet101', 'rednet152']\n"
        "m = timm.create_model('rednet26', num_classes=3, pretrained=False)\n"
        "print(type(m).__name__, m.arch_name, timm.models.get_pretrained_cfg('cednet50').architecture)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "TimmBottleneckNet rednet26 cednet50"
    no_timm = ("import sys; sys.modules['timm'] = None\n"  # `import timm` now raises ImportError
               "import workloads.models\n"
               "assert 'workloads.models.timm_registry' not in sys.modules\n"
               "print(workloads.models.build_model('rednet26').arch_name)\n")
    out = subprocess.run([sys.executable, "-c", no_timm], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "rednet26"


@pytest.mark.parametrize("name", wm.list_models())
def test_parameter_counts_equal_build_model(name):
    with torch.device("meta"):
        ours = wm.build_model(name, num_classes=10)
        theirs = timm.create_model(timm_model_name(name), num_classes=10)
    assert isinstance(theirs, TimmBottleneckNet)
    assert wm.count_params(theirs) == wm.count_params(ours)
    assert list(theirs.state_dict()) == list(ours.state_dict())
    assert theirs.num_classes == 10 and theirs.get_classifier().out_features == 10


def test_create_model_forward_and_overrides():
    torch.manual_seed(0)
    m = timm.create_model("rednet26", num_classes=10, kernel_size=5, drop_path_rate=0.1).eval()
    assert m.arch_name == "rednet26" and m.arch_overrides["kernel_size"] == 5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = m(x)
        assert logits.shape == (2, 10)
        features = m.forward_features(x)
        assert m.forward_head(features, pre_logits=True).shape == (2, 2048)
        torch.testing.assert_close(m.forward_head(features), logits)
        last, maps = m.forward_intermediates(x)
        torch.testing.assert_close(last, features)
        assert [t.shape[1] for t in maps] == [256, 512, 1024, 2048]
    m.reset_classifier(0)
    assert m.num_classes == 0 and m.arch_overrides["num_classes"] == 0
    with torch.device("meta"):
        gray = timm.create_model("rednet26", in_channels=1, num_classes=4)  # our name for timm's in_chans
    assert gray.stem[0].conv.in_channels == 1 and gray.in_chans == 1
    with pytest.raises(ValueError, match="in_chans=3 and in_channels=1"):
        timm.create_model("rednet26", in_chans=3, in_channels=1)
    with pytest.raises(ValueError, match="did you mean 'drop_path_rate'"):
        timm.create_model("rednet26", drop_rate=0.1)


@pytest.mark.parametrize("name", ["rednet26", "cednet26", "resnet26_cvlab"])
def test_features_only_stage_maps(name):
    with torch.device("meta"):  # shapes only: nothing allocated, nothing computed
        f = timm.create_model(name, features_only=True)
        maps = f(torch.empty(2, 3, 64, 64))
        assert f.feature_info.channels() == [256, 512, 1024, 2048]
        assert f.feature_info.reduction() == [4, 8, 16, 32]
        assert [tuple(o.shape) for o in maps] == [(2, 256, 16, 16), (2, 512, 8, 8), (2, 1024, 4, 4),
                                                  (2, 2048, 2, 2)]
        g = timm.create_model(name, features_only=True, out_indices=(1, 3))
        assert [tuple(o.shape) for o in g(torch.empty(1, 3, 64, 64))] == [(1, 512, 8, 8), (1, 2048, 2, 2)]
        assert timm.create_model(name, features_only=True, out_indices=(-1,)).feature_info.channels() == [2048]


def test_features_only_maps_equal_build_model_out_indices():
    """Index i is build_model's out_indices i: the same maps from the same weights."""
    torch.manual_seed(0)
    ref = wm.build_model("rednet26", out_indices=(1, 3)).eval()
    g = timm.create_model("rednet26", features_only=True, out_indices=(1, 3)).eval()
    g.model.load_state_dict(ref.state_dict())  # both pruned of the classifier
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(g(x), ref(x), strict=True):
            torch.testing.assert_close(a, b)


def test_features_only_prunes_unused_stages_and_keeps_freezing():
    with torch.device("meta"):
        full = timm.create_model("rednet26", features_only=True)
        early = timm.create_model("rednet26", features_only=True, out_indices=(0, 1))
        assert [o.shape[1] for o in early(torch.empty(1, 3, 64, 64))] == [256, 512]
        frozen = timm.create_model("cednet26", features_only=True, frozen_stages=1, norm_eval=True).train()
    assert isinstance(early.model.layer3, torch.nn.Identity) and early.model.fc is None
    assert wm.count_params(early) < wm.count_params(full)
    assert not frozen.model.stem.training and not frozen.model.layer1.training
    assert not any(p.requires_grad for p in frozen.model.layer1.parameters())
    assert not frozen.model.layer2[0].bn1.training  # norm_eval
    assert frozen.model.layer2.training


def test_pretrained_cfg_input_and_published_numbers():
    with torch.device("meta"):
        cfg = timm.create_model("rednet50", pretrained=False).pretrained_cfg
        cfg_cednet50 = timm.create_model("cednet50").pretrained_cfg
        cednet26 = timm.create_model("cednet26")
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bilinear"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["first_conv"] == "stem.0.conv" and cfg["classifier"] == "fc"
    assert cfg["paper_ids"] == "arXiv:2103.06255"
    assert "params (M) 15.54, GFLOPs 2.71, ImageNet-1k top-1 (%) 78.35" in cfg["notes"][0]
    assert "top-1 (%) 78.83" in cfg_cednet50["notes"][0]
    assert not any(n.startswith("published") for n in cednet26.pretrained_cfg["notes"])
    assert set(PUBLISHED) <= set(wm.list_models())
    data_cfg = timm.data.resolve_data_config({}, model=cednet26)
    assert data_cfg["input_size"] == (3, 224, 224) and data_cfg["crop_pct"] == 0.875
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("cednet26", pretrained=True)


def test_pretrained_from_a_cvlab_checkpoint(tmp_path):
    src = wm.build_model("resnet26", num_classes=1000)
    path = wm.save_checkpoint(tmp_path / "m.pt", src)
    same = timm.create_model("resnet26_cvlab", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for (k, a), b in zip(src.state_dict().items(), same.state_dict().values()):
        assert torch.equal(a, b), k
    tuned = timm.create_model("resnet26_cvlab", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=5)
    assert tuned.fc.out_features == 5
    assert torch.equal(tuned.layer4[0].conv1.weight, src.layer4[0].conv1.weight)
    reloaded, _ = wm.load_checkpoint(wm.save_checkpoint(tmp_path / "t.pt", tuned))
    assert reloaded.fc.out_features == 5
