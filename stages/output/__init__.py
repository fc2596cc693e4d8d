"""Output: the output folder, and each shard stored in it with its marker written last.

In: the generation (or scoring) stage's rows, one per shard, and OUT (a local folder or an object
storage URI). Out: ``shards/NNNNN.tar`` + ``.parquet``, ``rejected/``, the done marker under
``_progress/`` (``write``), the dataset card (``card``). Every name in OUT is spelled in ``layout``,
reading a location in ``locations`` and every read and write of OUT goes through ``OutputFolder``
(``folder``); object storage is checked before a run (``storage_check``), and each node's view of a
local OUT by the probe every actor and write task checks (``probe``).
"""
