# ruff: noqa: C408  (mmseg config style: dict(...))
# What every segmentation config here shares. A config inherits it beside its mmseg base,
#     _base_ = ['mmseg::sem_fpn/fpn_r50_4xb2-80k_cityscapes-512x1024.py', './_base_/cvlab.py']
# and takes the values below by reference (mmengine refuses a key defined by two bases, so the backbone
# and the evaluator are named `cvlab_*` here and assigned in the config).
custom_imports = dict(imports=['workloads.segmentation.plugin'], allow_failed_imports=False)

# A RedNet-50 in place of the base's ResNet-50-V1c (CedNet configs change `type`); trained whole, with
# synchronised BN as published (CPU workers get a BN that works: workloads.mmlab.norm).
cvlab_backbone = dict(
    _delete_=True,
    type='RedNet',
    depth=50,
    out_indices=(0, 1, 2, 3),
    frozen_stages=-1,
    norm_eval=False,
    norm_cfg=dict(type='SyncBN', requires_grad=True),
    # dict(type='Pretrained', checkpoint=PATH, format='cvlab' | 'mmcls'): one of our ImageNet checkpoints
    # or a published mmcls RedNet one (experiment YAML: segmentation.pretrained).
    init_cfg=None)

# mIoU / mAcc / aAcc plus each class's IoU and Acc.
cvlab_evaluator = dict(type='PerClassIoUMetric', iou_metrics=['mIoU'])
