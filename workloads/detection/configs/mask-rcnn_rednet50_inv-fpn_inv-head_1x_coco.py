# ruff: noqa: C408  (mmdet config style: dict(...))
# mask-rcnn with a RedNet-50 backbone, the involution neck, the involution RPN head and the involution FCN mask head.
_base_ = './mask-rcnn_rednet50_inv-fpn_1x_coco.py'

model = dict(
    rpn_head=dict(type='InvolutionRPNHead'),
    roi_head=dict(mask_head=dict(type='InvolutionFCNMaskHead')))
