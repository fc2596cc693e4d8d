"""Reference K/V: the diffusion model loaded, and the references' keys and values once per concept set.

In: resolved concept sets (``ResolvedConcept`` rows named by their concept-set id) with their
parameter set, and ``--model`` (its family, run defaults and row rules in ``family``; loading and
LoRA switching in ``models``, which generation loads the model through too). Out: a ``ReferenceKV``
safetensors file per concept set in the run's store or ``--kv-cache``, and its path per row
(``reference_kv``).
"""
