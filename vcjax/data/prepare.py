"""Build a training dataset (tfds array_record, no TensorFlow) from a folder; layouts in builders.py.

    python -m vcjax.data.prepare subject --src my_dog/ --data-dir data/ [--name dog] [--image-size 512]
    python -m vcjax.data.prepare videos --src clips/ --data-dir data/ [--frames 16 --stride 8 | --window 64]
        [--size 512]

Then train with `--config.data.kind=folder --config.data.dir=data/ --config.data.dataset=<printed name>`.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="Build a vcjax training dataset from a folder.")
  p.add_argument("kind", choices=("subject", "videos"))
  p.add_argument("--src", required=True, help="the source folder (see vcjax/data/builders.py)")
  p.add_argument("--data-dir", required=True, help="where the tfds dataset is written")
  p.add_argument("--name", default=None, help="dataset config name (default: the kind)")
  p.add_argument("--image-size", type=int, default=512, help="subject images / references: square side")
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--stride", type=int, default=8, help="frame stride (CelebV-Text-like)")
  p.add_argument("--window", type=int, default=0, help="if > 0: frames evenly over this window (VideoBooth)")
  p.add_argument("--size", type=int, default=512, help="video frame side")
  p.add_argument("--pool-frames", type=int, default=0,
                 help="frames stored per clip, each read draws its window from them (0: auto; <= --frames: "
                      "one fixed window)")
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  from vcjax.data import builders
  try:
    if args.kind == "subject":
      info = builders.prepare_subject_dataset(args.src, args.data_dir, args.name or "subject",
                                              image_size=args.image_size, overwrite=args.overwrite)
    else:
      info = builders.prepare_video_dataset(
          args.src, args.data_dir, args.name or "videos", num_frames=args.frames, frame_stride=args.stride,
          sampling="window" if args.window else "stride", window=args.window or 64,
          size=(args.size, args.size), reference_size=args.image_size, pool_frames=args.pool_frames,
          overwrite=args.overwrite)
  except (ValueError, OSError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  print(json.dumps({"dataset": info["dataset"], "splits": info["splits"],
                    "skipped": {k: v["skipped"] for k, v in info["stats"].items()}}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
