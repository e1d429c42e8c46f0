"""Train a CustomCrafter subject LoRA or VideoMaker's GIRL objective.

    python train.py --config configs/train_subject_lora.py --workdir runs/dog \
        --config.model=converted/ --config.data.dir=data/ [--config.key=value ...]

Config files are ml_collections configs (`get_config()`); any key can be overridden with
--config.key=value. Re-running the same command resumes from the newest checkpoint in --workdir.
Exit code 0: finished, or stopped cleanly by SIGTERM / `stop_after` (a checkpoint was saved);
1: stopped on a non-finite loss (the last good checkpoint is kept) or a bad config.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
  from absl import flags
  from ml_collections import config_flags

  argv = list(sys.argv if argv is None else [sys.argv[0], *argv])
  fv = flags.FlagValues()  # a private flag set: main() can be called more than once (tests)
  config_flags.DEFINE_config_file("config", None, "train config file", flag_values=fv, lock_config=True)
  flags.DEFINE_string("workdir", None, "output folder (checkpoints, metrics, final weights)", flag_values=fv)
  try:
    fv(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if fv.config is None or not fv.workdir:
    print("usage: train.py --config configs/X.py --workdir DIR [--config.key=value ...]", file=sys.stderr)
    return 2
  from vcjax.train.loop import run
  return run(fv.config, fv.workdir)


if __name__ == "__main__":
  sys.exit(main())
