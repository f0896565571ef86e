"""Model-independent math of the compression: factorization and rank allocation."""
from palu_fx.compress.allocate import (
    MatrixStats,
    allocate,
    allocate_energy,
    allocate_fisher,
    allocate_uniform,
    fisher_scores,
)
from palu_fx.compress.factorize import Decomposition, decompose, factorize, reconstruction_error, singular_values

__all__ = [
    "Decomposition",
    "MatrixStats",
    "allocate",
    "allocate_energy",
    "allocate_fisher",
    "allocate_uniform",
    "decompose",
    "factorize",
    "fisher_scores",
    "reconstruction_error",
    "singular_values",
]
