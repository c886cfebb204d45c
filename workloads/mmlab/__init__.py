"""What the OpenMMLab workloads (mmdet detection, mmseg segmentation) share, so nothing is copied twice.

- `backbones`: the `RedNet` / `CedNet` backbone wrappers around `workloads.models` (ImageNet checkpoints in
  our format or the published mmcls format through `init_cfg`);
- `necks`: the mixin that turns an FPN's output convs into involution / C-volution (`ops_factory.make_op`);
- `registration`: registering one set of classes in a scope's registries (mmdet's, mmseg's);
- `hooks`: Ray Train reporting, MLflow logging from rank 0, checkpoints on a preemption notice and fault
  injection, for epoch- and iteration-based loops;
- `loops`: mmengine's epoch loop made to resume inside an epoch (after a preemption checkpoint);
- `norm`: the BatchNorm policy (SyncBN on GPU, a BN that works on CPU workers under gloo);
- `checkpoints`: the `torch.serialization.safe_globals` allow-list for mmengine checkpoints;
- `configs`: finding and loading the config files of a workload;
- `worker`: the Ray Train worker running an mmengine `Runner` in Ray's process group, configured by the
  frozen `worker_config.MMWorkerConfig`.

Importing this package imports nothing heavy; mmdet and mmseg are each imported only by their own workload.
"""
from __future__ import annotations
