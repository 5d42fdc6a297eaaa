"""avjax: audio-visual speech models in JAX/Flax."""
