"""Pipeline stages: Ray-free callable classes and functions, grouped by phase in the data's order.

    inputs/      a manifest row's inputs: paths and URLs read, images decoded, concept, control and subject records
    masks/       a mask per concept (file, alpha, SAM, detector + SAM), copy-paste composites, the concept-set id
    reference/   the diffusion model loaded, and reference K/V once per concept set
    generation/  a shard's work unit rendered with cached K/V: the shard's tar, metadata and errors
    scoring/     quality scores per sample (``run --score``), and the samples a threshold rejects
    output/      the output folder (every name in OUT, atomic writes), a shard's files and marker, the card

Shared by every phase, at this level: ``base`` (the row stage interface), ``errors`` (per-row errors
as data), ``params`` (the parameter set) and ``faults`` (fault injection for the reliability tests).
A phase imports these, the phases before it, and the output folder (``output.layout``,
``output.locations``, ``output.folder``), which every phase reads and writes OUT through.
``pipeline/plan.py`` wraps the stages with Ray Data and sets their resources; nothing here imports Ray.
"""
