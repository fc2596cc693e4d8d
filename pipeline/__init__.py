"""The product around the engine: manifest, plan (Ray Data), CLI. ``freecustom-pipeline --help``."""
