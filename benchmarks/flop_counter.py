"""FLOPs of one call, as ``stablerep-bench flops`` counts them (``torch.utils.flop_counter``: 2 x
multiply-adds of every matmul, convolution and attention call); shared by the model and the recipe counts."""
from __future__ import annotations


def count_flops(fn) -> tuple[int, dict[str, int]]:
    """Run ``fn()`` under FlopCounterMode; (total FLOPs, FLOPs by aten op name)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    by_op = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op
