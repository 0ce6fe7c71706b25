"""The optimizer of both trainers: AdamW after optional global-norm gradient clipping.

Each trainer supplies its learning-rate schedule (``reward_training.make_schedule``: the released
per-epoch cosine; ``grpo_training.make_optimizer``: warm-up + cosine decay) and builds the
optimizer with :func:`adamw`.
"""

from __future__ import annotations

import optax


def adamw(learning_rate: float | optax.Schedule, weight_decay: float = 0.0,
          grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
    """``optax.chain([clip_by_global_norm(grad_clip_norm),] adamw(learning_rate, weight_decay))``.

    AdamW with PyTorch's defaults (b1 0.9, b2 0.999, eps 1e-8, decoupled weight decay on every
    parameter); clipping only when ``grad_clip_norm > 0``. The optimizer state is always a
    ``chain`` tuple, one entry per transformation.
    """
    parts = []
    if grad_clip_norm and grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    parts.append(optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8,
                             weight_decay=weight_decay))
    return optax.chain(*parts)
