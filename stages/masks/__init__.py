"""Masks and composites: every concept of a concept set gets its final reference image and mask.

In: a concept group's ``ConceptSpec`` rows (images and masks by path, box or points prompts, labels,
``context`` recipes). Out: ``ResolvedConcept`` rows, one per concept, with a binary mask and its
source (``segment``: file > alpha > SAM > detector + SAM, cleaned by ``morphology``, models in
``segment_models``), objects pasted onto their carriers (``composite``, one paste in ``paste``),
the concept set's content hash (``identity``) and its previews under ``references/`` (``previews``).
"""
