"""detr_ot: DETR with swappable label assignment and ranking losses."""

__version__ = "0.1.0"
