import math

import torch


def fp8_fake_quant(x, amax_history, fmt):
    """x rounded through FP8 with delayed per-tensor scaling."""
    dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    top = torch.finfo(dtype).max
    amax = max(amax_history)
    s = 2.0 ** math.floor(math.log2(top / amax)) if amax > 0 else 1.0
    return (x * s).clamp(-top, top).to(dtype).to(x.dtype) / s
