from minipar import comm


def allreduce_gradients(model):
    """Make every p.grad the average over the ranks, in place."""
    for p in model.parameters():
        comm.all_reduce(p.grad, op="avg")
