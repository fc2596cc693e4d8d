"""Scoring: quality scores per sample, in the generation actor, before the shard is written.

In: the generation stage's rows (``generate.shard_row``) and the concept sets' final references
under ``references/``. Out: the same rows, each sample's metadata with ``scores`` (``score``: DINOv2,
CLIP-I, CLIP-T per concept and prompt; models in ``score_models``) and the samples a
``--min-score`` threshold rejects moved to ``rejected_tar`` / ``rejected_metas`` (``score_stage``).
"""
