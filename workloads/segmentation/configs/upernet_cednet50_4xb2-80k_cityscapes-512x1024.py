# ruff: noqa: C408  (mmseg config style: dict(...))
# UPerNet on a CedNet-50 backbone.
_base_ = './upernet_rednet50_4xb2-80k_cityscapes-512x1024.py'

model = dict(backbone=dict(type='CedNet'))
