"""Convert PyTorch AnimateDiff weights (SD1.5 base + motion module [+ LoRAs]) into a vcjax model folder.

    python convert/animatediff.py --base PATH --motion-module PATH [--lora PATH[:SCALE] ...] \
        [--norm-semantics original|diffusers] [--version v1|v2|v3] [--tokenizer DIR] \
        [--unet-weights PATH ...] [--base-config DIR] [--motion-heads N] [--dtype float32|float16|bfloat16] \
        --out DIR

--base: a diffusers model folder (unet/, vae/, text_encoder/, tokenizer/) or an LDM single file
(.safetensors/.ckpt). --motion-module: an original AnimateDiff .ckpt/.safetensors or a diffusers
MotionAdapter (folder or file); optional when the base already holds motion modules. --unet-weights:
full-UNet state dicts in diffusers naming applied over the result (VideoMaker's released weights).
No torch needed: pickles are read by vcjax's restricted unpickler.
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--base", required=True)
  p.add_argument("--motion-module", default=None)
  p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]")
  p.add_argument("--unet-weights", action="append", default=[], metavar="PATH")
  p.add_argument("--norm-semantics", choices=("original", "diffusers"), default=None,
                 help="GroupNorm statistics; default: original for original motion modules, else diffusers")
  p.add_argument("--version", choices=("v1", "v2", "v3"), default=None,
                 help="motion module version; default: detected from the keys and the pe shape")
  p.add_argument("--motion-heads", type=int, default=None,
                 help="attention heads of the motion module; original checkpoints do not record it "
                      "(default: a MotionAdapter's config, else AnimateDiff's 8)")
  p.add_argument("--tokenizer", default=None, help="tokenizer folder (single-file bases carry none)")
  p.add_argument("--base-config", default=None,
                 help="diffusers folder whose unet/vae/text_encoder config.json describe a single-file base "
                      "that is not SD1.5-shaped (default: SD1.5)")
  p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
  p.add_argument("--out", required=True)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from vcjax.conversion import save_converted
  from vcjax.weights.bundle import assemble
  from vcjax.weights.errors import CheckpointError

  start = time.time()
  try:
    loras = ()
    if args.lora:
      from vcjax.weights.lora_files import parse_lora_arg
      loras = tuple(parse_lora_arg(s) for s in args.lora)
    bundle = assemble(args.base, args.motion_module, tokenizer=args.tokenizer, config_dir=args.base_config,
                    loras=loras,
                    unet_weights=tuple(args.unet_weights), version=args.version,
                    semantics=args.norm_semantics, motion_heads=args.motion_heads)
    info = save_converted(bundle, args.out, dtype=args.dtype, log=print)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  i = info["info"]
  print(f"motion module {i['version']} ({i['motion_source']}), norm semantics {i['semantics']}; "
        f"wrote {args.out} in {time.time() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
