"""Pipeline parallelism: schedules as data, one simulator, one executor.

build_schedule(name, num_ranks, num_microbatches, num_chunks=1) -> Schedule   (schedules.py)
validate(schedule) -> lowered schedule, or ScheduleError                       (validate.py)
lower(schedule) -> {rank: actions with SEND/RECV}                              (lower.py)
simulate(schedule, t_f=1.0, t_b=2.0, t_w=None, t_comm=0.0) -> SimResult        (simulate.py)
balance_stages(costs, num_stages) -> layers per stage (Alpa's pass, one chain)  (partition.py)
check_config(schedule, cfg, batch_size)   raises ValueError before launch       (runtime.py)
train_pipeline(schedule, cfg, steps, batch_size, seed, recompute)  under launch (runtime.py)
train_pipedream(schedule, cfg, mb_size, seed)                      under launch (pipedream.py)
"""

from .actions import Action, Schedule, parse_action
from .lower import lower
from .partition import balance_stages, layer_costs, stage_costs
from .pipedream import pipedream_reference, train_pipedream, versions_used
from .runtime import check_config, train_pipeline
from .schedules import SCHEDULES, build_schedule
from .simulate import SimResult, simulate
from .validate import ScheduleError, validate

__all__ = [
    "Action",
    "Schedule",
    "SCHEDULES",
    "build_schedule",
    "parse_action",
    "lower",
    "validate",
    "ScheduleError",
    "simulate",
    "balance_stages",
    "layer_costs",
    "stage_costs",
    "SimResult",
    "check_config",
    "train_pipeline",
    "train_pipedream",
    "pipedream_reference",
    "versions_used",
]
