"""Building blocks shared by every vcjax model."""
