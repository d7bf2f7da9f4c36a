def pick_layout():
    """Return dict(tp, pp, dp, zero_stage) for 13B on 16 H100s."""
    return dict(tp=2, pp=1, dp=8, zero_stage=1)  # TP inside a node; ZeRO-1 is enough at 13B
