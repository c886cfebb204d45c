# ruff: noqa: C408  (mmseg config style: dict(...))
# A small Semantic FPN for CPU runs on the synthetic street set (workloads.segmentation.synthetic, 128x256
# images): CedNet-26 from scratch, 64-channel C-volution neck, 32-channel head, 128x128 crops, AdamW.
_base_ = '../fpn_cednet50_cvo-fpn_4xb2-80k_cityscapes-512x1024.py'

crop_size = (128, 128)
ch = 64
norm_cfg = dict(type='BN', requires_grad=True)  # the run's sync_bn setting still applies on workers
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(depth=26, norm_cfg=norm_cfg),
    neck=dict(out_channels=ch),
    decode_head=dict(in_channels=[ch] * 4, channels=32, dropout_ratio=0.0, norm_cfg=norm_cfg))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(256, 128), ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 128), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(_delete_=True, type='OptimWrapper',
                     optimizer=dict(type='AdamW', lr=2e-3, weight_decay=1e-4), clip_grad=dict(max_norm=10.0))
max_iters = 160
param_scheduler = [
    dict(type='LinearLR', start_factor=0.05, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', eta_min=1e-5, power=0.9, begin=20, end=max_iters, by_epoch=False),
]
train_cfg = dict(max_iters=max_iters, val_interval=80)
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=80))
env_cfg = dict(cudnn_benchmark=False)
