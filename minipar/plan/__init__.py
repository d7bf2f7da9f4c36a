"""The analytical side: formulas for parameters, FLOPs, memory and communication,
a hardware table, a step-time model and an auto-planner. Every formula names its source."""
from .memory import model_state_bytes

__all__ = ["model_state_bytes"]
