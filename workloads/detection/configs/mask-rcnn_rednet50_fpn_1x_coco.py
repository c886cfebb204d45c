# ruff: noqa: C408  (mmdet config style: dict(...))
# mask-rcnn with a RedNet-50 backbone and the standard convolution FPN, COCO 1x schedule (12 epochs).
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './_base_/cvlab.py']

# mmengine evaluates this file with `_base_` bound to the merged bases.
model = dict(backbone=_base_.cvlab_backbone)
param_scheduler = _base_.cvlab_param_scheduler
