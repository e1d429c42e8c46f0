"""vcjax.models.clip_bpe.ClipBPE gives transformers' CLIPTokenizer's ids, exactly: on the repository's tokenizer
folders, the tiny test tokenizers, a tokenizer with partial BPE merges, the folder configurations transformers
reads (SD 1.5 / SD 2 style, no config, added_tokens.json, added_tokens_decoder), a few hundred prompts and
odd inputs; and loading + tokenizing with it imports neither transformers nor torch."""

import glob
import json
import os
import random
import shutil
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from vcjax.models import clip_bpe
from vcjax.models.clip_bpe import ClipBPE, Unsupported
from vcjax.models.tokenizer import load_tokenizer, padded_length, tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = os.path.join(REPO, "models", "world", "tokenizer")
REPO_FOLDERS = sorted(os.path.relpath(f, REPO) for f in glob.glob(os.path.join(REPO, "models", "**", "tokenizer"),
                                                                   recursive=True))

ODD = ["", " ", "   ", "\t\n  \r\n", "a  b\t\tc\n\nd", "A RED STAR", "MiXeD CaSe", "é", "café crème brûlée",
       "ß straße", "ΟΔΟΣ ΣΑΣ", "İstanbul", "日本語のテキスト", "한국어", "emoji 🎉🐕‍🦺 👍🏽", "e\u0301 n\u0303", "Å Ω ﬁ ｆｕｌｌ",
       "1234", "3.14", "v2.0-beta", "$100,000!!!", "...?!?", "--==>>", "it's", "we'll", "they're", "I'M", "don't'",
       "'s'", "O'Neil's dog's", "<|startoftext|>", "a <|endoftext|> b", "<|endoftext|><|endoftext|>",
       "<|ENDOFTEXT|>", "<|STARTOFTEXT|> x", "<|startoftext|>x<|endoftext|>", "<|startof text|>", "<new1>",
       "a <new1> dog", "a<new1>dog", "<NEW1> dog", "<new1><new1>", "a <new2> dog", "\x00\x01\x7f",
       "\u200b\u00a0\u2003\u3000x", "tab\tnew\nline", "zebra quokka", "a " * 60, "a very long prompt " * 12,
       "x" * 200, "#hash @at %pct ^car &amp *star", "(parens) [brackets] {braces}", "\"quoted\" 'single'",
       "a/b\\c|d", "~`", "Ǆ ǅ ǆ", "\U00011935\U00011930", "\U00010d50 \ua7cb",
       "abc cab abcab ababab ababx cabab aab"]


def _prompts() -> list[str]:
  out = list(ODD)
  for path in sorted({*glob.glob(os.path.join(REPO, "vcjax", "eval", "data", "*.tsv")),
                      *glob.glob(os.path.join(REPO, "data", "*.tsv")),
                      *glob.glob(os.path.join(REPO, "..", "shared", "data", "*.tsv"))}):
    with open(path, encoding="utf-8") as f:
      out += [line.rstrip("\n").split("\t")[-1] for line in f][1:]
  from vcjax.world import captions, clips
  from vcjax.world.config import WorldConfig
  config = WorldConfig()
  for i in range(120):
    attrs = clips.sample_attributes(config, i)
    out.append(captions.caption(config, attrs, subject=(None, "", "<new1>")[i % 3]))
  return out


PROMPTS = _prompts()


def _write(folder, base, config=None, special_map=None, added=None, drop_config=False, merges=None, vocab=None):
  shutil.copytree(base, folder)
  if vocab:
    with open(os.path.join(folder, "vocab.json")) as f:
      vocab = {**json.load(f), **vocab}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
      json.dump(vocab, f)
  if drop_config:
    os.remove(os.path.join(folder, "tokenizer_config.json"))
  for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map),
                      ("added_tokens.json", added)):
    if value is not None:
      with open(os.path.join(folder, name), "w") as f:
        json.dump(value, f)
  if merges is not None:
    with open(os.path.join(folder, "merges.txt"), "w") as f:
      f.write(merges)
  return folder


def _write_bpe_folder(folder, vocab, merges, config):
  """vocab.json (+ the special tokens), merges.txt and a tokenizer_config.json with `config` in `folder`."""
  vocab = vocab | {clip_bpe.SOT: len(vocab), clip_bpe.EOT: len(vocab) + 1}
  os.makedirs(folder)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": 77, **config, "tokenizer_class": "CLIPTokenizer"}, f)
  return folder


def _learned(folder):
  """A byte-level tokenizer whose merges, learnt from the prompts, stop part way: words split into pieces."""
  from vcjax.world.tokenizer import learn_merges
  chars = list(clip_bpe.byte_alphabet().values())
  vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
  words = [w for p in PROMPTS for w in clip_bpe._CLIP_SPLIT.findall(clip_bpe.normalize(p))][:3000]
  words = ["".join(clip_bpe._BYTE_CHARS[b] for b in w.encode()) for w in words]
  merges = learn_merges(words)[:700]
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  return _write_bpe_folder(folder, vocab, merges, {})


def _clip_sized(folder, seed=0):
  """CLIP's sizes (49408 tokens, 48894 merges) with random merges, biased to lower-case letters so that the
  merges reach deep into ordinary words."""
  rng = random.Random(seed)
  chars = list(clip_bpe.byte_alphabet().values())
  vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
  letters = [c for c in chars if c.isascii() and c.isalpha() and c.islower()]
  inner, final, merges = letters * 40 + chars, [c + "</w>" for c in letters * 40 + chars], []
  while len(merges) < 48894:
    a, b = rng.choice(inner), rng.choice(inner if rng.random() < 0.5 else final)
    if a + b not in vocab:
      vocab[a + b] = len(vocab)
      merges.append((a, b))
      (final if b.endswith("</w>") else inner).append(a + b)
  return _write_bpe_folder(folder, vocab, merges, {"pad_token": "!"})


def _tagged(content, normalized=True):
  return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
          "single_word": False}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  from vcjax.testing import write_tokenizer
  from vcjax.world.tokenizer import write_tokenizer as write_world
  root = tmp_path_factory.mktemp("clip_bpe")
  tiny = str(root / "tiny")
  write_tokenizer(tiny, 16)
  out = {"world": WORLD if os.path.isdir(WORLD) else str(root / "world"), "tiny": tiny,
         "learned": _learned(str(root / "learned")), "clip_sized": _clip_sized(str(root / "clip_sized"))}
  if not os.path.isdir(WORLD):
    write_world(out["world"])
  write_tokenizer(str(root / "tiny77"), 77)
  out["tiny77"] = str(root / "tiny77")
  out.update({f: os.path.join(REPO, f) for f in REPO_FOLDERS})
  sd_map = {k: {k2: v for k2, v in _tagged(c).items() if k2 != "__type"} for k, c in
            (("bos_token", clip_bpe.SOT), ("eos_token", clip_bpe.EOT), ("unk_token", clip_bpe.EOT))}
  sd15 = {"add_prefix_space": False, "bos_token": _tagged(clip_bpe.SOT), "do_lower_case": True,
          "eos_token": _tagged(clip_bpe.EOT), "errors": "replace", "model_max_length": 77,
          "pad_token": clip_bpe.EOT, "tokenizer_class": "CLIPTokenizer", "unk_token": _tagged(clip_bpe.EOT)}
  decoder = {str(i): {"content": c, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False,
                      "special": s} for i, c, s in ((512, clip_bpe.SOT, True), (513, clip_bpe.EOT, True),
                                                    (600, "<new1>", False), (599, "<New2>", False))}
  variants = {
      "sd15": dict(config=sd15, special_map={**sd_map, "pad_token": clip_bpe.EOT}),
      "sd2_pad": dict(config=dict(sd15, pad_token="!"), special_map={**sd_map, "pad_token": "!"}),
      "no_config": dict(drop_config=True),
      "map_only": dict(drop_config=True, special_map={"bos_token": clip_bpe.SOT, "pad_token": "<pad>"}),
      "added_json": dict(added={"<new1>": 700, "a": 3, "<|endoftext|>": 513}),
      "decoder": dict(config={"added_tokens_decoder": decoder, "model_max_length": 20, "pad_token": "<|endoftext|>"}),
      "named_extra": dict(config={"sep_token": "<sep>", "cls_token": "a", "mask_token": _tagged("<m>"),
                                  "model_max_length": 12}),
      # A pair listed twice, a second "#version" line, CRLF line ends, an id past a gap in the vocabulary.
      "merge_quirks": dict(merges="#version: 0.2\r\na b\r\nb c</w>\r\na b\r\n#version x\r\nab c</w>\r\nc a\r\nca b\r\n",
                           vocab={"ab": 514, "bc</w>": 515, "abc</w>": 516, "ca": 517, "cab": 700}),
      # A merge ranked before the one making its left part: tokenizers' heap order, not "all of one pair first".
      "heap_order": dict(merges="#version: 0.2\nab a\na b\n", vocab={"ab": 514, "aba": 515}),
  }
  for name, kw in variants.items():
    out[name] = _write(str(root / name), tiny, **kw)
  return out


def _both(folder):
  return load_tokenizer(folder), load_tokenizer(folder, backend="transformers")


def _assert_same(mine, ref, prompts):
  assert isinstance(mine, ClipBPE) and type(ref).__name__ == "CLIPTokenizer"
  assert len(mine) == len(ref) and mine.vocab_size == ref.vocab_size
  assert mine.model_max_length == ref.model_max_length and padded_length(mine) == padded_length(ref)
  for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
    assert getattr(mine, attr) == getattr(ref, attr) and getattr(mine, attr + "_id") == getattr(ref, attr + "_id")
  assert mine.get_vocab() == ref.get_vocab() and mine.added_tokens_encoder == ref.added_tokens_encoder
  length = padded_length(ref)
  np.testing.assert_array_equal(tokenize(mine, prompts), tokenize(ref, prompts))
  for kw in (dict(padding="max_length", max_length=length, truncation=True, return_tensors="np"),
             dict(padding="max_length", max_length=9, truncation=True, return_tensors="np"),
             dict(padding=True, truncation=True, max_length=5), dict(padding="longest"), dict(max_length=3),
             dict(truncation=True), dict(padding="max_length"), dict(add_special_tokens=False, max_length=4),
             dict(padding="max_length", max_length=1, truncation=True), dict(max_length=2, truncation=True)):
    got, want = mine(prompts, **kw), ref(prompts, **kw)
    assert set(got) == set(want) == {"input_ids", "attention_mask"}, kw
    for key in got:
      if kw.get("return_tensors"):
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape
      np.testing.assert_array_equal(np.asarray(got[key], dtype=object), np.asarray(want[key], dtype=object))
  for p in prompts:
    ids = ref(p)["input_ids"]
    assert mine(p) == dict(ref(p)), p
    assert mine(p, add_special_tokens=False)["input_ids"] == ref(p, add_special_tokens=False)["input_ids"], p
    assert mine.tokenize(p) == ref.tokenize(p), p
    assert mine.decode(ids) == ref.decode(ids) and mine.decode(ids, skip_special_tokens=True) == ref.decode(
        ids, skip_special_tokens=True), p
  np.testing.assert_array_equal(mine(prompts[0], return_tensors="np")["input_ids"],
                                ref(prompts[0], return_tensors="np")["input_ids"])


@pytest.mark.parametrize("name", [*REPO_FOLDERS, "world", "tiny", "tiny77", "learned", "clip_sized", "sd15", "sd2_pad", "no_config", "map_only",
                                  "added_json", "decoder", "named_extra", "merge_quirks", "heap_order"])
def test_same_ids_as_transformers(folders, name):
  mine, ref = _both(folders[name])
  prompts = PROMPTS if name in ("world", "learned", "clip_sized", "tiny77") else PROMPTS[::4] + ODD
  _assert_same(mine, ref, prompts)
  long = tokenize(mine, ["a very long prompt " * 40])[0]   # truncated, its last id still the EOS
  assert long[0] == mine.bos_token_id and long[-1] == mine.eos_token_id and len(long) == padded_length(mine)
  # A placeholder token added at run time (CustomCrafter's "<new1>", textual inversion), and what follows it.
  for tokens, special in ((["<new1>"], False), (["<new1>"], False), (["<New2>", "a", "<x y>"], False),
                          (["<sp>"], True)):
    assert mine.add_tokens(tokens, special_tokens=special) == ref.add_tokens(tokens, special_tokens=special)
  assert mine.convert_tokens_to_ids(["<new1>", "<New2>", "zz-unknown", clip_bpe.EOT]) == ref.convert_tokens_to_ids(
      ["<new1>", "<New2>", "zz-unknown", clip_bpe.EOT])
  _assert_same(mine, ref, ODD + ["a <new2> <NEW1> <x  Y> <sp> <SP>", "la<new1>a"] + PROMPTS[::9])


def test_decode_of_any_ids(folders):
  mine, ref = _both(folders["learned"])
  rng = random.Random(0)
  for _ in range(300):
    ids = [rng.randrange(len(ref) + 5) for _ in range(rng.randrange(1, 12))]
    for skip in (False, True):
      assert mine.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids


def test_unicode_classes_match_tokenizers(folders):
  """Every BMP character and a sample of the others through the normalizer and the pre-tokenizer, in context,
  and every canonical composite from its decomposition (Python's, tokenizers' and regex's Unicode tables differ)."""
  _, ref = _both(folders["tiny"])
  normalizer, pre = ref.backend_tokenizer.normalizer, ref.backend_tokenizer.pre_tokenizer
  cps = [*range(0xD800), *range(0xE000, 0x10000, 1), *range(0x10000, 0x110000, 37), 0x11930, 0x11935,
         *range(0x10D50, 0x10D66), *range(0x16EA0, 0x16EB9), *range(0x323B0, 0x323C0)]
  text = " ".join(f"x{chr(c)}y{chr(c)}{chr(c)}" for c in cps)
  assert clip_bpe.normalize(text) == normalizer.normalize_str(text)
  mine = ["".join(clip_bpe._BYTE_CHARS[b] for b in w.encode()) for c in clip_bpe._CLIP_SPLIT.findall(text)
          for w in (("<|", c[2:-2], "|>") if c in (clip_bpe.SOT, clip_bpe.EOT) else (c,))]
  assert mine == [w for w, _ in pre.pre_tokenize_str(text)]
  composites = [unicodedata.normalize("NFD", chr(c)) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
  text = " ".join(d + "\u0301" for d, c in zip(composites, range(0x110000)) if len(d) > 1)
  assert clip_bpe.normalize(text) == normalizer.normalize_str(text)


def test_refuses_what_it_does_not_reproduce(folders, tmp_path):
  tiny = folders["tiny"]
  cfg = json.load(open(os.path.join(tiny, "tokenizer_config.json")))
  for i, extra in enumerate([{"padding_side": "left"}, {"add_bos_token": False}, {"extra_special_tokens": ["<e>"]},
                             {"foo_token": "<f>"}, {"bos_token": dict(_tagged(clip_bpe.SOT), lstrip=True)}]):
    folder = _write(str(tmp_path / str(i)), tiny, config={**cfg, **extra})
    with pytest.raises(Unsupported):
      ClipBPE.from_folder(folder)
    assert type(load_tokenizer(folder)).__name__ == "CLIPTokenizer"   # backend "auto" falls back
    with pytest.raises(Unsupported):
      load_tokenizer(folder, backend="clip_bpe")
  shutil.copy(os.path.join(tiny, "vocab.json"), tmp_path / "tokenizer.json")   # taken over by a tokenizer.json
  with pytest.raises(Unsupported):
    ClipBPE.from_folder(str(tmp_path))
  tok = ClipBPE.from_folder(tiny)
  with pytest.raises(Unsupported):
    tok.save_pretrained(str(tmp_path / "out"))
  with pytest.raises(Unsupported):
    tok(["a"], padding="max_length", max_length=4, return_tensors="tf")
  with pytest.raises(ValueError):
    tok(["a", "a b c"], return_tensors="np")   # ragged
  bad = _write(str(tmp_path / "bad_merges"), tiny, merges="#version: 0.2\na b\n\nc d\n")
  with pytest.raises(ValueError):
    ClipBPE.from_folder(bad)


def test_loading_and_tokenizing_imports_neither_transformers_nor_torch():
  code = ("import sys, time\nt = time.perf_counter()\n"
          "from vcjax.models.tokenizer import load_tokenizer, tokenize\n"
          f"ids = tokenize(load_tokenizer({os.path.dirname(WORLD)!r}), ['a small red star moving left'])\n"
          "assert ids.shape == (1, 24) and ids.dtype.name == 'int32', ids\n"
          "print(time.perf_counter() - t, sorted(m for m in ('transformers', 'torch', 'tokenizers', 'jax') "
          "if m in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
  seconds, imported = out.stdout.split(" ", 1)
  print(f"load_tokenizer + tokenize in a fresh process: {float(seconds):.3f} s")
  assert imported.strip() == "[]", imported
