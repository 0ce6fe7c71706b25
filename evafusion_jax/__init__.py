"""evafusion_jax: EVAFusion (human-preference aligned infrared/visible image fusion) in JAX/Flax."""

__version__ = "0.1.0"
