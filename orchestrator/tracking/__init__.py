"""MLflow tracking for cvlab runs: where to log (`server`), experiments and runs (`runs`), per-step metrics
from workers (`metric_logger`) and logged models (`models`)."""
