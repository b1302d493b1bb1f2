"""The learning-rate schedule every strategy trains with."""

from __future__ import annotations

import math


def warmup_cosine(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up over the first `warmup_ratio` of steps, then cosine decay to 0."""
    warmup_steps = max(1, round(total_steps * warmup_ratio))

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier
