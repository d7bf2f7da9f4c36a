from minipar import plan


def memory_per_gpu(psi, layers, hidden, heads, seq, micro_batch, tp, pp, dp, zero_stage, recompute):
    """Bytes on the first pipeline stage's GPU under 1F1B with TP + SP."""
    states = plan.model_state_bytes(psi / (tp * pp), dp, zero_stage)
    per_layer = plan.activation_bytes_per_layer(
        seq, micro_batch, hidden, heads, tp, sequence_parallel=True, recompute=recompute
    )
    return states + layers / pp * pp * per_layer  # l/p layers x p micro-batches in flight on stage 0
