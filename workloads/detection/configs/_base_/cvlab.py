# ruff: noqa: C408  (mmdet config style: dict(...))
# What every detection config here shares. A config inherits it beside its mmdet base,
#     _base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', './_base_/cvlab.py']
# and takes the values below by reference (mmengine refuses a key defined by two bases, so the model and
# the schedule are named `cvlab_*` here and assigned in the config).
custom_imports = dict(imports=['workloads.detection.plugin'], allow_failed_imports=False)

# A RedNet-50 in place of the base's ResNet-50 (CedNet configs change `type`).
cvlab_backbone = dict(
    _delete_=True,
    type='RedNet',
    depth=50,
    out_indices=(0, 1, 2, 3),
    frozen_stages=1,
    norm_eval=True,
    # dict(type='Pretrained', checkpoint=PATH) with one of our ImageNet checkpoints
    # (experiment YAML: detection.pretrained).
    init_cfg=None)

# Published schedule: linear warm-up over 2000 iterations, steps at epochs 8 and 11.
cvlab_param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=2000),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
