"""Images: clean photographs, noise models, real-noise benchmarks, the TTAID data module."""
