"""Ray clusters: jobs submitted to one (`cvlab submit`, `cvlab jobs`), and a local cluster with an MLflow server
(`cvlab cluster local`)."""
