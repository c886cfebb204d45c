# ruff: noqa: C408  (mmdet config style: dict(...))
# faster-rcnn with a RedNet-50 backbone and the standard convolution FPN, COCO 1x schedule (12 epochs).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['workloads.detection.plugin'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='RedNet',
        depth=50,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_eval=True,
        # dict(type='Pretrained', checkpoint=PATH) with one of our ImageNet checkpoints
        # (experiment YAML: detection.pretrained).
        init_cfg=None))

# Published schedule: linear warm-up over 2000 iterations, steps at epochs 8 and 11.
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=2000),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
