"""Domain analysis of backbone features: pure functions on numpy arrays, no torch.

Does a backbone's feature space separate EM datasets? Fréchet distances (with shrinkage,
PCA, bootstrap intervals and a permutation null), a linear dataset probe, Mahalanobis
out-of-distribution fractions and 2-D embeddings, each reported with its sample counts.
"""

from .domain import analyse_domains, frechet_variants, sample_patch_tokens
from .embedding import pca_2d, umap_2d
from .frechet import (
    effective_dim,
    frechet_bootstrap,
    frechet_distance,
    frechet_gaussian,
    frechet_permutation,
)
from .ood import mahalanobis_ood
from .probe import dataset_probe

__all__ = [
    "analyse_domains",
    "dataset_probe",
    "effective_dim",
    "frechet_bootstrap",
    "frechet_distance",
    "frechet_gaussian",
    "frechet_permutation",
    "frechet_variants",
    "mahalanobis_ood",
    "pca_2d",
    "sample_patch_tokens",
    "umap_2d",
]
