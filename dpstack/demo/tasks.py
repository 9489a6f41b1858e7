"""`dpstack demo --task T`: the per-task facts, one row per task.

A row says which shipped config trains the task's policy, how many scripted
demonstrations to collect, how many held-out episodes each sampler gets and
from which seed, and which RTI refinement list its package names. Everything
else (network, steps, batch, learning rate, gripper scale, cameras) is the
config's. Adding a task is adding a row.
"""
from __future__ import annotations

from dataclasses import dataclass

from dpstack.runtime.samplers import DEFAULT_RTI
from dpstack.sim.evaluate import DEFAULT_SEED_BASE


@dataclass(frozen=True)
class DemoTask:
    task: str                       # registered simulated task (sim/tasks.py)
    train_config: str               # shipped policy/configs/<name>.yaml
    episodes: int = 200             # scripted-expert demonstrations to collect
    recovery: float = 0.0           # fraction of them that show a retry after a missed grasp
    train_steps: int | None = None  # None: the config's train.steps
    eval_episodes: int = 50         # held-out episodes per sampler
    seed_base: int = DEFAULT_SEED_BASE  # first evaluation seed (raised above every collection seed)
    rti_default: str = DEFAULT_RTI  # the RTI refinement list bare `rti` runs with (dpstack export --rti-default)


DEMO_TASKS: dict[str, DemoTask] = {
    # Lift: 1000 of the config's 2000 steps and 20 episodes keep `make demo` near 15 minutes on 2 cores.
    "lift": DemoTask("lift", "lift_state_small", train_steps=1000, eval_episodes=20),
    # Their policies' failures are missed grasps that they never retry (docs/evaluation.md).
    "can": DemoTask("can", "can_state_small", recovery=0.25),
    "stack": DemoTask("stack", "stack_state_small", recovery=0.25),
    "square": DemoTask("square", "square_state_small"),
    # Lift and Can from the agentview and wrist cameras: the configs' 20,000 steps, with retry
    # demonstrations; without them Lift's DDPM-100 missed a grasp and never retried (docs/evaluation.md).
    # Lift's camera policy solved 100/100 with RTI from level 20 against 94/100 from 40.
    "lift_image": DemoTask("lift", "lift_image_small", recovery=0.25, rti_default="rti-renoise-20,10,0"),
    "can_image": DemoTask("can", "can_image_small", recovery=0.25),
}


def demo_task(name: str) -> DemoTask:
    """The row for `name`, checked: its task has a scripted expert and its config is shipped.
    ValueError in one sentence otherwise (the user typed the name)."""
    from dpstack.policy.config import load_config
    from dpstack.sim.tasks import get_task

    try:
        row = DEMO_TASKS[name]
    except KeyError:
        raise ValueError(f"no demo for task {name!r}; demos: {', '.join(DEMO_TASKS)}") from None
    get_task(row.task).expert_class()  # names the tasks that have an expert
    load_config(row.train_config)      # names the shipped configs
    return row
