# ruff: noqa: C408  (mmseg config style: dict(...))
# Semantic FPN, RedNet-50, involution neck (the FPN output convs are 7x7 involutions).
_base_ = './fpn_rednet50_4xb2-80k_cityscapes-512x1024.py'

model = dict(neck=dict(type='InvolutionFPN'))
