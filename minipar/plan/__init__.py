"""The analytical side: formulas for parameters, FLOPs, memory and communication,
a hardware table, cluster topologies, a step-time model and an auto-planner. Every formula names its source.

    from minipar import plan
    plan.num_params(96, 12288, 51200, 2048)              # GPT-3: 174.6e9
    plan.estimate(96, 12288, 96, 51200, 2048, 1536, 1, 1024, "a100", tp=8, pp=8).tflops_per_gpu
    plan.estimate(126, 16384, 128, 128256, 8192, 2048, 1, 8192, "h100", tp=8, pp=16, v=4,   # Llama 3 405B
                  **plan.MODELS["llama3-405b"].arch_kwargs())
    print(plan.plan("llama3-70b", gpus=64, gpu="h100"))  # or: python -m minipar.plan --model llama3-70b
"""

from .arch import ARCH_FIELDS, MODELS, ModelShape, get_model
from .estimate import ASSUMPTIONS, Assumptions, Estimate, estimate, memory_breakdown, stage_params
from .formulas import (
    activation_bytes_per_gpu,
    activation_bytes_per_layer,
    comm_bytes,
    context_parallel_layer_bytes,
    hardware_flops,
    in_flight_microbatches,
    mfu,
    model_flops,
    num_params,
)
from .hardware import GPU, GPUS, LINKS, Link, add_gpu, add_link, get_gpu, get_link
from .memory import model_state_bytes
from .pipeline import PIPELINE_SCHEDULES, pipeline_makespan, simulator_available
from .planner import Plan, plan
from .retime import event_cost, retime
from .topology import TOPOLOGIES, Topology, add_topology, collective_time, get_topology

__all__ = [
    "num_params",
    "model_flops",
    "hardware_flops",
    "mfu",
    "activation_bytes_per_layer",
    "activation_bytes_per_gpu",
    "context_parallel_layer_bytes",
    "in_flight_microbatches",
    "comm_bytes",
    "model_state_bytes",
    "GPU",
    "Link",
    "GPUS",
    "LINKS",
    "add_gpu",
    "add_link",
    "get_gpu",
    "get_link",
    "Assumptions",
    "ASSUMPTIONS",
    "Estimate",
    "estimate",
    "memory_breakdown",
    "stage_params",
    "pipeline_makespan",
    "simulator_available",
    "PIPELINE_SCHEDULES",
    "MODELS",
    "ModelShape",
    "ARCH_FIELDS",
    "Plan",
    "get_model",
    "plan",
    "retime",
    "event_cost",
    "Topology",
    "TOPOLOGIES",
    "add_topology",
    "get_topology",
    "collective_time",
]
