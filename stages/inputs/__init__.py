"""Inputs and fetching: what a manifest row points at, read and checked before any model runs.

In: a row's concepts, control images and BLIP-Diffusion subject as the manifest writes them (paths
relative to the manifest or ``--root``, ``pyarrow.fs`` URIs, http(s) URLs) and the run's
``InputSettings``. Out: bytes read with retries and limits (``read``, ``http``), images decoded to
8-bit RGB or RGBA (``decode``), and the records later phases carry: ``ConceptSpec`` and
``ResolvedConcept`` (``concepts``), ``RowControl`` (``control``), ``RowSubject`` (``subject``).
Every failure is a ``RowError`` naming the manifest field.
"""
