"""The analytical side: formulas for parameters, FLOPs, memory and communication,
a hardware table, a step-time model and an auto-planner. Every formula names its source.

    from minipar import plan
    plan.num_params(96, 12288, 51200, 2048)              # GPT-3: 174.6e9
    plan.estimate(96, 12288, 96, 51200, 2048, 1536, 1, 1024, "a100", tp=8, pp=8).tflops_per_gpu
    print(plan.plan("70b", gpus=64, gpu="h100"))         # or: python -m minipar.plan --model 70b
"""
from .estimate import ASSUMPTIONS, Assumptions, Estimate, estimate, memory_breakdown, stage_params
from .formulas import (activation_bytes_per_gpu, activation_bytes_per_layer, comm_bytes,
                       context_parallel_layer_bytes, hardware_flops, in_flight_microbatches, mfu, model_flops, num_params)
from .hardware import GPU, GPUS, LINKS, Link, add_gpu, add_link, get_gpu, get_link
from .memory import model_state_bytes
from .pipeline import pipeline_makespan, simulator_available
from .planner import MODELS, ModelShape, Plan, get_model, plan
from .retime import event_cost, retime

__all__ = ["num_params", "model_flops", "hardware_flops", "mfu", "activation_bytes_per_layer",
           "activation_bytes_per_gpu", "context_parallel_layer_bytes", "in_flight_microbatches", "comm_bytes",
           "model_state_bytes", "GPU", "Link", "GPUS", "LINKS", "add_gpu", "add_link", "get_gpu", "get_link",
           "Assumptions", "ASSUMPTIONS", "Estimate", "estimate", "memory_breakdown", "stage_params",
           "pipeline_makespan", "simulator_available", "MODELS", "ModelShape", "Plan", "get_model", "plan",
           "retime", "event_cost"]
