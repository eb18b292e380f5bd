"""Per-regime training recipes: the shared ``training`` block with ``training.overrides`` applied.

A supervised U-Net is not trained the way a ViT head is (its community trains it augmented
and at a higher learning rate); forcing the ViT recipe on it weakens the reference the
foundation models are measured against. ``training.overrides.<regime>`` replaces a few
keys for that regime's runs only. The effective block is what the regime's training rule
passes as params (rules/common.smk train_params), so an override reruns only that regime.
"""

from __future__ import annotations

from typing import Any

# What a regime may override, and what the run records as its recipe (run.json, runs.csv).
RECIPE_KEYS = ("lr", "weight_decay", "batch_size", "augment", "max_epochs", "patience", "grad_clip")
OVERRIDDEN = "overridden"  # key of the effective block naming the overridden keys (absent: none)


def training_for(training: dict[str, Any], regime: str) -> dict[str, Any]:
    """The training block ``regime``'s runs train under.

    Without an override for ``regime`` this is the shared block minus ``overrides``, key for
    key, so adding an override for one regime leaves every other regime's params unchanged.
    """
    overrides = dict((training.get("overrides") or {}).get(regime) or {})
    unknown = sorted(set(overrides) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(
            f"training.overrides.{regime}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(RECIPE_KEYS)}"
        )
    effective = {key: value for key, value in training.items() if key != "overrides"}
    if overrides:
        effective.update(overrides)
        effective[OVERRIDDEN] = sorted(overrides)
    return effective


def recipe_of(training: dict[str, Any]) -> dict[str, Any]:
    """A run's recipe for its record: the recipe keys of its effective block, and which were overridden."""
    return {
        **{key: training[key] for key in RECIPE_KEYS if key in training},
        OVERRIDDEN: list(training.get(OVERRIDDEN, [])),
    }


def recipe_text(recipe: dict[str, Any] | None) -> str:
    """One-line form for the tables' ``recipe`` column, e.g. ``lr=0.001 batch_size=4 augment=flips_rot90``."""
    if not recipe:
        return ""
    return " ".join(f"{key}={recipe[key]}" for key in RECIPE_KEYS if key in recipe)
