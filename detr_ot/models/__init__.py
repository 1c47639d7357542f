"""Detection models: backbone, position encoding, transformers, DETR and Deformable DETR, post-processing."""

from detr_ot.models.backbone import Backbone, BackboneWeightsError, build_backbone
from detr_ot.models.deformable import DeformableDETR
from detr_ot.models.detr import DETR
from detr_ot.models.postprocess import PostProcess
from detr_ot.models.transformer import Transformer

__all__ = [
    "DETR", "Backbone", "BackboneWeightsError", "DeformableDETR", "PostProcess", "Transformer", "build_backbone",
]
