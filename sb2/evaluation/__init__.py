"""Evaluation: the zero-shot COCO-2014 protocol (FID, precision/recall, CLIP score), HPSv2, the merge-λ sweep and
inference timing (paper 5.1, 7.1, 7.5)."""
