"""Model-independent math of the compression: factorization and rank allocation."""
from palu_fx.compress.allocate import (
    MatrixStats,
    allocate,
    allocate_energy,
    allocate_fisher,
    allocate_uniform,
    energy_weighting,
    fisher_scores,
)
from palu_fx.compress.factorize import (
    DEFAULT_GRAD_DAMP,
    Decomposition,
    decompose,
    factorize,
    reconstruction_error,
    singular_values,
)

__all__ = [
    "DEFAULT_GRAD_DAMP",
    "Decomposition",
    "MatrixStats",
    "allocate",
    "allocate_energy",
    "allocate_fisher",
    "allocate_uniform",
    "decompose",
    "energy_weighting",
    "factorize",
    "fisher_scores",
    "reconstruction_error",
    "singular_values",
]
