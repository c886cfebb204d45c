# ruff: noqa: C408  (mmdet config style: dict(...))
# mask-rcnn with a RedNet-50 backbone and the involution neck (FPN output convs are 7x7 involution).
_base_ = './mask-rcnn_rednet50_fpn_1x_coco.py'

model = dict(neck=dict(type='InvolutionFPN'))
