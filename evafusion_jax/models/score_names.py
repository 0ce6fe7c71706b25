"""The five human quality scores and the artifact heatmap: one home for their names, order, scale.

Every ``(5,)`` score vector in the project (feedback-set labels, the reward model's score heads,
reward metrics, ``score``'s CSV, the GRPO reward) uses the order of :data:`SCORE_TYPES`. Pure
Python (no JAX), so data readers can import it without pulling in the model.
"""

from __future__ import annotations

#: Score names as the feedback datasets spell them -> names of the reward model's score heads.
SCORE_COLUMNS: dict[str, str] = {
    "Thermal Retention": "Thermal_Retention",
    "Texture Preservation": "Texture_Preservation",
    "Artifacts": "Artifacts",
    "Sharpness": "Sharpness",
    "Overall Score": "Overall_Score",
}
#: The dataset spellings, in score-vector order.
DATASET_SCORE_NAMES: tuple[str, ...] = tuple(SCORE_COLUMNS)
#: The reward model's score-head names, in score-vector order.
SCORE_TYPES: tuple[str, ...] = tuple(SCORE_COLUMNS.values())
THERMAL, TEXTURE, ARTIFACTS, SHARPNESS, OVERALL = SCORE_TYPES
#: The reward model's heatmap-head names.
HEATMAP_TYPES: tuple[str, ...] = ("artifact_heatmap",)
HEATMAP = HEATMAP_TYPES[0]
#: The human scale of every score (the model predicts score / SCORE_MAX).
SCORE_MIN, SCORE_MAX = 1.0, 5.0
