"""Data layer: the sweep simulator, PyAV video I/O, raw-dataset validation and clip-dataset building."""
