"""Training-free guidance energies for the sampler.

Each energy is a plain object, independent of Ray and of any diffusion model::

    energy(features: Tensor[B, D], frozen: Tensor[M, D] | None = None) -> Tensor  # 0-d, lower is better

built once per class from training features.  ``frozen`` holds features of the
already committed samples of the same class (greedy progressive matching); it
carries no gradient.  The sampler differentiates the returned scalar w.r.t.
x_t through its feature extractor.

* :mod:`.chamfer`    -- Chamfer guidance (paper 000).
* :mod:`.ot`         -- Sinkhorn OT distribution matching to K-means supports (paper 003).
* :mod:`.lowdensity` -- hardness / discriminator low-density guidance (paper 001).
* :mod:`.softlabel`  -- DMGD dynamic soft-label conditioning (paper 003); not an
  energy but a per-step conditioning embedding.
"""

from .chamfer import ChamferEnergy, chamfer_distance, pairwise_sq_dists, select_reference_indices, select_references
from .lowdensity import (
    FeatureDiscriminator,
    LowDensityEnergy,
    fit_class_gaussians,
    hardness,
    normalized_combination,
)
from .ot import (
    DMGD_OT_WINDOW,
    OTEnergy,
    cost_scale_from_features,
    in_ot_window,
    kmeans_support,
    partition_masses,
)
from .softlabel import (
    BETA_N,
    BETA_S,
    EXPLORE_FROM,
    REFINE_UNTIL,
    embedding_noise_std,
    pick_other_class,
    sigma_t,
    soft_label_embedding,
    soft_label_mean,
    soft_label_parts,
    stage,
)

__all__ = [
    "ChamferEnergy",
    "chamfer_distance",
    "pairwise_sq_dists",
    "select_references",
    "select_reference_indices",
    "OTEnergy",
    "kmeans_support",
    "cost_scale_from_features",
    "partition_masses",
    "in_ot_window",
    "DMGD_OT_WINDOW",
    "LowDensityEnergy",
    "FeatureDiscriminator",
    "fit_class_gaussians",
    "hardness",
    "normalized_combination",
    "soft_label_embedding",
    "soft_label_mean",
    "soft_label_parts",
    "pick_other_class",
    "sigma_t",
    "stage",
    "embedding_noise_std",
    "EXPLORE_FROM",
    "REFINE_UNTIL",
    "BETA_S",
    "BETA_N",
]
