"""Trained models put to use: where they come from (`sources`), evaluation reports (`reports`), predictions
(`predict`) and exports (`export`). The evaluation jobs themselves are in `orchestrator.jobs`."""
