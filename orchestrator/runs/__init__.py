"""The run lifecycle every workload goes through (`lifecycle.run_job`), and what it stands on: the Job a workload
supplies (`orchestrator.jobs`), the TorchTrainer it builds, Ray set-up, run folders, storage, failure messages."""
