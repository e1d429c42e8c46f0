"""A CLIP BPE tokenizer for the world's vocabulary, written as real CLIPTokenizer files.

    python -m vcjax.world.tokenizer --out DIR [--max-length 24]
    write_tokenizer(DIR) -> vocabulary size

The vocabulary is CLIP's byte-level alphabet (every character, alone and word-final: any text still
tokenizes) plus one token per word the world's captions use (`captions.vocabulary()`) and the words of the
subject-training templates and prompt prefixes (vcjax.data.captions), learned as BPE merges: merges are
chosen greedily (most frequent adjacent pair over the word list, ties by the pair's text) until every word is
one symbol, so CLIP's BPE (which applies the lowest-ranked merge first) turns each of these words into
exactly one token. Captions of the default world take at most 15 tokens with the start / end tokens; the
default padded length 24 leaves room for templates and a new token ("<new1>").
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

from vcjax.world import captions
from vcjax.world.config import WorldConfig

START, END = "<|startoftext|>", "<|endoftext|>"
# Subject-training templates and prefixes (vcjax/data/captions.py) and a few prompt words users write.
EXTRA_WORDS = ("video", "of", "static", "far", "away", "very", "zoomed", "in", "close", "up", "photo", "the")


def byte_alphabet() -> list[str]:
  """GPT-2/CLIP's byte -> unicode alphabet: printable bytes map to themselves, the rest to 256+."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def learn_merges(words) -> list[tuple[str, str]]:
  """BPE merges that turn every word of `words` into one symbol ("red" -> "red</w>")."""
  state = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(set(words))}
  merges = []
  while True:
    pairs = collections.Counter()
    for symbols in state.values():
      for a, b in zip(symbols, symbols[1:]):
        pairs[(a, b)] += 1
    if not pairs:
      return merges
    best = min(pairs, key=lambda p: (-pairs[p], p))
    merges.append(best)
    for w, symbols in state.items():
      out, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
          out.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          out.append(symbols[i])
          i += 1
      state[w] = tuple(out)


def world_words(config: WorldConfig | None = None) -> list[str]:
  return sorted(set(captions.vocabulary(config)) | set(EXTRA_WORDS))


def write_tokenizer(folder: str, config: WorldConfig | None = None, max_length: int = 24) -> int:
  """vocab.json, merges.txt and tokenizer_config.json in `folder`; returns the vocabulary size."""
  chars = byte_alphabet()
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
  merges = learn_merges(world_words(config))
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  vocab[START] = len(vocab)
  vocab[END] = len(vocab)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": max_length, "bos_token": START, "eos_token": END, "unk_token": END,
               "pad_token": END, "tokenizer_class": "CLIPTokenizer"}, f, indent=2)
  return len(vocab)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="Write the world's CLIP tokenizer files.")
  p.add_argument("--out", required=True)
  p.add_argument("--max-length", type=int, default=24, help="padded prompt length (model_max_length)")
  args = p.parse_args(argv)
  n = write_tokenizer(args.out, max_length=args.max_length)
  print(f"{args.out}: {n} tokens, {len(world_words())} whole words, padded length {args.max_length}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
