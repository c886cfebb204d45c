# ruff: noqa: C408  (mmdet config style: dict(...))
# faster-rcnn with a CedNet-50 backbone, the C-volution neck and the C-volution RPN head.
_base_ = './faster-rcnn_cednet50_cvo-fpn_1x_coco.py'

model = dict(rpn_head=dict(type='CvolutionRPNHead'))
