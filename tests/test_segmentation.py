# ruff: noqa: C408  (mmseg configs are written as dict(...))
"""Segmentation workload: the synthetic Cityscapes set and the data check (each bad-data case), registration
in mmseg's and mmdet's registries (each plugin without the other library), config building for every config,
parameter counts against the published ones, the BN policy (CPUSyncBatchNorm against BN on the whole batch,
in two gloo processes), backbone checkpoints, per-class metrics, the overlay helpers, and the shared worker
on Ray Train: 2 CPU workers in one gloo group running the iteration-based Runner with a SyncBN config,
reporting to Ray Train and a sqlite MLflow (about 2 minutes); the slow test trains the quickstart config and
compares its val mIoU with a constant predictor's."""
from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("mmseg")
pytest.importorskip("mmcv.ops")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from workloads.segmentation import CLASSES, METRIC_NAMES  # noqa: E402
from workloads.segmentation.cityscapes import (  # noqa: E402
    LABEL_SUFFIX,
    LABELIDS_SUFFIX,
    VALID_VALUES,
    check_cityscapes_dataset,
    label_path,
    list_images,
)
from workloads.segmentation.synthetic import make_cityscapes  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = "quickstart/fpn_cednet26_cvo-fpn64_tiny.py"


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    make_cityscapes(root, num_train=6, num_val=3, size=(64, 128), seed=1)
    return root


def seg_section(data_root, **overrides):
    """An object with the attributes of the `segmentation:` spec section."""
    values = dict(config=QUICKSTART, data_root=str(data_root), generate=False, num_train_generated=6,
                  num_val_generated=3, generated_size=[64, 128], crop_size=None, batch_size=2, max_iters=40,
                  val_interval=20, overrides={}, pretrained=None, pretrained_format="cvlab",
                  num_data_workers=0, sync_bn="auto")
    values.update(overrides)
    return SimpleNamespace(**values)


def test_project_tests_are_not_shadowed_by_mmseg_tests_package():
    # mmseg's wheel installs a top-level `tests` package; ours are imported by file (no tests/__init__.py).
    assert Path(__file__).parent == ROOT / "tests" and not (ROOT / "tests" / "__init__.py").exists()
    assert Path(sys.modules[__name__].__file__).resolve() == Path(__file__).resolve()
    conftest = sys.modules.get("conftest")
    assert conftest is not None and Path(conftest.__file__).resolve().parent == ROOT / "tests"


# ---------------------------------------------------------------------------------------------------------
# Data


def test_make_cityscapes_writes_a_learnable_layout(cs_root, tmp_path):
    report = check_cityscapes_dataset(cs_root)
    assert report["train"] == {"images": 6, "cities": 2, "warnings": []}
    assert report["val"]["images"] == 3 and report["val"]["cities"] == 1
    train_cities = {p.parent.name for p in list_images(cs_root, "train")}
    assert not train_cities & {p.parent.name for p in list_images(cs_root, "val")}  # cities differ by split
    seen = set()
    for img in list_images(cs_root, "train"):
        assert img.name.endswith("_000019_leftImg8bit.png")
        lab = np.asarray(Image.open(label_path(cs_root, "train", img)))
        assert lab.dtype == np.uint8 and lab.shape == (64, 128)
        assert Image.open(img).size == (128, 64)
        seen |= set(np.unique(lab).tolist())
    assert seen <= VALID_VALUES and 255 in seen and len(seen - {255}) >= 8
    # The same seed writes the same files.
    make_cityscapes(tmp_path, num_train=6, num_val=3, size=(64, 128), seed=1)
    first = list_images(cs_root, "train")[0]
    again = tmp_path / first.relative_to(cs_root)
    assert again.read_bytes() == first.read_bytes()
    with pytest.raises(ValueError, match="num_train"):
        make_cityscapes(tmp_path, num_train=0)
    with pytest.raises(ValueError, match="at least 32x32"):
        make_cityscapes(tmp_path, size=(16, 64))


def test_check_names_every_bad_file_in_one_message(tmp_path):
    make_cityscapes(tmp_path, num_train=5, num_val=2, size=(32, 64), seed=2)
    imgs = list_images(tmp_path, "train")
    labels = [label_path(tmp_path, "train", i) for i in imgs]
    labels[0].unlink()                                                             # no label
    Image.new("L", (60, 32)).save(labels[1])                                       # other size
    Image.new("RGB", (64, 32)).save(labels[2])                                     # 3 channels
    Image.fromarray(np.full((32, 64), 33, np.uint8)).save(labels[3])               # a labelId, not a trainId
    list_images(tmp_path, "val")[0].write_bytes(b"not a png")                      # unreadable image
    with pytest.raises(ValueError) as err:
        check_cityscapes_dataset(tmp_path)
    msg = str(err.value)
    assert "train: images without their label" in msg and imgs[0].name in msg
    assert "size differs" in msg and labels[1].name in msg and "60x32 vs image 64x32" in msg
    assert "not one 8-bit channel" in msg and labels[2].name in msg and "mode RGB" in msg
    assert "outside 0..18 and 255" in msg and labels[3].name in msg and "[33]" in msg
    assert "val: unreadable files" in msg and list_images(tmp_path, "val")[0].name in msg
    assert imgs[4].name not in msg  # the good pair is not named


def test_check_refuses_labelids_and_says_how_to_make_trainids(tmp_path):
    make_cityscapes(tmp_path, num_train=2, num_val=1, size=(32, 64))
    for lab in (tmp_path / "gtFine" / "train").rglob(f"*{LABEL_SUFFIX}"):
        lab.rename(lab.with_name(lab.name.replace(LABEL_SUFFIX, LABELIDS_SUFFIX)))
    with pytest.raises(ValueError, match="csCreateTrainIdLabelImgs") as err:
        check_cityscapes_dataset(tmp_path)
    assert "labelIds.png but no *_gtFine_labelTrainIds.png" in str(err.value)


def test_check_empty_split_missing_root_and_orphans(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        check_cityscapes_dataset(tmp_path / "nowhere")
    make_cityscapes(tmp_path, num_train=2, num_val=1, size=(32, 64))
    for img in list_images(tmp_path, "val"):
        img.unlink()
    with pytest.raises(ValueError, match=r"val: empty splits \(1\): .*leftImg8bit/val holds no"):
        check_cityscapes_dataset(tmp_path)
    report = check_cityscapes_dataset(tmp_path, splits=("train",), max_value_checks=1)
    assert report["train"]["images"] == 2
    orphan = tmp_path / "gtFine" / "train" / "synthbourg" / f"synthbourg_999999_000019{LABEL_SUFFIX}"
    Image.new("L", (64, 32)).save(orphan)
    assert "without an image" in check_cityscapes_dataset(tmp_path, splits=("train",))["train"]["warnings"][0]


def test_check_accepts_exactly_the_train_ids_and_the_ignore_value(tmp_path):
    """0..18 and 255 pass; 19 (the first id past the last class) and 254 are refused."""
    make_cityscapes(tmp_path, num_train=1, num_val=1, size=(32, 64))
    label = label_path(tmp_path, "train", list_images(tmp_path, "train")[0])
    for values, ok in (([0, 18, 255], True), ([0, 19], False), ([254], False)):
        array = np.zeros((32, 64), np.uint8)
        array.flat[:len(values)] = values
        Image.fromarray(array).save(label)
        if ok:
            check_cityscapes_dataset(tmp_path)
        else:
            with pytest.raises(ValueError, match=rf"outside 0..18 and 255.*values \[{values[-1]}\]"):
                check_cityscapes_dataset(tmp_path)


def test_configured_metric_ignores_the_ignore_index_through_process(cs_root):
    """The workload's evaluator, built from a config as the Runner builds it, fed through its own `process`:
    pixels labelled 255 count nowhere, whatever is predicted there."""
    from mmseg.registry import METRICS

    import workloads.segmentation.plugin  # noqa: F401
    from workloads.segmentation.mmcfg import build_config

    cfg = build_config(seg_section(cs_root), work_dir="wd", seed=0, log_every=5, checkpoints_kept=1)
    metric = METRICS.build(cfg.val_evaluator)
    metric.dataset_meta = dict(classes=CLASSES)
    gt = torch.zeros(1, 4, 4, dtype=torch.long)  # road everywhere ...
    gt[0, 0] = 255  # ... except an ignored first row
    pred = torch.zeros(1, 4, 4, dtype=torch.long)
    pred[0, 0] = 13  # predicted car where the label is ignored
    metric.process({}, [{"pred_sem_seg": {"data": pred}, "gt_sem_seg": {"data": gt}}])
    results = metric.compute_metrics(metric.results)
    assert results["aAcc"] == 100.0 and results["IoU.road"] == 100.0 and results["mIoU"] == 100.0
    assert np.isnan(results["IoU.car"])  # no car in the ground truth; the ignored row is not a false positive


# ---------------------------------------------------------------------------------------------------------
# Registration


def test_one_backbone_class_in_both_scopes_and_scope_specific_necks():
    from mmdet.models.necks import FPN as DetFPN
    from mmdet.registry import MODELS as DET
    from mmengine.registry import HOOKS, MODEL_WRAPPERS
    from mmseg.models.necks import FPN as SegFPN
    from mmseg.registry import METRICS
    from mmseg.registry import MODELS as SEG

    import workloads.detection.plugin  # noqa: F401
    import workloads.segmentation.plugin  # noqa: F401
    from workloads.mmlab.backbones import CedNet, RedNet

    assert DET.get("RedNet") is SEG.get("RedNet") is RedNet and DET.get("CedNet") is SEG.get("CedNet") is CedNet
    for name in ("InvolutionFPN", "CvolutionFPN"):
        assert issubclass(DET.get(name), DetFPN) and issubclass(SEG.get(name), SegFPN)
    assert METRICS.get("PerClassIoUMetric") is not None
    for hook in ("RayTrainReportHook", "MlflowRank0Hook", "FailOnceHook"):
        assert hook in HOOKS.module_dict  # mmengine's root: found from every scope
    assert "NormDistributedDataParallel" in MODEL_WRAPPERS.module_dict
    import importlib

    importlib.reload(sys.modules["workloads.segmentation.plugin"])  # registering again is fine


def test_custom_imports_build_backbone_and_neck_in_mmseg_scope():
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    from workloads.ops import Cvolution2d

    cfg = Config.fromstring(
        "custom_imports = dict(imports=['workloads.segmentation.plugin'], allow_failed_imports=False)\n"
        "backbone = dict(type='CedNet', depth=26, norm_eval=False, frozen_stages=-1)\n"
        "neck = dict(type='CvolutionFPN', in_channels=[256, 512, 1024, 2048], out_channels=32, num_outs=4)\n",
        file_format=".py")
    with DefaultScope.overwrite_default_scope("mmseg"):
        backbone, neck = MODELS.build(cfg.backbone), MODELS.build(cfg.neck)
    outs = neck(backbone(torch.zeros(1, 3, 64, 64)))
    assert [tuple(o.shape) for o in outs] == [(1, 32, 16 // 2**i, 16 // 2**i) for i in range(4)]
    assert [type(m) for m in neck.fpn_convs] == [Cvolution2d] * 4


def test_each_plugin_loads_without_the_other_library():
    procs = {}
    for blocked, plugin, scope in (("mmdet", "workloads.segmentation.plugin", "mmseg"),
                                   ("mmseg", "workloads.detection.plugin", "mmdet")):
        code = (f"import sys; sys.modules[{blocked!r}] = None\n"  # `import mmdet` now raises ImportError
                f"import {plugin}\n"
                f"from {scope}.registry import MODELS\n"
                "assert MODELS.get('RedNet') and MODELS.get('InvolutionFPN')\n")
        procs[plugin] = subprocess.Popen([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for plugin, proc in procs.items():  # run side by side: each is mostly imports
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{plugin}: {err[-2000:]}"


# ---------------------------------------------------------------------------------------------------------
# Configs and sizes


def test_every_config_builds(cs_root):
    from workloads.segmentation.mmcfg import build_config, check_model, list_configs

    names = list_configs()
    assert len(names) == 7 and QUICKSTART in names
    for name in names:
        cfg = build_config(seg_section(cs_root, config=name), work_dir="wd", seed=3, log_every=5,
                           checkpoints_kept=1)
        assert check_model(cfg) > 1e6, name
        assert cfg.custom_imports.imports == ["workloads.segmentation.plugin"] and cfg.default_scope == "mmseg"
        assert cfg.model.backbone.type in ("RedNet", "CedNet") and cfg.model.decode_head.num_classes == 19
        assert cfg.val_evaluator.type == "PerClassIoUMetric"
        assert cfg.train_cfg.max_iters == 40 and cfg.train_cfg.val_interval == 20
        assert cfg.default_hooks.checkpoint.interval == 20 and not cfg.default_hooks.checkpoint.by_epoch
        assert cfg.train_dataloader.dataset.data_prefix.img_path == "leftImg8bit/train"
        assert cfg.val_dataloader.dataset.data_prefix.seg_map_path == "gtFine/val"
        poly = [s for s in cfg.param_scheduler if s.type == "PolyLR"]
        assert poly and poly[0].end == 40, name
        if not name.startswith("quickstart/"):  # the published schedule
            assert cfg.optim_wrapper.optimizer == dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=0.0005)
            assert poly[0].power == 0.9 and poly[0].eta_min == 1e-4
            assert cfg.model.backbone.norm_cfg.type == "SyncBN" and cfg.model.decode_head.norm_cfg.type == "SyncBN"
            assert cfg.model.data_preprocessor.size == (512, 1024)


def test_build_config_settings_and_errors(cs_root, tmp_path):
    from workloads.models import build_model, save_checkpoint
    from workloads.segmentation.mmcfg import build_config

    ckpt = save_checkpoint(tmp_path / "cednet26.pt", build_model("cednet26", num_classes=10))
    seg = seg_section(cs_root, config="upernet_cednet50_4xb2-80k_cityscapes-512x1024", crop_size=[256, 512],
                      batch_size=4, num_data_workers=2, sync_bn="off", pretrained=ckpt,
                      overrides={"optim_wrapper.optimizer.lr": 0.02})
    cfg = build_config(seg, work_dir="wd", classes=["road", "car"])
    assert cfg.train_dataloader.batch_size == 4 and cfg.train_dataloader.num_workers == 2
    assert [s.crop_size for s in cfg.train_dataloader.dataset.pipeline if s.type == "RandomCrop"] == [(256, 512)]
    assert cfg.model.data_preprocessor.size == (256, 512)
    assert cfg.model.decode_head.num_classes == 2 and cfg.model.auxiliary_head.num_classes == 2
    assert cfg.val_dataloader.dataset.metainfo == dict(classes=("road", "car"),
                                                       palette=[(128, 64, 128), (0, 0, 142)])
    for part in (cfg.model.backbone, cfg.model.decode_head, cfg.model.auxiliary_head):
        assert part.norm_cfg.type == "BN"  # sync_bn: off reaches every head
    assert cfg.model.backbone.init_cfg == dict(type="Pretrained", checkpoint=str(Path(ckpt).resolve()),
                                               format="cvlab")
    assert cfg.optim_wrapper.optimizer.lr == 0.02
    assert cfg.test_pipeline == cfg.val_dataloader.dataset.pipeline  # what mmseg's inference API reads

    with pytest.raises(ValueError, match="no such file"):
        build_config(seg_section(cs_root, config="nope.py"), work_dir="wd")
    with pytest.raises(ValueError, match="segmentation.config is empty"):
        build_config(seg_section(cs_root, config=""), work_dir="wd")
    with pytest.raises(ValueError, match="no such checkpoint"):
        build_config(seg_section(cs_root, pretrained=str(tmp_path / "none.pt")), work_dir="wd")
    with pytest.raises(ValueError, match="crop_size"):
        build_config(seg_section(cs_root, crop_size=[16, 16]), work_dir="wd")
    with pytest.raises(ValueError, match="sync_bn"):
        build_config(seg_section(cs_root, sync_bn="sometimes"), work_dir="wd")
    with pytest.raises(ValueError, match="not Cityscapes classes"):
        build_config(seg_section(cs_root), work_dir="wd", classes=["road", "unicorn"])
    with pytest.raises(ValueError, match="begins at iteration 20"):
        build_config(seg_section(cs_root, max_iters=10, val_interval=5), work_dir="wd")


# Published Cityscapes parameter counts (M, 19 classes) and ours for the configs without one.
PUBLISHED = {
    "fpn_rednet50_4xb2-80k_cityscapes-512x1024.py": 18.5,
    "fpn_rednet50_inv-fpn_4xb2-80k_cityscapes-512x1024.py": 16.4,
    "upernet_rednet50_4xb2-80k_cityscapes-512x1024.py": 56.4,
}
OURS = {
    "fpn_cednet50_4xb2-80k_cityscapes-512x1024.py": 19.17,
    "fpn_cednet50_cvo-fpn_4xb2-80k_cityscapes-512x1024.py": 17.23,
    "upernet_cednet50_4xb2-80k_cityscapes-512x1024.py": 57.09,
    QUICKSTART: 7.88,
}


def test_param_counts_match_published_and_ours():
    from workloads.segmentation.mmcfg import build_model_on_meta, list_configs, load_config

    assert set(list_configs()) == set(PUBLISHED) | set(OURS)
    for name, expected in {**PUBLISHED, **OURS}.items():
        millions = sum(p.numel() for p in build_model_on_meta(load_config(name)).parameters()) / 1e6
        assert abs(millions - expected) <= (0.06 if name in PUBLISHED else 0.01), (name, millions)


# ---------------------------------------------------------------------------------------------------------
# BatchNorm


def test_norm_policy_and_conversion():
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    from workloads.mmlab.norm import CPUSyncBatchNorm, convert_batchnorm, cpu_config, norm_for, set_norm_type
    from workloads.segmentation.mmcfg import load_config

    assert norm_for("auto", "cuda", True) == "SyncBN" and norm_for("auto", "cpu", True) == "BN"
    assert norm_for("on", "cpu", True) == "CPUSyncBN" and norm_for("on", "cpu", False) == "BN"
    assert norm_for("off", "cuda", True) == "BN"
    with pytest.raises(ValueError, match="sync_bn"):
        norm_for("always", "cpu", True)

    cfg = load_config("upernet_rednet50_4xb2-80k_cityscapes-512x1024.py")
    assert set_norm_type(cfg.model, "SyncBN") == 3  # backbone, decode head, auxiliary head
    cpu_config(cfg)
    assert {cfg.model.backbone.norm_cfg.type, cfg.model.decode_head.norm_cfg.type,
            cfg.model.auxiliary_head.norm_cfg.type} == {"BN"}

    # A head built from mmseg's SyncBN norm_cfg, converted in place (parameters shared).
    with DefaultScope.overwrite_default_scope("mmseg"):
        head = MODELS.build(dict(type="FCNHead", in_channels=8, channels=8, num_convs=1, num_classes=3,
                                 norm_cfg=dict(type="SyncBN", requires_grad=True))).train()
    x = torch.randn(2, 8, 8, 8)
    for kind, cls in (("BN", torch.nn.BatchNorm2d), ("CPUSyncBN", CPUSyncBatchNorm)):
        weight = next(m for m in head.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)).weight
        convert_batchnorm(head, kind)
        bns = [m for m in head.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert bns and all(type(m) is cls for m in bns) and bns[0].weight is weight  # parameters shared
        assert head([x]).shape == (2, 3, 8, 8)  # no process group: CPUSyncBN is a plain BN


def _sync_bn_rank(rank: int, world: int, store: str, x: torch.Tensor, grad_out: torch.Tensor, out_dir: str):
    import torch.distributed as dist

    from workloads.mmlab.norm import CPUSyncBatchNorm

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        bn = CPUSyncBatchNorm(4, momentum=0.5)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        part = x.chunk(world)[rank].clone().requires_grad_(True)
        y = bn(part)
        y.backward(grad_out.chunk(world)[rank])
        try:  # what CPUSyncBatchNorm is for: torch's SyncBatchNorm refuses CPU tensors under gloo
            torch.nn.SyncBatchNorm(4)(part)
            refusal = ""
        except ValueError as err:
            refusal = str(err)
        torch.save({"y": y.detach(), "dx": part.grad, "dw": bn.weight.grad, "mean": bn.running_mean,
                    "var": bn.running_var, "refusal": refusal}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_cpu_sync_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path):
    """Two gloo processes with half a batch each give what one BatchNorm gives on the whole batch."""
    import torch.multiprocessing as mp

    torch.manual_seed(1)
    x, grad_out = torch.randn(6, 4, 5, 5) * 3 + 1, torch.randn(6, 4, 5, 5)
    mp.spawn(_sync_bn_rank, args=(2, str(tmp_path / "store"), x, grad_out, str(tmp_path)), nprocs=2)

    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(4, momentum=0.5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    xr = x.clone().requires_grad_(True)
    yr = ref(xr)
    yr.backward(grad_out)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert "SyncBatchNorm expected input tensor to be on GPU" in ranks[0]["refusal"]
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), yr.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], ref.weight.grad, rtol=1e-4, atol=1e-5)
    for r in ranks:  # the same running statistics on every rank, equal to the whole batch's
        torch.testing.assert_close(r["mean"], ref.running_mean)
        torch.testing.assert_close(r["var"], ref.running_var)


# ---------------------------------------------------------------------------------------------------------
# Backbone checkpoints


def _as_published(model) -> dict:
    """Our RedNet state dict under the published mmcls names (the inverse of the documented key map)."""
    from workloads.ops import MMCLS_KEY_MAP

    inverse = {ours: theirs for theirs, ours in MMCLS_KEY_MAP.items()}
    ops = set(model.operator_names())
    sd = {}
    for key, value in model.state_dict().items():
        prefix, _, suffix = key.partition(".")
        for name in ops:
            if key.startswith(name + "."):
                prefix, suffix = name, key[len(name) + 1:]
                suffix = inverse.get(suffix, suffix)
                break
        sd["backbone." + prefix + "." + suffix] = value
    # mmcv 1.x checkpoints keep numpy scalars in `meta`: loaded through the mmengine allow-list.
    return {"meta": {"epoch": np.int64(100)}, "state_dict": sd}


@pytest.mark.parametrize("fmt", ["cvlab", "mmcls", "auto"])
def test_backbone_loads_cvlab_and_published_checkpoints(tmp_path, fmt):
    from mmseg.registry import MODELS

    import workloads.segmentation.plugin  # noqa: F401
    from workloads.models import build_model, save_checkpoint

    src = build_model("rednet26", out_indices=(0, 1, 2, 3))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.25)
    if fmt == "cvlab":
        path = save_checkpoint(tmp_path / "r.pt", build_model("rednet26", num_classes=10))
        src = None
    else:
        path = tmp_path / "rednet26.pth"
        torch.save(_as_published(src), path)
    bb = MODELS.build(dict(type="RedNet", depth=26, norm_eval=False,
                           init_cfg=dict(type="Pretrained", checkpoint=str(path), format=fmt)))
    bb.init_weights()
    if src is not None:
        for key, value in src.state_dict().items():
            assert torch.equal(bb.body.state_dict()[key], value), key
    wrong = MODELS.build(dict(type="CedNet", depth=26, init_cfg=dict(type="Pretrained", checkpoint=str(path),
                                                                      format=fmt)))
    with pytest.raises(ValueError, match="does not match backbone cednet26"):
        wrong.init_weights()
    with pytest.raises(ValueError, match="format"):
        MODELS.build(dict(type="RedNet", depth=26, init_cfg=dict(type="Pretrained", checkpoint=str(path),
                                                                 format="timm")))


# ---------------------------------------------------------------------------------------------------------
# Metrics, worker config, hooks, overlays


def test_per_class_metric_reports_and_table():
    from workloads.mmlab.hooks import rename_metrics
    from workloads.segmentation.metrics import PerClassIoUMetric, class_iou_table, format_class_iou_table

    metric = PerClassIoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = dict(classes=CLASSES)
    n = len(CLASSES)
    pred = torch.zeros(2, 8, dtype=torch.long)
    pred[1] = 13  # row 0 road, row 1 car
    label = pred.clone()
    label[1, :2] = 0  # 2 car pixels are road in truth
    label[0, 7] = 255  # ignored
    results = [metric.intersect_and_union(pred, label, n, 255)]
    raw = metric.compute_metrics(results)
    assert raw["IoU.road"] == round(7 / 9 * 100, 2) and raw["Acc.car"] == 100.0
    assert np.isnan(raw["IoU.traffic_light"])  # no ground truth, no prediction
    reported = rename_metrics(raw, METRIC_NAMES)
    assert {"val/mIoU", "val/mAcc", "val/aAcc", "val/IoU.road", "val/Acc.car"} <= set(reported)
    assert "val/IoU.traffic_light" not in reported  # NaN is left out
    assert reported["val/mIoU"] == round((7 / 9 + 6 / 8) / 2 * 100, 2)  # road 7/9, car 6/8
    rows = class_iou_table(reported)
    assert [r["class"] for r in rows] == list(CLASSES)
    assert rows[0] == {"class": "road", "IoU": raw["IoU.road"], "Acc": raw["Acc.road"]}
    assert rows[6] == {"class": "traffic light", "IoU": None, "Acc": None}
    md, csv = format_class_iou_table(rows), format_class_iou_table(rows, "csv")
    assert "| road | 77.78 | 77.78 |" in md and "| traffic light | - | - |" in md
    assert csv.splitlines()[0] == "class,IoU,Acc" and "car,75.00,100.00" in csv


def test_worker_config_and_hooks_for_iteration_loops(tmp_path):
    import dataclasses

    from orchestrator.jobs.detection import DetectionJob
    from workloads.mmlab.hooks import FailOnceHook
    from workloads.mmlab.worker_config import MMWorkerConfig

    wc = MMWorkerConfig(cfg={"model": {}}, scope="mmseg", run_id="r", metric_names=METRIC_NAMES)
    assert wc.param_prefix == "seg" and wc.sync_bn == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        wc.run_id = "other"
    for bad, match in ((dict(scope="mmcls"), "scope"), (dict(sync_bn="yes"), "sync_bn"),
                       (dict(cfg={}), "model"), (dict(run_id=""), "run_id"), (dict(log_every=0), "log_every")):
        with pytest.raises(ValueError, match=match):
            MMWorkerConfig(**{**dict(cfg={"model": {}}, scope="mmseg", run_id="r"), **bad})
    assert DetectionJob.metric_names["coco/bbox_mAP"] == "val/bbox_mAP"

    hook = FailOnceHook(marker=str(tmp_path / "m"), after_iter=3)
    hook.before_train_iter(SimpleNamespace(iter=2), 0)
    with pytest.raises(RuntimeError, match="before iteration 4"):
        hook.before_train_iter(SimpleNamespace(iter=3), 0)
    hook.before_train_iter(SimpleNamespace(iter=3), 0)  # once only: the marker exists
    with pytest.raises(ValueError, match="exactly one"):
        FailOnceHook(marker="m")


def test_overlays(cs_root, tmp_path):
    from workloads.segmentation.mmcfg import build_config
    from workloads.segmentation.visualize import (
        blend,
        colorize,
        load_segmentor,
        overlay_panel,
        val_samples,
        write_overlays,
    )

    lab = np.array([[0, 13], [255, 40]], np.uint8)
    assert colorize(lab).tolist() == [[[128, 64, 128], [0, 0, 142]], [[0, 0, 0], [0, 0, 0]]]
    img = np.full((2, 2, 3), 100, np.uint8)
    assert (blend(img, lab)[1] == 100).all()  # ignore / unknown ids leave the image as it is
    assert overlay_panel(img, lab, lab).shape == (2, 2 * 3 + 8, 3)
    with pytest.raises(ValueError, match="same height and width"):
        overlay_panel(img, lab, lab[:1])

    cfg = build_config(seg_section(cs_root), work_dir=str(tmp_path))
    model = load_segmentor(cfg, None, device="cpu")  # an untrained model is enough for the plumbing
    samples = val_samples(cs_root, 2)
    paths = write_overlays(model, samples, tmp_path / "overlays")
    assert [p.name for p in paths] == [s[0].name.replace("_leftImg8bit.png", "_overlay.png") for s in samples]
    assert Image.open(paths[0]).size == (3 * 128 + 8, 64)


# ---------------------------------------------------------------------------------------------------------
# The shared worker on Ray Train


def _fit(cfg, tmp_path, *, sync_bn: str, run_id: str, tracking_uri: str | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.jobs.segmentation import SegmentationJob
    from orchestrator.tracking.metric_logger import MlflowMetricLogger
    from workloads.mmlab.worker import train_worker
    from workloads.mmlab.worker_config import MMWorkerConfig

    best = SegmentationJob.best_metric
    logger = MlflowMetricLogger(tracking_uri, run_id, key=best, skip=("iter",)) if tracking_uri else None
    config = MMWorkerConfig(cfg=cfg.to_dict(), scope="mmseg", metric_names=METRIC_NAMES, run_id=run_id,
                            epoch_logger=logger, log_every=1, sync_bn=sync_bn, threads=1,
                            params={"test.sync_bn": sync_bn}, work_root=str(tmp_path / "work"))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=run_id, storage_path=str(tmp_path / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=1,
                                                                checkpoint_score_attribute=best,
                                                                checkpoint_score_order="max"),
                             failure_config=FailureConfig(max_failures=0, controller_failure_limit=1)),
        torch_config=TorchConfig(backend="gloo"),
    )
    return trainer.fit()


@pytest.mark.slow
def test_two_cpu_workers_with_synchronised_bn_report_and_log(tmp_path, ray_cluster):
    from mlflow import MlflowClient

    from workloads.segmentation.mmcfg import build_config
    from workloads.segmentation.synthetic import make_cityscapes

    make_cityscapes(tmp_path / "cs", num_train=8, num_val=2, size=(64, 128), seed=0)
    seg = seg_section(tmp_path / "cs", crop_size=[64, 64], max_iters=4, val_interval=2, overrides={
        "param_scheduler": [dict(type="PolyLR", eta_min=1e-5, power=0.9, begin=0, end=4, by_epoch=False)],
        "train_dataloader.dataset.pipeline.2.scale": (128, 64),  # RandomResize around the 64x128 images
        "val_dataloader.dataset.pipeline.1.scale": (128, 64),
    })
    cfg = build_config(seg, work_dir="unused", seed=0, log_every=1, checkpoints_kept=1)
    assert cfg.model.decode_head.norm_cfg.type == "BN" and cfg.model.backbone.norm_cfg.type == "BN"
    cfg.model.decode_head.norm_cfg.type = "SyncBN"  # as in the published configs: the worker must cope
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("seg-test")).info.run_id

    t0 = time.perf_counter()
    result = _fit(cfg, tmp_path, sync_bn="on", run_id=run_id, tracking_uri=uri)
    print(f"2-worker run: {time.perf_counter() - t0:.1f} s")
    m = result.metrics
    assert m["iter"] == 4 and "epoch" not in m  # iteration-based: reported by validation, with `iter`
    for key in ("val/mIoU", "val/mAcc", "val/aAcc"):
        assert 0.0 <= m[key] <= 100.0, key
    assert "val/IoU.road" in m and "val/Acc.sky" in m
    with result.checkpoint.as_directory() as d:
        assert sorted(p.name for p in Path(d).iterdir()) == ["iter_4.pth"]

    run = client.get_run(run_id)
    assert {h.step for h in client.get_metric_history(run_id, "val/mIoU")} == {2, 4}
    assert {h.step for h in client.get_metric_history(run_id, "train/loss")} == {1, 2, 3, 4}
    assert "epoch" not in run.data.metrics and "val/IoU.car" in run.data.metrics
    assert run.data.params["seg.world_size"] == "2" and run.data.params["test.sync_bn"] == "on"
