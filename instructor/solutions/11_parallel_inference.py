def can_join(request, now, batch, max_batch, available_blocks, block_size):
    """True if the waiting `request` may join the batch at time `now`."""
    need = -(
        -(len(request.prompt) + request.max_new_tokens - 1) // block_size
    )  # ceil; the last token is never cached
    return request.arrival <= now and batch < max_batch and need <= available_blocks
