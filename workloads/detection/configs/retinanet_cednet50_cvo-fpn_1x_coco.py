# ruff: noqa: C408  (mmdet config style: dict(...))
# retinanet with a CedNet-50 backbone and the C-volution neck (FPN output convs are 7x7 C-volution).
_base_ = './retinanet_cednet50_fpn_1x_coco.py'

model = dict(neck=dict(type='CvolutionFPN'))
