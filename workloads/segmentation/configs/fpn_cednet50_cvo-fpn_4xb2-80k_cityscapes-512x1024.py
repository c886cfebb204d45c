# ruff: noqa: C408  (mmseg config style: dict(...))
# Semantic FPN, CedNet-50, C-volution neck (the FPN output convs are 7x7 C-volutions).
_base_ = './fpn_cednet50_4xb2-80k_cityscapes-512x1024.py'

model = dict(neck=dict(type='CvolutionFPN'))
