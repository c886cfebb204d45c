"""System metrics of the nodes a Ray Train run uses, started from inside its workers (any workload)."""
from __future__ import annotations


def start_system_metrics(recorder):
    """Start `recorder` (see TrainConfig.system_metrics) on each node's local rank 0; returns it, or None."""
    import ray.train

    if recorder is None:
        return None
    ctx = ray.train.get_context()
    if ctx.get_local_rank() != 0:
        return None
    several_nodes = ctx.get_local_world_size() < ctx.get_world_size()
    recorder.start(node_id=f"node{ctx.get_node_rank()}" if several_nodes else None)
    return recorder
