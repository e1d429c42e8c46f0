"""Random-weight models for tests and benchmarks: an AnimateDiff model written in the real PyTorch file formats.

No pretrained weights can be downloaded in CI or in the sandboxes this project is built in, so tests,
benchmarks and the README's first command use models of the real architecture with random weights:

    python -m vcjax.testing --size tiny --out /tmp/vcjax-random [--text-positions N] [--motion-heads N]

A library too (`write_pipeline`, `build_models`, `randomize_`, `write_tokenizer`, `SCHEDULER`). Its functions
need torch, diffusers and transformers, imported only when they run: `import vcjax.testing` stays torch-free.

writes into OUT:
  base/                 diffusers folder: unet/, vae/, text_encoder/, tokenizer/, model_index.json
  base_ldm.safetensors  the same model as an LDM single file (what community fine-tunes ship)
  mm_original.ckpt      the motion module with the original AnimateDiff key names (torch.save pickle)
  motion_adapter/       the same motion module as a diffusers MotionAdapter
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

SIZES = {
    # Real SD1.5 + AnimateDiff shapes.
    "sd15": dict(unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                           attention_head_dim=8, cross_attention_dim=768),
                 vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12),
                 motion_heads=8),
    # The same architecture at toy width, for CI.
    "tiny": dict(unet=dict(block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=2,
                           cross_attention_dim=32,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                 # Four levels, like SD's VAE, so that latents are 1/8 of the image as everywhere else.
                 vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
                 motion_heads=2),
}
MOTION = {"v1": dict(motion_max_seq_length=24, use_motion_mid_block=False),
          "v2": dict(motion_max_seq_length=32, use_motion_mid_block=True),
          "v3": dict(motion_max_seq_length=32, use_motion_mid_block=False)}


def randomize_(model, seed: int = 0):
  """Give every parameter of a torch model random values of a sensible scale, in place (returned).

  Default inits leave norms at 1/0 and some projections at zero (e.g. zero-initialised outputs), which
  would hide bugs in the layers they feed; parity tests must exercise every weight.
  """
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(int(np.prod(p.shape[1:]))))
  return model


def write_tokenizer(folder: str, max_length: int = 77) -> int:
  """A byte-level CLIP BPE vocabulary with no merges (every character is a token), padding prompts to
  `max_length`. Returns its size."""
  # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points 256+.
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": max_length, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, f)
  return len(vocab)


def build_models(size: str = "tiny", version: str = "v2", seed: int = 0, *, text_positions: int = 77,
                 motion_heads: int | None = None):
  """(unet2d, vae, text_encoder, motion_adapter) torch modules with random weights. text_positions: the
  text encoder's max_position_embeddings; motion_heads: the motion module's heads (default: the size's)."""
  import torch
  from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel
  s = SIZES[size]
  torch.manual_seed(seed)
  unet = randomize_(UNet2DConditionModel(**s["unet"], norm_num_groups=32), seed)
  vae = randomize_(AutoencoderKL(block_out_channels=s["vae"]["block_out_channels"],
                                 layers_per_block=s["vae"]["layers_per_block"],
                                 down_block_types=("DownEncoderBlock2D",) * len(s["vae"]["block_out_channels"]),
                                 up_block_types=("UpDecoderBlock2D",) * len(s["vae"]["block_out_channels"]),
                                 latent_channels=4, norm_num_groups=32), seed + 1)
  vocab_size = 514 if size == "tiny" else 49408
  text = randomize_(CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=text_positions,
                                                 bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                                 pad_token_id=vocab_size - 1, hidden_act="quick_gelu",
                                                 **s["text"])), seed + 2)
  adapter = randomize_(MotionAdapter(block_out_channels=s["unet"]["block_out_channels"], motion_layers_per_block=2,
                                     motion_num_attention_heads=motion_heads or s["motion_heads"],
                                     motion_norm_num_groups=32,
                                     **MOTION[version]), seed + 3)
  return unet.eval(), vae.eval(), text.eval(), adapter.eval()


def diffusers_motion_to_original(sd: dict) -> dict:
  """diffusers MotionAdapter names -> original AnimateDiff checkpoint names (inverse of
  vcjax.weights.motion_keys.original_motion_to_diffusers)."""
  import re
  out = {}
  for key, value in sd.items():
    k = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
    k = k.replace(".attn1.", ".attention_blocks.0.").replace(".attn2.", ".attention_blocks.1.")
    k = k.replace(".norm1.", ".norms.0.").replace(".norm2.", ".norms.1.").replace(".norm3.", ".ff_norm.")
    k = k.replace(".pos_embed.pe", ".attention_blocks.0.pos_encoder.pe")
    out[k] = value
  return out


# A scheduler config like SD1.5's (a PNDM config: scaled-linear betas, no set_alpha_to_one), so that samplers
# must take the model's settings and override them by name as the AnimateDiff docs do.
SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None}


def write_pipeline(out: str, size: str = "tiny", version: str = "v2", seed: int = 0, *, text_positions: int = 77,
                   motion_heads: int | None = None, scheduler: dict | None = None) -> dict[str, str]:
  """Writes the files listed in the module doc; returns their paths. text_positions: the text encoder's and the
  tokenizer's length; scheduler: the base's scheduler_config.json (default SCHEDULER)."""
  import safetensors.torch
  import torch
  from vcjax.weights import ldm
  from vcjax.models.configs import UNet3DConfig
  from vcjax.weights.bundle import unet_fields_from_diffusers

  unet, vae, text, adapter = build_models(size, version, seed, text_positions=text_positions,
                                         motion_heads=motion_heads)
  base = os.path.join(out, "base")
  os.makedirs(base, exist_ok=True)
  unet.save_pretrained(os.path.join(base, "unet"))
  vae.save_pretrained(os.path.join(base, "vae"))
  text.save_pretrained(os.path.join(base, "text_encoder"))
  write_tokenizer(os.path.join(base, "tokenizer"), text_positions)
  os.makedirs(os.path.join(base, "scheduler"), exist_ok=True)
  with open(os.path.join(base, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(scheduler or SCHEDULER, f, indent=2)
  with open(os.path.join(base, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline"}, f)
  adapter.save_pretrained(os.path.join(out, "motion_adapter"))

  # The same weights in the LDM single-file layout and as an original motion-module pickle.
  np_sd = lambda m: {k: v.detach().numpy() for k, v in m.state_dict().items()}
  config = UNet3DConfig(**unet_fields_from_diffusers(dict(unet.config)))
  parts = {"unet": ldm.diffusers_unet_to_ldm(np_sd(unet), config),
           "vae": ldm.diffusers_vae_to_ldm(np_sd(vae)),
           "text_encoder": {"text_model." + k.removeprefix("text_model."): v for k, v in np_sd(text).items()}}
  single = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ldm.join_ldm_checkpoint(parts).items()}
  safetensors.torch.save_file(single, os.path.join(out, "base_ldm.safetensors"))
  torch.save({"state_dict": diffusers_motion_to_original(adapter.state_dict())},
             os.path.join(out, "mm_original.ckpt"))
  return dict(base=base, ldm=os.path.join(out, "base_ldm.safetensors"),
              motion_original=os.path.join(out, "mm_original.ckpt"),
              motion_diffusers=os.path.join(out, "motion_adapter"))


def main():
  p = argparse.ArgumentParser(prog="python -m vcjax.testing",
                              description="Write a random-weight AnimateDiff model in PyTorch formats.")
  p.add_argument("--out", required=True)
  p.add_argument("--size", choices=sorted(SIZES), default="tiny")
  p.add_argument("--version", choices=sorted(MOTION), default="v2")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--text-positions", type=int, default=77, help="text encoder / tokenizer length")
  p.add_argument("--motion-heads", type=int, default=None)
  args = p.parse_args()
  paths = write_pipeline(args.out, args.size, args.version, args.seed, text_positions=args.text_positions,
                         motion_heads=args.motion_heads)
  for name, path in paths.items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  main()
