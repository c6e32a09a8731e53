"""sonossl: self-supervised representation learning for ultrasound video, as a versioned MLOps pipeline."""

__version__ = "0.1.0"
