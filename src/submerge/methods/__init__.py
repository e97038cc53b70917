"""Merge methods: one module per family, each method registered once under its public name."""

from submerge.methods import (  # noqa: F401  (register)
    adamerging, arcee_fusion, consensus, esm, esm_pp, linear, model_stock, passthrough, posterior, ram, sce, slerp, subspace,
    task_arithmetic,
)
from submerge.methods.registry import (
    MergeMethod,
    ModelPass,
    Param,
    TensorContext,
    get_method,
    list_methods,
    register_method,
)

__all__ = [
    "MergeMethod",
    "ModelPass",
    "Param",
    "TensorContext",
    "get_method",
    "list_methods",
    "register_method",
]
