"""Pipeline stages: Ray-free callable classes and functions, one module per stage.

``segment`` (masks), ``composite`` (copy-paste context references), ``reference_kv``
(reference keys/values once per concept set), ``generate`` (customized images) and
``write`` (WebDataset shards). ``pipeline/plan.py`` wraps them with Ray Data and sets
their resources; nothing here imports Ray.
"""
