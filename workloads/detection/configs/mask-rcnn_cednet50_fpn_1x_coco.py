# ruff: noqa: C408  (mmdet config style: dict(...))
# mask-rcnn with a CedNet-50 backbone and the standard convolution FPN, COCO 1x schedule (12 epochs).
_base_ = './mask-rcnn_rednet50_fpn_1x_coco.py'

model = dict(backbone=dict(type='CedNet'))
