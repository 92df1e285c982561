"""What the Pallas GPU kernels (:mod:`.norm_kernels`, :mod:`.attention_kernel`) share: the Triton flavour of
Pallas (None in a jax without it) and a ``pallas_call``'s launch arguments under the names the installed jax
uses (jax 0.10 here, 0.11 on the GPU machine)."""

from __future__ import annotations

import inspect
from typing import Any, Optional

from jax.experimental import pallas as pl

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - a jax without the Triton backend: the XLA paths only
    plgpu = None

_NAMED = "name" in inspect.signature(pl.pallas_call).parameters  # kernel names show in GPU profiles


def launch(name: str, num_warps: int, interpret: bool, num_stages: Optional[int] = None) -> dict[str, Any]:
    """Keyword arguments of ``pl.pallas_call``: ``interpret``, the kernel's ``name``, and Triton's warps and
    stages (left to their defaults when interpreting, or when the installed jax spells them differently)."""
    kwargs: dict[str, Any] = {"interpret": interpret}
    if _NAMED:
        kwargs["name"] = name
    if interpret or plgpu is None:
        return kwargs
    settings = {"num_warps": num_warps, **({} if num_stages is None else {"num_stages": num_stages})}
    for class_name in ("CompilerParams", "TritonCompilerParams"):
        params = getattr(plgpu, class_name, None)
        if params is not None:
            try:
                kwargs["compiler_params"] = params(**settings)
                break
            except TypeError:  # pragma: no cover - other field names: the defaults
                pass
    return kwargs
