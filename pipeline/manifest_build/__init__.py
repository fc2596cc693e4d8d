"""``freecustom-pipeline manifest build``: a declarative spec (pools, compositions, prompt templates) to
a manifest whose row ids stay put from one build to the next. See ``docs/manifest-build.md``."""

from .build import BuildOptions, build_manifest, format_row
from .spec import BuildError, load_spec

__all__ = ["BuildError", "BuildOptions", "build_manifest", "format_row", "load_spec"]
