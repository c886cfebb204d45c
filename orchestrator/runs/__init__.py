"""The run lifecycle every workload goes through (`lifecycle.run_job`), and what it stands on: the Job a driver
supplies, the TorchTrainer it builds, Ray set-up, run folders, storage, failure messages."""
