"""The five score names (evafusion_jax.models.score_names) and their users."""

import pytest

from evafusion_jax.data import feedback as fd
from evafusion_jax.models import score_names


def test_score_types_match_reward_model():
    rm = pytest.importorskip("evafusion_jax.models.reward_model")
    assert tuple(rm.SCORE_TYPES) == fd.SCORE_TYPES
    assert tuple(rm.HEATMAP_TYPES) == fd.HEATMAP_TYPES


def test_one_home_for_the_names_in_score_vector_order():
    from evafusion_jax.rl import grpo

    assert score_names.SCORE_TYPES == ("Thermal_Retention", "Texture_Preservation", "Artifacts",
                                       "Sharpness", "Overall_Score")
    assert [score_names.SCORE_COLUMNS[n] for n in score_names.DATASET_SCORE_NAMES] == list(
        score_names.SCORE_TYPES)
    assert (grpo.THERMAL, grpo.TEXTURE, grpo.ARTIFACTS, grpo.SHARPNESS) == score_names.SCORE_TYPES[:4]
    assert fd.SCORE_TYPES is score_names.SCORE_TYPES  # re-exported, not restated
