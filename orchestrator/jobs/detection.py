"""`workload: detection`: mmdet 3.x detection / instance segmentation on COCO (the job; what it shares with
segmentation, evaluation included, is in `orchestrator.jobs.openmmlab`, the rest in the run lifecycle)."""
from __future__ import annotations

import logging
from pathlib import Path

from orchestrator.errors import CvlabError
from orchestrator.jobs.openmmlab import OpenMMLabJob, checked_data
from workloads.detection import METRIC_NAMES, SCOPE
from workloads.detection.coco_check import check_coco_dataset
from workloads.detection.mmcfg import build_config
from workloads.detection.synthetic_coco import DEFAULT_CLASSES, make_coco

log = logging.getLogger(__name__)


def prepare_coco(spec) -> dict:
    """Generate the synthetic set when asked and missing, then validate the annotations (CvlabError)."""
    det = spec.detection
    root = Path(det.data_root)
    if not (root / "annotations").is_dir():
        if not det.generate:
            raise CvlabError(f"detection.data_root {root} holds no annotations/ folder; point it at a COCO "
                             "layout (annotations/instances_{train,val}2017.json, train2017/, val2017/) or "
                             "set detection.generate: true for the synthetic shapes set")
        log.info("generating the synthetic COCO set in %s ...", root)
        try:
            make_coco(root, num_train=det.num_train_generated, num_val=det.num_val_generated,
                      size=det.generated_size, classes=det.classes or DEFAULT_CLASSES, seed=spec.experiment.seed)
        except ValueError as err:
            raise CvlabError(f"detection: cannot generate the synthetic COCO set: {err}") from None
    return checked_data(check_coco_dataset, root, "detection")


def build_detection_config(spec, classes: list[str] | None = None):
    """The final mmengine Config of a detection spec (CvlabError on bad settings)."""
    try:
        return build_config(spec.detection, work_dir="work_dirs/cvlab-det", seed=spec.experiment.seed,
                            log_every=spec.run.log_every, checkpoint_every=spec.run.checkpoint_every,
                            checkpoints_kept=spec.run.checkpoints_kept, classes=classes)
    except (ValueError, FileNotFoundError) as err:
        raise CvlabError(f"detection: {err}") from None


class DetectionJob(OpenMMLabJob):
    workload = "detection"
    scope = SCOPE
    metric_names = METRIC_NAMES
    best_metric = "val/bbox_mAP"
    step_metric = "epoch"
    budget_path = "detection.max_epochs"
    reported_metrics = ("val/bbox_mAP", "val/bbox_mAP50", "val/bbox_mAP75", "val/segm_mAP", "val/segm_mAP50",
                        "val/segm_mAP75")
    data_paths = ("detection.data_root", "detection.generate", "detection.num_train_generated",
                  "detection.num_val_generated", "detection.generated_size", "detection.classes")

    def prepare_data(self) -> dict:
        return prepare_coco(self.spec)

    def build_config(self):
        return build_detection_config(self.spec)

