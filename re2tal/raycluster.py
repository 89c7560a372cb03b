"""Connecting to the Ray cluster a command runs on: the one `ray job submit` names
(RAY_ADDRESS), else a local Ray for the debug mode; and actors that must stay on the driver's node."""

from __future__ import annotations

import logging
import os


def init_ray(verbose: bool = False) -> None:
    """Connect to the cluster this job runs on (RAY_ADDRESS, set by `ray job submit`), else start
    a local Ray. Unless `verbose`, Ray's notes about itself stay off the terminal (re2tal.console)."""
    import ray

    from re2tal import console

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True,
                 logging_level=logging.INFO if verbose else logging.WARNING)
        if not verbose:
            console.filter_worker_output()


def driver_queue():
    """A Ray queue whose actor lives on this (the driver's) node: a zero-CPU actor may otherwise
    be placed on any node, and dies with it, taking the restarted workers down with it."""
    import ray
    import ray.util.queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.util.queue.Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
