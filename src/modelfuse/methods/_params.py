"""Parameter types shared by several methods (one definition each, so their meaning and ranges agree)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from modelfuse.methods._registry import Param

TaskWeight = Annotated[Sequence[float], Param("weight of each task vector", per_model=True, default=1.0)]
MergedScale = Annotated[float, Param("scale of the merged task vector")]
DisjointMean = Annotated[bool, Param("disjoint mean (divide by the agreeing weights) instead of sum")]
WeightMean = Annotated[bool, Param("divide by the sum of the weights")]
RescaleL1 = Annotated[bool, Param("scale each sparsified task vector back to its L1 norm (mergekit's rescale); the "
                                  "tensor is then computed whole")]
