"""The one error type every weight-loading failure raises, so CLIs can print it as one line."""


class CheckpointError(ValueError):
  """A checkpoint could not be read, or does not fit the model it is loaded into."""
