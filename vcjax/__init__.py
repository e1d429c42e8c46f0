"""vcjax: customized video generation (AnimateDiff + VideoMaker + CustomCrafter) in pure JAX.

    import vcjax
    unet = vcjax.load_unet("converted/")   # from convert/animatediff.py
    eps = unet(latents, timesteps, context)   # (B, F, H, W, 4), (B,), (B, 77, 768)
"""

__version__ = "0.1.0"

# Before JAX's backend starts: keep XLA:CPU from miscompiling any program of this process (vcjax.compiler).
from vcjax import compiler as _compiler  # noqa: E402  (stdlib imports only; JAX is not started)

_compiler.install_cpu_workaround()

_LAZY = {"load_unet", "load_vae", "load_text_encoder", "load_tokenizer", "read_info"}


def __getattr__(name):
  # Loaders import flax/jax models; keep `import vcjax` itself light.
  if name in _LAZY:
    from vcjax import loading
    return getattr(loading, name)
  raise AttributeError(f"module 'vcjax' has no attribute {name!r}")
