# ruff: noqa: C408  (mmdet config style: dict(...))
# faster-rcnn with a RedNet-50 backbone, the involution neck and the involution RPN head.
_base_ = './faster-rcnn_rednet50_inv-fpn_1x_coco.py'

model = dict(rpn_head=dict(type='InvolutionRPNHead'))
