"""The papers' evaluation protocol in one command: sample every evaluation prompt for each reference image
(and seed) with sample.py's `run(cfg)`, then score the videos with `vcjax.eval`.

    python -m vcjax.eval.protocol --config configs/sample_videomaker.py --config.model=converted/ \
        --references refs/ --prompts human --clip clip-vit-base-patch32/ --dino dino-vits16/ \
        --raft raft-things.pth --out runs/eval_videomaker/

Prompts: `human` (VideoMaker's 25), `object` (its 90, `--category bear` for one class) or a .tsv / .txt
path. Seeds: `config.seed` and the next `--num_seeds - 1` (the paper: 42 only). A config with a
`reference` (VideoMaker) gets each reference image as its sampling reference; one without (AnimateDiff,
CustomCrafter) samples from the prompt alone and the references are only scored against. Writes
`OUT/videos/<reference stem>_<i>.mp4` (+ sample.py's JSON sidecars) and `OUT/results.json`.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys

from absl import app, flags

_DATA = os.path.join(os.path.dirname(__file__), "data")
PROMPT_SETS = {"human": os.path.join(_DATA, "prompts_human.tsv"),
               "object": os.path.join(_DATA, "prompts_object.tsv")}

flags.DEFINE_string("references", None, "folder of reference images (one subject each)")
flags.DEFINE_string("prompts", "human", "human, object, or a prompts .tsv (a 'prompt' column) / .txt file")
flags.DEFINE_string("category", "", "with a .tsv: only the rows of this category (e.g. bear)")
flags.DEFINE_integer("limit", 0, "use only the first N prompts (0: all)")
flags.DEFINE_integer("num_seeds", 1, "seeds config.seed, config.seed + 1, ...")
flags.DEFINE_string("clip", None, "transformers CLIPModel folder")
flags.DEFINE_string("dino", None, "transformers ViTModel folder")
flags.DEFINE_string("raft", None, "RAFT checkpoint (raft-things.pth)")
flags.DEFINE_enum("dd_threshold", "authors", ["authors", "vbench"], "dynamic-degree threshold")
flags.DEFINE_string("out", "eval_run", "output folder")
FLAGS = flags.FLAGS


def read_prompt_set(spec: str, category: str = "", limit: int = 0) -> list[str]:
  """The evaluation prompts: a named set or a file (.tsv with a header naming `prompt`, else one per line)."""
  path = PROMPT_SETS.get(spec, spec)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such prompts file (named sets: {', '.join(PROMPT_SETS)})")
  with open(path, encoding="utf-8") as f:
    if path.endswith(".tsv"):
      rows = list(csv.DictReader(f, delimiter="\t"))
      if not rows or "prompt" not in rows[0]:
        raise ValueError(f"{path}: a .tsv needs a header with a 'prompt' column")
      prompts = [r["prompt"].strip() for r in rows if not category or r.get("category") == category]
    else:
      prompts = [line.strip() for line in f if line.strip()]
  prompts = [p for p in prompts if p]
  if not prompts:
    raise ValueError(f"{path}: no prompts" + (f" of category {category!r}" if category else ""))
  return prompts[:limit] if limit else prompts


def _sample_module():
  """sample.py (the repository's sampling script), imported once from beside the vcjax package. Its
  `--config` flag (a configs/sample_*.py file) is this command's too."""
  name = "vcjax_sample_script"
  if name in sys.modules:
    return sys.modules[name]
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "sample.py")
  if not os.path.isfile(path):
    raise ImportError(f"{path}: sample.py not found beside the vcjax package")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


_SAMPLE = _sample_module()


def sample_all(cfg, references: list[str], prompts: list[str], num_seeds: int, out: str) -> dict[str, list[str]]:
  """One sample.py run per reference image (all prompts x seeds in its batch). -> {video: [reference]}."""
  sample = _SAMPLE
  feed = bool(cfg.reference)  # the method conditions on the reference (VideoMaker)
  prompt_file = os.path.join(out, "prompts.txt")
  os.makedirs(os.path.join(out, "videos"), exist_ok=True)
  with open(prompt_file, "w", encoding="utf-8") as f:
    f.write("\n".join(prompts) + "\n")
  made = {}
  for ref in references:
    c = cfg.copy_and_resolve_references()
    c.unlock()
    c.prompt_file, c.num_videos, c.gif = prompt_file, num_seeds, False
    c.reference = ref if feed else ""
    c.output = os.path.join(out, "videos", os.path.splitext(os.path.basename(ref))[0] + ".mp4")
    for path in sample.run(c):
      if path.endswith(".mp4"):
        made[path] = [ref]
  return made


def main(argv):
  del argv
  import logging
  logging.getLogger("jax").setLevel(logging.WARNING)  # as sample.py: no INFO line about absent backends
  from tqdm import tqdm

  from vcjax import media
  from vcjax.eval import inputs
  from vcjax.eval.__main__ import format_table, load_models
  from vcjax.eval.score import Scorer
  from vcjax.weights.errors import CheckpointError
  try:
    if not FLAGS.references:
      raise ValueError("--references is required (a folder of reference images)")
    references = media.list_images(FLAGS.references)
    if not references:
      raise ValueError(f"{FLAGS.references}: no reference images")
    prompts = read_prompt_set(FLAGS.prompts, FLAGS.category, FLAGS.limit)
    models = load_models(FLAGS)  # before sampling: a bad model path fails in seconds, not after hours
    if not models:
      raise ValueError("no model given: pass at least one of --clip, --dino, --raft")
    made = sample_all(FLAGS.config, references, prompts, FLAGS.num_seeds, FLAGS.out)  # sample.py's --config
    scorer = Scorer(**models, dd_threshold=FLAGS.dd_threshold)
    result = scorer.score(sorted(made), reference_map=made,
                          progress=lambda total: tqdm(total=total, desc="scoring", unit="video"))
  except (ValueError, CheckpointError, inputs.InputError, media.MediaError, OSError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)
  errors = result.pop("errors")
  for e in errors:
    print(f"error: {e}", file=sys.stderr)
  print(format_table(result))
  path = os.path.join(FLAGS.out, "results.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
  sys.exit(1 if errors else 0)


if __name__ == "__main__":
  app.run(main)
