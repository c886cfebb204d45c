"""The synthetic ImageNet-layout generator: layout, determinism, safety, and that it is learnable."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workloads.classification import synthetic
from workloads.classification.synthetic import MANIFEST, class_table, make_imagenet


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.JPEG")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_layout_and_summary(tmp_path):
    root = tmp_path / "ds"
    summary = make_imagenet(root, classes=3, per_class=4, size=32, seed=1, val_per_class=2)
    assert summary["reused"] is False
    assert summary["train_images"] == 12 and summary["val_images"] == 6
    names = summary["class_names"]
    assert len(names) == 3 and all(n.startswith("n") and len(n) == 9 for n in names)
    for split, per in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == names
        for wnid in names:
            files = sorted((root / split / wnid).glob("*.JPEG"))
            assert len(files) == per
            with Image.open(files[0]) as img:
                assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
    assert (root / "train" / names[0] / f"{names[0]}_0.JPEG").exists()
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["classes"] == 3 and manifest["seed"] == 1
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_deterministic_for_a_seed(tmp_path):
    a = make_imagenet(tmp_path / "a", classes=2, per_class=3, size=32, seed=7)
    make_imagenet(tmp_path / "b", classes=2, per_class=3, size=32, seed=7)
    make_imagenet(tmp_path / "c", classes=2, per_class=3, size=32, seed=8)
    assert a["val_per_class"] == 2  # default max(2, per_class // 5)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_reuse_refuse_and_overwrite(tmp_path):
    root = tmp_path / "ds"
    make_imagenet(root, classes=2, per_class=2, size=32)
    first = root / "train" / "n00000000" / "n00000000_0.JPEG"
    stamp = first.stat().st_mtime_ns
    again = make_imagenet(root, classes=2, per_class=2, size=32)
    assert again["reused"] is True and first.stat().st_mtime_ns == stamp

    with pytest.raises(ValueError, match="different parameters"):
        make_imagenet(root, classes=3, per_class=2, size=32)
    redone = make_imagenet(root, classes=3, per_class=2, size=32, overwrite=True)
    assert redone["reused"] is False and len(list((root / "train").iterdir())) == 3

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty.*notes.txt"):
        make_imagenet(foreign, classes=2, per_class=2, size=32)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # untouched

    # An interrupted run leaves only a hidden partial folder: the next run cleans it and proceeds.
    crashed = tmp_path / "crashed"
    (crashed / ".partial-0" / "train").mkdir(parents=True)
    make_imagenet(crashed, classes=2, per_class=2, size=32)
    assert sorted(p.name for p in crashed.iterdir()) == [MANIFEST, "train", "val"]


@pytest.mark.parametrize(
    "kwargs, word",
    [({"classes": 1}, "classes"), ({"classes": 10_000}, "classes"), ({"per_class": 0}, "per_class"),
     ({"size": 8}, "size"), ({"seed": -1}, "seed"), ({"val_per_class": 0}, "val_per_class"),
     ({"classes": 2.5}, "classes")],
)
def test_bad_parameters(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_imagenet(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_classes_are_combinations_not_single_cues():
    for n in (2, 10, 37, synthetic.MAX_CLASSES):
        table = class_table(n)
        combos = {(c["pattern"], c["hue"]) for c in table}
        assert len(combos) == n  # every class distinct
    table = class_table(10)
    # Neither a pattern nor a hue alone identifies a class among 10.
    assert max(Counter(c["pattern"] for c in table).values()) >= 2
    assert min(Counter(c["hue"] for c in table).values()) >= 2


def _mean_colour_accuracy(root: Path, names: list[str]) -> float:
    """Nearest-centroid accuracy on the mean RGB of each image: a 'constant colour' classifier."""
    def feats(split):
        xs, ys = [], []
        for label, wnid in enumerate(names):
            for f in sorted((root / split / wnid).glob("*.JPEG")):
                xs.append(np.asarray(Image.open(f), np.float32).reshape(-1, 3).mean(0))
                ys.append(label)
        return np.stack(xs), np.array(ys)

    xtr, ytr = feats("train")
    xva, yva = feats("val")
    centroids = np.stack([xtr[ytr == k].mean(0) for k in range(len(names))])
    pred = ((xva[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((pred == yva).mean())


def test_not_separable_by_colour_alone(tmp_path):
    summary = make_imagenet(tmp_path / "ds", classes=10, per_class=20, size=32, val_per_class=10)
    acc = _mean_colour_accuracy(tmp_path / "ds", summary["class_names"])
    assert acc < 0.6, f"mean colour alone separates the classes too well ({acc:.2f})"


@pytest.mark.slow
def test_small_cnn_learns_it_under_random_crops(tmp_path):
    """A 3-block CNN on 32 px crops reaches >= 70% val top-1 in a few epochs with RandomResizedCrop + flip."""
    torch = pytest.importorskip("torch")
    from torch import nn
    from torchvision import datasets
    from torchvision import transforms as T

    summary = make_imagenet(tmp_path / "ds", classes=10, per_class=30, size=64, val_per_class=10)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    train = datasets.ImageFolder(tmp_path / "ds" / "train", T.Compose(
        [T.RandomResizedCrop(32, scale=(0.3, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()]))
    val = datasets.ImageFolder(tmp_path / "ds" / "val", T.Compose(
        [T.Resize(37), T.CenterCrop(32), T.ToTensor()]))
    assert train.classes == summary["class_names"]
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.MaxPool2d(2))

    model = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    best = 0.0
    for epoch in range(8):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            x = torch.stack([val[i][0] for i in range(len(val))])
            y = torch.tensor(val.targets)
            best = max(best, (model(x).argmax(1) == y).float().mean().item())
        print(f"epoch {epoch}: val top-1 {best:.2f}")
        if best >= 0.7:
            break
    assert best >= 0.7, f"val top-1 {best:.2f}"
