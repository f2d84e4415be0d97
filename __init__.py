"""cosegment: training-free correspondences and co-segmentation of image collections from Stable Diffusion's
self-attention (cross self-attention)."""

__version__ = "0.1.0"

from .pipeline_cosegment import (  # noqa: E402
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
from .utils.correspondence import (  # noqa: E402
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

__all__ = [
    "DEFAULT_MODEL_ID",
    "CoSegmentationFeatures",
    "CoSegmentationPipelineOutput",
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
