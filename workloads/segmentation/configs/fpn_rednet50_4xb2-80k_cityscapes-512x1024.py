# ruff: noqa: C408  (mmseg config style: dict(...))
# Semantic FPN with a RedNet-50 backbone and the standard convolution FPN: Cityscapes 512x1024 crops,
# 80k iterations, SGD lr 0.01 (momentum 0.9, wd 5e-4), poly decay (power 0.9, min lr 1e-4), 2 images per GPU.
_base_ = ['mmseg::sem_fpn/fpn_r50_4xb2-80k_cityscapes-512x1024.py', './_base_/cvlab.py']

# mmengine evaluates this file with `_base_` bound to the merged bases.
model = dict(pretrained=None, backbone=_base_.cvlab_backbone)
val_evaluator = _base_.cvlab_evaluator
test_evaluator = val_evaluator
