"""cosegment: training-free correspondences and co-segmentation of image collections from Stable Diffusion's
self-attention (cross self-attention).

The names below load on first use (PEP 562), so that `import cosegment` and the command-line tools' `--help` and
input checks do not import torch, diffusers or transformers; `from cosegment import X` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Every name of `__all__`, by the module (relative to this package) that defines it.
_EXPORTS = {
    "DEFAULT_MODEL_ID": ".pipeline_cosegment",
    "CoSegmentationFeatures": ".pipeline_cosegment",
    "CoSegmentationPipelineOutput": ".pipeline_cosegment",
    "PairAnalysis": ".pipeline_cosegment",
    "PairCorrespondence": ".pipeline_cosegment",
    "PassResult": ".pipeline_cosegment",
    "StableDiffusionCoSegmentationPipeline": ".pipeline_cosegment",
    "analyze_features": ".pipeline_cosegment",
    "analyze_pairs": ".pipeline_cosegment",
    "transfer_points": ".pipeline_cosegment",
    "SelectionThresholds": ".utils.correspondence",
    "argmax_matches": ".utils.correspondence",
    "attention_row_statistics": ".utils.correspondence",
    "cross_attention_probs": ".utils.correspondence",
    "inverse_mapping_entropy": ".utils.correspondence",
    "inverse_mapping_error": ".utils.correspondence",
    "mapping_density": ".utils.correspondence",
    "neighbourhood_spread": ".utils.correspondence",
    "paper_thresholds": ".utils.correspondence",
}

__all__ = [
    "CoSegmentationFeatures",
    "CoSegmentationPipelineOutput",
    "DEFAULT_MODEL_ID",
    "PairAnalysis",
    "PairCorrespondence",
    "PassResult",
    "SelectionThresholds",
    "StableDiffusionCoSegmentationPipeline",
    "analyze_features",
    "analyze_pairs",
    "argmax_matches",
    "attention_row_statistics",
    "cross_attention_probs",
    "inverse_mapping_entropy",
    "inverse_mapping_error",
    "mapping_density",
    "neighbourhood_spread",
    "paper_thresholds",
    "transfer_points",
]

if TYPE_CHECKING:
    from .pipeline_cosegment import (
        DEFAULT_MODEL_ID,
        CoSegmentationFeatures,
        CoSegmentationPipelineOutput,
        PairAnalysis,
        PairCorrespondence,
        PassResult,
        StableDiffusionCoSegmentationPipeline,
        analyze_features,
        analyze_pairs,
        transfer_points,
    )
    from .utils.correspondence import (
        SelectionThresholds,
        argmax_matches,
        attention_row_statistics,
        cross_attention_probs,
        inverse_mapping_entropy,
        inverse_mapping_error,
        mapping_density,
        neighbourhood_spread,
        paper_thresholds,
    )


def __getattr__(name: str):
    """Loads a public name's module on first use and keeps the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
