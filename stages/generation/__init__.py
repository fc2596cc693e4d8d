"""Generation: a shard's targets rendered with MRSA over cached reference K/V, on a GPU actor.

In: one shard's ``WorkUnit`` (``units``: targets grouped by concept set and parameter set), the K/V
paths of its concept sets, and the run's options. Out: the shard itself (``generate.shard_row``):
its tar bytes, its samples' metadata and its errors; with the options, each sample's attention maps
and where each concept landed (``annotate``), the references inside the sample (``embed``), and
samples equal to a previous output's copied instead of rendered (``reuse``).
"""
