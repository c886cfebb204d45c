# ruff: noqa: C408  (mmdet config style: dict(...))
# faster-rcnn with a CedNet-50 backbone and the standard convolution FPN, COCO 1x schedule (12 epochs).
_base_ = './faster-rcnn_rednet50_fpn_1x_coco.py'

model = dict(backbone=dict(type='CedNet'))
