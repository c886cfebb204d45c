# ruff: noqa: C408  (mmseg config style: dict(...))
# Semantic FPN with a CedNet-50 backbone and the standard convolution FPN.
_base_ = './fpn_rednet50_4xb2-80k_cityscapes-512x1024.py'

model = dict(backbone=dict(type='CedNet'))
