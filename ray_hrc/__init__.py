"""ray_hrc: distributed classification of full-resolution Hubble chips (galaxy vs nebula/star cluster) on Ray.

Data flows one way: FITS bytes -> chip (crop, bias) -> normalised tensor -> model -> probabilities -> catalog row.
Each stage is a plain function or small class (`chips`, `preprocess`, `models`, ...); Ray wires them together
(`data` for Ray Data ingestion, later training, classification and serving).
"""

__version__ = "0.1.0"
