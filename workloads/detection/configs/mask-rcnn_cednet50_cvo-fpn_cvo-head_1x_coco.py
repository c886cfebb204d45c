# ruff: noqa: C408  (mmdet config style: dict(...))
# mask-rcnn with a CedNet-50 backbone, the C-volution neck, the C-volution RPN head and the C-volution FCN mask head.
_base_ = './mask-rcnn_cednet50_cvo-fpn_1x_coco.py'

model = dict(
    rpn_head=dict(type='CvolutionRPNHead'),
    roi_head=dict(mask_head=dict(type='CvolutionFCNMaskHead')))
