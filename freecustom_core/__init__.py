"""FreeCustom (CVPR 2024) for diffusers: multi-reference self-attention, references cached per concept set.

No Ray, no Parquet, no WebDataset here: this package is the algorithm, importable and testable alone.
"""

from .attention import LayerKV, MRSAProcessor, MRSAState, mrsa_installed
from .concept import ConceptRef
from .config import DEFAULT_NEGATIVE_PROMPT, MRSAConfig
from .generator import FreeCustomGenerator
from .kv import ReferenceKV, ReferenceKVError
from .layers import attention_blocks, select_layers

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "ConceptRef",
    "FreeCustomGenerator",
    "LayerKV",
    "MRSAConfig",
    "MRSAProcessor",
    "MRSAState",
    "ReferenceKV",
    "ReferenceKVError",
    "attention_blocks",
    "mrsa_installed",
    "select_layers",
]
