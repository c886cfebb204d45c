"""Names shared across the control plane: MLflow tags, artifact paths and the files of a run folder.

Defined once here; every module that writes or reads one of them imports it from this module.
"""
from __future__ import annotations

# ---- MLflow tags
ERROR_TAG = "cvlab.error"  # why a run FAILED
END_REASON_TAG = "cvlab.end_reason"  # why a run ended (completed, early-stopped by ASHA, failed: ...)
RAY_RUN_TAG = "cvlab.ray_run"  # the Ray Train run folder name
WORKLOAD_TAG = "cvlab.workload"  # classification | detection | segmentation
JOB_TAG = "cvlab.job"  # train | eval
CHECKPOINT_TAG = "cvlab.checkpoint"  # the last checkpoint's path in run storage
SOURCE_RUN_TAG = "cvlab.source_run"  # an evaluation's source run (run id or checkpoint)
RESUME_TAG_PREFIX = "cvlab.resume."  # + timestamp: the settings a resumed run changed
KIND_TAG = "cvlab.kind"  # search | trial
SEARCH_NAME_TAG = "cvlab.search_name"
SEARCH_PATHS_TAG = "cvlab.search_paths"
TUNE_PATH_TAG = "cvlab.tune_path"
TRIAL_ID_TAG = "cvlab.trial_id"
TRIAL_NAME_TAG = "cvlab.trial_name"
FAILED_TRIALS_TAG = "cvlab.failed_trials"
BEST_RUN_TAG = "cvlab.best_run_id"
PARETO_TAG = "cvlab.pareto"  # true | false: a trial on its search's accuracy-cost front (filter the UI on it)
INFEASIBLE_TAG = "cvlab.infeasible"  # a trial never trained: the cost bound it violated
REUSED_RUN_TAG = "cvlab.reused_run"  # a trial not trained again: the run that measured its configuration
EXTENDED_FROM_TAG = "cvlab.extended_from"  # `cvlab tune --extend`: the trial run this one continues
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: nests a run under another in the UI
# MLflow's own experiment kind. MLflow 3.17's UI ignores it while it shows its GenAI / model-training toggle;
# the links cvlab prints pick the view (`orchestrator.tracking.server.ui_link`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# ---- MLflow params
SEARCHED_PARAM_PREFIX = "searched."  # + spec path: a trial's searched value, short (`searched.optim.lr` = 0.0031)
OBJECTIVES_PARAM = "search.objectives"  # a search's parent run: its objectives, JSON [[metric, mode], ...]

# ---- MLflow artifacts of a run
RESOLVED_SPEC_ARTIFACT = "resolved.yaml"
BEST_CHECKPOINT_ARTIFACT = "checkpoints/best"
LAST_CHECKPOINT_ARTIFACT = "checkpoints/last"

# ---- files in a Ray Train run folder `<run.storage_path>/<name>-<timestamp>/`
RUN_RECORD_FILE = "cvlab_run.json"  # names the MLflow run the folder feeds (for --resume)
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints
FAULT_MARKER_FILE = "fault_drill.done"  # written by the run.fault_kill_rank_at drill when it fired
