"""MLflow tracking for cvlab runs: where to log (`server`), experiments and runs (`runs`), per-epoch metrics
from workers (`epoch_logger`) and logged models (`models`)."""
