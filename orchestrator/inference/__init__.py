"""Trained models put to use: where they come from (`sources`), evaluation reports (`reports`), predictions
(`predict`) and exports (`export`). The evaluation job itself is each workload driver's (`orchestrator.drivers`)."""
