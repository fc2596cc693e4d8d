"""ConceptRef: one reference image, its mask, its prompt and its weight."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

MASK_THRESHOLD = 0.5  # a pixel / token is inside the mask when its value is >= 50 %
ASPECT_TOLERANCE = 0.02


class ConceptTooSmallError(ValueError):
    """A concept's mask covers no token of any MRSA layer: the concept would have no effect at all.
    ``index``: the concept's position in its concept set."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def image_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; 16-bit and 32-bit integer images are scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        arr = arr * 255.0 if arr.max() <= 1.0 else arr
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def mask_to_float(mask: Image.Image) -> np.ndarray:
    """A mask image of any mode to float32 (H, W) in [0, 1].

    Modes with an alpha band (RGBA, LA, PA, palette with transparency) use the alpha: a cut-out
    given as a mask means its opaque region. Grey levels are kept (thresholded later at 50 %).
    """
    if mask.mode == "P" and "transparency" in mask.info:
        mask = mask.convert("RGBA")
    if mask.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return np.asarray(mask.getchannel("A"), dtype=np.float32) / 255.0
    if mask.mode == "1":
        return np.asarray(mask, dtype=np.float32)
    if mask.mode.startswith("I;16"):
        return np.asarray(mask, dtype=np.float32) / 65535.0
    if mask.mode == "I":
        arr = np.asarray(mask, dtype=np.float32)
        return arr / (65535.0 if arr.max() > 255 else 255.0)
    if mask.mode == "F":
        arr = np.asarray(mask, dtype=np.float32)
        return np.clip(arr if arr.max() <= 1.0 else arr / 255.0, 0.0, 1.0)
    return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0


@dataclass(eq=False)
class ConceptRef:
    """One concept: image I_i, mask M_i (any mode, grey levels allowed), prompt P_i, weight w_i > 0.

    The mask may be of another size than the image if the aspect ratio is the same (within 2 %);
    it is resized to the generation size with nearest neighbour, and a pixel / token counts as
    inside when its value is >= 50 %.
    """

    image: Image.Image
    mask: Image.Image
    prompt: str
    weight: float = 3.0

    def __post_init__(self):
        if not isinstance(self.image, Image.Image):
            raise TypeError(f"ConceptRef.image: expected a PIL image, got {type(self.image).__name__}")
        if not isinstance(self.mask, Image.Image):
            raise TypeError(f"ConceptRef.mask: expected a PIL image, got {type(self.mask).__name__}")
        if not isinstance(self.prompt, str):
            raise TypeError(f"ConceptRef.prompt: expected a string, got {type(self.prompt).__name__}")
        try:
            weight = float(self.weight)
        except (TypeError, ValueError):
            raise TypeError(f"ConceptRef.weight: expected a number, got {self.weight!r}") from None
        if not math.isfinite(weight):
            raise ValueError(f"ConceptRef.weight={self.weight!r}: must be finite")
        if weight <= 0:
            raise ValueError(
                f"ConceptRef.weight={self.weight!r}: must be > 0; it is the logit bias on the concept's masked "
                "tokens (the release's weight 0 drops the concept: leave the concept out instead)"
            )
        self.weight = weight
        iw, ih = self.image.size
        mw, mh = self.mask.size
        if min(iw, ih, mw, mh) <= 0:
            raise ValueError(f"ConceptRef: empty image {self.image.size} or mask {self.mask.size}")
        if abs((iw / ih) / (mw / mh) - 1.0) > ASPECT_TOLERANCE:
            raise ValueError(
                f"ConceptRef.mask: size {mw}x{mh} has another aspect ratio than the image {iw}x{ih}"
            )
        self.image = image_to_rgb(self.image)
        if not (mask_to_float(self.mask) >= MASK_THRESHOLD).any():
            raise ValueError(
                f"ConceptRef.mask for {self.prompt!r} is empty: no pixel is >= 50 %; "
                "an empty mask would silently drop the concept"
            )

    @classmethod
    def from_rgba(cls, image: Image.Image, prompt: str, weight: float = 3.0) -> ConceptRef:
        """A cut-out with transparency: the alpha channel is the mask."""
        if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
            raise ValueError(f"ConceptRef.from_rgba: image mode {image.mode} has no alpha channel")
        return cls(image=image, mask=image.convert("RGBA").getchannel("A"), prompt=prompt, weight=weight)

    def mask_array(self) -> np.ndarray:
        """float32 (H, W) in [0, 1] at the mask's own size."""
        return mask_to_float(self.mask)

    def image_digest(self) -> str:
        h = hashlib.sha256(f"{self.image.size}".encode())
        h.update(np.ascontiguousarray(np.asarray(self.image)).tobytes())
        return h.hexdigest()

    def mask_digest(self) -> str:
        binary = self.mask_array() >= MASK_THRESHOLD
        h = hashlib.sha256(f"{binary.shape}".encode())
        h.update(np.packbits(binary).tobytes())
        return h.hexdigest()


def check_concepts(concepts, *, plain: str) -> list[ConceptRef]:
    """``concepts`` as a non-empty list of ``ConceptRef`` (``plain`` names what ``None`` gives instead)."""
    concepts = list(concepts)
    if not concepts:
        raise ValueError(f"references: an empty list of concepts; pass None for plain {plain}")
    for i, c in enumerate(concepts):
        if not isinstance(c, ConceptRef):
            raise TypeError(f"references[{i}]: expected ConceptRef, got {type(c).__name__}")
    return concepts
