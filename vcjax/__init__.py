"""vcjax: customized video generation (AnimateDiff + VideoMaker + CustomCrafter) in pure JAX."""

__version__ = "0.1.0"
