"""Training regimes: what each one trains, what it reads, what its checkpoint holds, declared once.

Torch-free, like ``families``: the Snakefile, the grid, training, evaluation and the
parameter table all read ``REGIMES`` instead of keeping their own lists of regime names.
"""

from __future__ import annotations

from dataclasses import dataclass

from em_foundation.families import family_of


@dataclass(frozen=True)
class Regime:
    name: str
    cached: bool  # trains on the feature cache; the backbone never runs during training
    trains_backbone: bool  # (part of) the backbone trains, so evaluation rebuilds it from its weights
    trains: tuple[str, ...]  # torch parts whose parameters train: backbone, adapters, head (none: a forest)
    checkpoint: str  # what model.pt holds, for readers of the files
    rule: str  # the Snakemake rule that trains it
    blocks: tuple[str, ...]  # config blocks the training rule passes as params
    # also reads the tiles' pixels at full resolution (beside the cache where ``cached``):
    # training and evaluation feed the model pixels, and tokens where ``reads_tokens``
    pixels: bool = False


REGIMES: dict[str, Regime] = {
    regime.name: regime
    for regime in (
        Regime(
            "head",
            cached=True,
            trains_backbone=False,
            trains=("head",),
            rule="train_head",
            blocks=("head", "training"),
            checkpoint="deconvolution head state (and the token standardisation it was trained with)",
        ),
        Regime(
            "lora",
            cached=False,
            trains_backbone=True,
            trains=("adapters", "head"),
            rule="train_lora",
            blocks=("backbone", "head", "lora", "training"),
            checkpoint="LoRA adapters and head state; the frozen backbone comes from its weights",
        ),
        Regime(
            "fullft",
            cached=False,
            trains_backbone=True,
            trains=("backbone", "head"),
            rule="train_fullft",
            blocks=("backbone", "head", "training"),
            checkpoint="every backbone parameter and the head state",
        ),
        Regime(
            # A family whose builder is a whole segmenter (families.Family.segmenter: the U-Net),
            # trained end to end from tiles: its encoder is the "backbone", its decoder the "head".
            "supervised",
            cached=False,
            trains_backbone=True,
            trains=("backbone", "head"),
            rule="train_supervised",
            blocks=("backbone", "training"),
            checkpoint="every parameter of the family's segmenter (U-Net encoder, decoder and output layer)",
        ),
        Regime(
            "forest",
            cached=True,
            trains_backbone=False,
            trains=(),
            rule="train_forest",
            blocks=("forest",),
            checkpoint="pickled scikit-learn random forest on cached tokens",
        ),
        Regime(
            "pixelforest",
            cached=True,
            trains_backbone=False,
            trains=(),
            rule="train_pixelforest",
            blocks=("pixelforest",),
            checkpoint="pickled scikit-learn random forest on per-pixel features, with its feature spec and calibration",
            pixels=True,
        ),
    )
}

CACHED_REGIMES: tuple[str, ...] = tuple(name for name, regime in REGIMES.items() if regime.cached)
BACKBONE_REGIMES: tuple[str, ...] = tuple(name for name, regime in REGIMES.items() if regime.trains_backbone)


PIXEL_REGIMES: tuple[str, ...] = tuple(name for name, regime in REGIMES.items() if regime.pixels)


def reads_tokens(regime: str, family: str) -> bool:
    """Whether a run of ``regime`` on a backbone of ``family`` reads the feature cache.

    A cached regime does, except a per-pixel one on a family whose tokens are pooled
    per-pixel features (the filter bank): it recomputes those at full resolution instead.
    """
    row = regime_of(regime)
    return row.cached and not (row.pixels and family_of(family).pooled_pixel_features)


def regime_of(name: str) -> Regime:
    try:
        return REGIMES[name]
    except KeyError:
        raise KeyError(f"unknown regime {name!r}; regimes: {', '.join(REGIMES)}") from None
