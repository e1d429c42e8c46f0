"""CLIP's byte-level BPE tokenizer in plain Python: the ids of transformers' CLIPTokenizer without importing
transformers (~1.7 s of a sampler's start) or torch.

    tok = ClipBPE.from_folder("models/world/tokenizer")   # vocab.json + merges.txt (+ config files)
    tok(["a red star"], padding="max_length", max_length=24, truncation=True, return_tensors="np")

The reference is transformers 5's CLIPTokenizer, a `tokenizers` (Rust) pipeline, redone step by step:
  1. added tokens (special tokens, "<new1>") are cut out, leftmost-longest: those marked `normalized` in the
     normalized text (step 2), in their normalized spelling; the others in the raw text, before it;
  2. each other piece is normalized: NFC, every whitespace run -> " ", lower case (char by char);
  3. CLIP's pattern splits it into contractions, letter runs, single digits and runs of other characters
     (whitespace is dropped); their UTF-8 bytes are spelled in GPT-2's printable byte alphabet;
  4. BPE on each piece, its last symbol carrying "</w>", the lowest-ranked pair merged first;
  5. BOS + ids + EOS; truncation keeps the final EOS; padding on the right with the pad token.
A folder that asks for more (a tokenizer.json, lstrip / rstrip / single-word tokens, extra special tokens, left
padding, ...) raises `Unsupported`; `vcjax.models.tokenizer.load_tokenizer` then uses transformers.
"""

from __future__ import annotations

import heapq
import json
import os
import unicodedata
from typing import NamedTuple

import numpy as np
import regex

VERY_LARGE_INTEGER, LARGE_INTEGER = int(1e30), int(1e20)  # transformers' "no limit", and "ignore above"
SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_DEFAULTS = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}  # CLIPTokenizer's own
# tokenizer_config.json keys that change ids in ways not reproduced here (other keys do not touch ids).
_REFUSED = {"add_bos_token", "add_eos_token", "vocab", "merges", "tokenizer_object", "post_processor",
            "gguf_file", "max_length", "stride", "truncation_strategy", "pad_to_multiple_of"}
_EXPECTED = {"padding_side": "right", "truncation_side": "right", "split_special_tokens": False,
             "additional_special_tokens": [], "extra_special_tokens": []}   # other values are refused
# Unicode versions: `regex` knows Unicode 17, tokenizers' Oniguruma 16 (to it these letters / digits of 17 are
# "other" characters); Rust lowercases the new case pairs of Unicode 15-17, Python 3.11 (Unicode 14) does not;
# tokenizers' NFC tables predate Dives Akuru's composed vowel sign (Unicode 13).
_UNICODE17 = "".join(
    regex.escape(chr(int(a, 16))) + (f"-{regex.escape(chr(int(b, 16)))}" if b else "") for a, _, b in (
        r.partition("-") for r in """558 58B-58C 88F C5C CDC 208F 209D-209F A7CE-A7CF A7D2 A7D4 A7DD A7E2 A7F1
        AB6C-AB6D 107BB-107BF 10940-10959 10EC5-10EC7 10ED9-10EEE 11B0A 11DB0-11DDB 11DE0-11DE9 11DF1 1246F
        12475-1247F 12550-12686 16EA0-16EB8 16EBB-16ED3 16FF2-16FF6 187F8-187FF 18CD6-18CDA 18D09-18D20
        18D80-18DF2 18E00-19191 191A0-191D2 1B123-1B128 1B168 1D6A6 1DF1F-1DF24 1DF2B-1DF81 1DF90-1DF96
        1DFCD-1DFFF 1E6C0-1E6DE 1E6E0-1E6E2 1E6E4-1E6E5 1E6E7-1E6ED 1E6F0-1E6F4 1E6FE-1E6FF 2B73A-2B73F 2B81E
        2CEA2-2CEAD 323B0-33479 3D000-3FC3F""".split()))
_NEW_LOWER = {0x1C89: 0x1C8A, 0xA7CB: 0x264, 0xA7DC: 0x19B, **{c: c + 1 for c in (0xA7CC, 0xA7CE, 0xA7D2, 0xA7D4)},
              0xA7DA: 0xA7DB, **{c: c + 0x20 for c in range(0x10D50, 0x10D66)},
              **{c: c + 0x1B for c in range(0x16EA0, 0x16EB9)}}
_WHITESPACE = regex.compile(r"\s+")
_CLIP_SPLIT = regex.compile(  # CLIP's pattern; GPT-2's, applied after it, only splits the two literals
    r"(?V1)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}--[%s]]+|[\p{N}--[%s]]"
    r"|[[^\s\p{L}\p{N}][%s]]+" % ((_UNICODE17,) * 3))


class Unsupported(ValueError):
  """The folder (or the call) needs something of transformers' tokenizer that ClipBPE does not reproduce."""


class AddedToken(NamedTuple):  # tokenizers' AddedToken: two are equal only if every field is
  content: str
  single_word: bool = False
  lstrip: bool = False
  rstrip: bool = False
  normalized: bool = True
  special: bool = False


def _token(value, special=None):
  """A config file's token (a string, or an AddedToken dict) as transformers holds it; `special` forced."""
  if isinstance(value, str):
    return value
  if type(value) is not dict or "content" not in value or set(value) - {*AddedToken._fields, "__type"}:
    raise Unsupported(f"token {value!r} is neither a string nor an AddedToken")
  fields = {k: v for k, v in value.items() if k != "__type"} | ({} if special is None else {"special": special})
  return AddedToken(**{"normalized": not fields.get("special", False), **fields})


def _content(token) -> str:
  return token if isinstance(token, str) else token.content


def byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> character map: printable Latin-1 bytes stand for themselves, the others (controls, space,
  soft hyphen) for code points 256 on, so that every byte is one visible character and no symbol is blank."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(sorted({*range(256)} - {*keep}))}}


_BYTE_CHARS = byte_alphabet()
_CHAR_BYTES = {c: b for b, c in _BYTE_CHARS.items()}


def normalize(text: str) -> str:
  if "\U00011930" in text:  # keep Dives Akuru's vowel signs apart, as tokenizers' NFC does
    return "\U00011930".join(map(normalize, text.split("\U00011930")))
  text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).translate(_NEW_LOWER)
  # Char by char, as Rust lowercases: str.lower() of a whole word would end it in a final sigma "ς".
  return "".join(c.lower() for c in text) if "Σ" in text else text.lower()


def read_merges(path: str, vocab: dict[str, int]) -> dict[tuple[int, int], tuple[int, int]]:
  """merges.txt -> {(left id, right id): (rank, merged id)}, read as tokenizers reads it: "#version" lines
  skipped, every other one exactly "left right" of tokens of the vocabulary, a pair listed twice ranked last."""
  with open(path, encoding="utf-8", newline="") as f:
    lines = [line.removesuffix("\r") for line in f.read().removesuffix("\n").split("\n")]
  merges = {}
  for rank, line in enumerate(line for line in lines if not line.startswith("#version")):
    a, space, b = line.partition(" ")
    try:
      if not space or " " in b:
        raise KeyError(line)
      merges[vocab[a], vocab[b]] = rank, vocab[a + b]
    except KeyError:
      raise ValueError(f"{path}: merge {rank + 1} is not two tokens of the vocabulary: {line!r}") from None
  return merges


class Encoding(dict):
  """transformers' BatchEncoding as far as vcjax reads it: a dict whose keys are also attributes."""

  def __getattr__(self, key):
    try:
      return self[key]
    except KeyError:
      raise AttributeError(key) from None


class ClipBPE:
  """The tokenizer surface vcjax uses: __call__, tokenize, decode, add_tokens, convert_tokens_to_ids, get_vocab,
  added_tokens_encoder, len(), the special tokens and their ids, model_max_length. Build it with `from_folder`."""

  def __init__(self, vocab: dict[str, int], merges: dict, special: dict, model_max_length=VERY_LARGE_INTEGER,
               file_tokens=()):
    self.vocab, self.merges, self.model_max_length = vocab, merges, model_max_length
    self._model_tokens = {i: t for t, i in vocab.items()}
    special = {**_DEFAULTS, **special}   # the named special tokens (str | AddedToken), in transformers' order
    self._special = {k: special[k] for k in SPECIAL_ATTRS if k in special}
    self._ids, self._tokens, self._spelled = {}, {}, {}   # added: content -> id -> AddedToken; normalized text
    self._specials, self._cache = set(), {}
    # What transformers adds, in its order: the folder's added tokens, then the named special tokens not among
    # them; plain strings become special tokens matched on the raw text.
    todo, names = list(file_tokens), {_content(v) for v in self._special.values()}
    for v in self._special.values():
      if _content(v) not in map(_content, file_tokens) and v not in todo:
        todo.append(v)
    self._add([AddedToken(t, normalized=False, special=True) if isinstance(t, str) else
               t._replace(special=True) if t.content in names else t for t in todo])
    self.unk_id = vocab.get(self.unk_token)   # BPE's unknown token comes from the vocabulary only

  @classmethod
  def from_folder(cls, folder: str) -> "ClipBPE":
    """vocab.json + merges.txt with tokenizer_config.json, special_tokens_map.json and added_tokens.json, read
    as transformers' CLIPTokenizer.from_pretrained reads them; Unsupported where the ids could differ."""
    def read(name):
      if os.path.isfile(os.path.join(folder, name)):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
          return json.load(f)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
      raise Unsupported(f"{folder} has a tokenizer.json: transformers takes the vocabulary from it")
    raw = read("vocab.json")
    vocab = {t: i for t, i in raw.items() if type(i) is int}   # tokenizers skips what is not a number
    if min(vocab.values(), default=0) < 0 or any(type(i) is float for i in raw.values()):
      raise ValueError(f"{folder}/vocab.json: ids must be non-negative integers")
    cfg = read("tokenizer_config.json") or {}
    special = {k: cfg[k] for k in SPECIAL_ATTRS if k in cfg}
    bad = [k for k in cfg if k in _REFUSED or (k.endswith("_token") and k not in SPECIAL_ATTRS)
           or cfg[k] not in (None, _EXPECTED.get(k, cfg[k]))]
    bad += [k for k, v in special.items()
            if type(v) is not str and (type(v) is not dict or v.get("__type") != "AddedToken")]
    if bad:
      raise Unsupported(f"{folder}/tokenizer_config.json: {sorted(bad)} (not reproduced by ClipBPE)")
    special, file_tokens = {k: _token(v) for k, v in special.items()}, {}
    if "added_tokens_decoder" in cfg:   # then transformers reads neither of the two other files
      for i, v in cfg["added_tokens_decoder"].items():
        if type(v) is not dict or "__type" in v:
          raise Unsupported(f"{folder}/tokenizer_config.json: added token {v!r} (not reproduced by ClipBPE)")
        file_tokens[int(i)] = _token(v)
    else:
      for k, v in (read("special_tokens_map.json") or {}).items():
        if (k not in SPECIAL_ATTRS and v) or (type(v) is dict and "__type" in v):
          raise Unsupported(f"{folder}/special_tokens_map.json: {k} = {v!r} (not reproduced by ClipBPE)")
        if k in SPECIAL_ATTRS:
          special[k] = _token(v, special=True)
      names = {_content(v) for v in special.values()}
      for t, i in (read("added_tokens.json") or {}).items():
        file_tokens[int(i)] = AddedToken(t, normalized=t not in names, special=t in names)
    same = {t.content: t for t in file_tokens.values()}   # a named token listed there takes that listing
    mml = cfg.get("model_max_length", cfg.get("max_len"))
    return cls(vocab, read_merges(os.path.join(folder, "merges.txt"), vocab),
               {k: same.get(_content(v), v) for k, v in special.items()},
               VERY_LARGE_INTEGER if mml is None else mml, [file_tokens[i] for i in sorted(file_tokens)])

  def _add(self, tokens) -> int:
    """tokenizers' AddedVocabulary.add_tokens: a token re-added with other options replaces the old one (same
    id); a new content gets the next id past the vocabulary and the added ids. -> how many were new or changed."""
    tokens = list(tokens)
    if any(t.single_word or t.lstrip or t.rstrip for t in tokens):
      raise Unsupported("added tokens with single_word / lstrip / rstrip are not reproduced by ClipBPE")
    top = max(self._tokens, default=None)
    next_id = top + 1 if top is not None and (top >= len(self.vocab) or not self.vocab) else len(self.vocab)
    n = 0
    for t in tokens:
      if not t.content or self._tokens.get(self._ids.get(t.content)) == t:
        continue
      i = self._ids.get(t.content, self.vocab.get(t.content))
      if i is None:
        i, next_id = next_id, next_id + 1
      if t.normalized and normalize(t.content) != t.content:
        self._spelled[i] = normalize(t.content)   # matched, and decoded, in that spelling (kept once set)
      self._ids[t.content], self._tokens[i], n = i, t, n + 1
      self._specials |= {t.content} if t.special else set()
    self._matchers = []   # for the raw text, then the normalized; longest first, as leftmost-longest finds
    for normalized in (False, True):
      found = {self._spelled.get(i, t.content) if normalized else t.content: i
               for i, t in sorted(self._tokens.items()) if t.normalized == normalized}
      alts = "|".join(map(regex.escape, sorted(found, key=len, reverse=True)))
      self._matchers.append((regex.compile(alts) if alts else None, found))
    self._cache.clear()
    return n

  def add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
    """Strings only (AddedToken options: use the transformers backend). -> how many were added or changed."""
    tokens = [new_tokens] if isinstance(new_tokens, str) else list(new_tokens)
    if not all(isinstance(t, str) for t in tokens):
      raise Unsupported("ClipBPE.add_tokens takes strings; for AddedToken options use backend='transformers'")
    return self._add([AddedToken(t, normalized=not special_tokens, special=special_tokens) for t in tokens])

  def save_pretrained(self, *args, **kwargs):
    raise Unsupported("ClipBPE writes no tokenizer files: copy the folder, or save with backend='transformers'")

  def _split(self, text: str, which: int):
    """(piece, None) and (added token's text, its id), in order, by matcher 0 (raw text) or 1 (normalized)."""
    pattern, ids = self._matchers[which]
    start = 0
    for m in pattern.finditer(text) if pattern is not None else ():
      yield from [(text[start:m.start()], None)] if m.start() > start else []
      yield m.group(), ids[m.group()]
      start = m.end()
    yield from [(text[start:], None)] if start < len(text) else []

  def _encode(self, text: str) -> list[tuple[int, str]]:
    """(id, token) of every token of `text`, without BOS / EOS."""
    out = []
    for raw, i in self._split(text, 0):
      for piece, i in [(raw, i)] if i is not None else self._split(normalize(raw), 1):
        if i is not None:
          out.append((i, piece))
          continue
        for chunk in _CLIP_SPLIT.findall(piece):
          for word in ("<|", chunk[2:-2], "|>") if chunk in (SOT, EOT) else (chunk,):
            out += [(i, self._model_tokens.get(i, "")) for i in self._bpe(word)]
    return out

  def _bpe(self, word: str) -> list[int]:
    if word in self._cache:
      return self._cache[word]
    chars = [_BYTE_CHARS[b] for b in word.encode("utf-8")]
    sym = [self.vocab.get(c, self.unk_id) for c in chars[:-1]] + [self.vocab.get(chars[-1] + "</w>", self.unk_id)]
    if None in sym:
      raise ValueError(f"{word!r}: a character is missing from the vocabulary, and so is the unknown token")
    # tokenizers' merge loop: a heap of (rank, position); an entry whose pair no longer stands is dropped.
    prev, nxt, alive = list(range(-1, len(sym) - 1)), [*range(1, len(sym)), -1], [True] * len(sym)
    heap = [(self.merges[p][0], k, self.merges[p][1]) for k, p in enumerate(zip(sym, sym[1:])) if p in self.merges]
    heapq.heapify(heap)
    while heap:
      _, k, new = heapq.heappop(heap)
      if not alive[k] or nxt[k] < 0 or self.merges.get((sym[k], sym[nxt[k]]), (0, None))[1] != new:
        continue
      right = nxt[k]
      sym[k], alive[right], nxt[k] = new, False, nxt[right]
      if nxt[k] >= 0:
        prev[nxt[k]] = k
      for a, b in ((prev[k], k), (k, nxt[k])):
        if a >= 0 and b >= 0 and (m := self.merges.get((sym[a], sym[b]))):
          heapq.heappush(heap, (m[0], a, m[1]))
    ids = [s for s, keep in zip(sym, alive) if keep]
    if len(self._cache) < 50000:
      self._cache[word] = ids
    return ids

  def __call__(self, text, add_special_tokens: bool = True, padding=False, truncation=None,
               max_length: int | None = None, return_tensors: str | None = None) -> Encoding:
    """transformers' call on a text or a batch -> input_ids, attention_mask (lists, or "np" int64)."""
    batched = not isinstance(text, str)
    texts = list(text) if batched else [text]
    if not all(isinstance(t, str) for t in texts):
      raise TypeError("text must be a string or a sequence of strings")
    if max_length is not None and padding is False and truncation is None:
      truncation = True   # transformers: a max_length alone truncates
    pads = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
    truncs = {None: False, False: False, "do_not_truncate": False, True: True, "longest_first": True}
    if padding not in pads or truncation not in truncs or return_tensors not in (None, "np"):
      raise Unsupported(f"padding={padding!r}, truncation={truncation!r}, return_tensors={return_tensors!r}")
    padding, truncation = pads[padding], truncs[truncation]
    if max_length is None and self.model_max_length > LARGE_INTEGER:   # transformers: no length, no limit
      padding, truncation = (None if padding == "max_length" else padding), False
    elif max_length is None:
      max_length = self.model_max_length
    extra, rows = (2 if add_special_tokens else 0), []
    for t in texts:
      ids = [i for i, _ in self._encode(t)]
      if truncation and max_length >= extra:   # a length below the special tokens' truncates nothing
        ids = ids[:max_length - extra]
      rows.append([self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids)
    width = max(map(len, rows), default=0) if padding == "longest" else max_length if padding else 0
    out = {"input_ids": [r + [self.pad_token_id] * (width - len(r)) for r in rows],
           "attention_mask": [[1] * len(r) + [0] * (width - len(r)) for r in rows]}
    if return_tensors is None:
      return Encoding({k: v if batched else v[0] for k, v in out.items()})
    if len(set(map(len, out["input_ids"]))) > 1:
      raise ValueError("ids of different lengths make no tensor: pad them (padding='max_length')")
    arrays = {k: np.asarray(v, np.int64).reshape(len(rows), -1) for k, v in out.items()}
    return Encoding(arrays)

  def tokenize(self, text: str) -> list[str]:
    return [t for _, t in self._encode(text)]

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """ids -> text as transformers decodes CLIP: byte-level decoding, each "</w>" -> " ", stripped."""
    out = bytearray()
    for i in np.asarray(ids).reshape(-1).tolist():
      t = self._spelled.get(i, self._tokens[i].content) if i in self._tokens else self._model_tokens.get(i)
      if t is not None and not (skip_special_tokens and t in self._specials):
        out += bytes(_CHAR_BYTES[c] for c in t) if all(c in _CHAR_BYTES for c in t) else t.encode("utf-8")
    return out.decode("utf-8", "replace").replace("</w>", " ").strip()

  def convert_tokens_to_ids(self, tokens):
    if tokens is None or not isinstance(tokens, str):
      return None if tokens is None else [self.convert_tokens_to_ids(t) for t in tokens]
    i = self._ids.get(tokens, self.vocab.get(tokens))
    return i if i is not None or tokens == self.unk_token else self.unk_token_id

  def get_vocab(self) -> dict[str, int]:
    return {**self.vocab, **self._ids}

  @property
  def added_tokens_encoder(self) -> dict[str, int]:
    return {t.content: i for i, t in sorted(self._tokens.items())}

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def __len__(self) -> int:
    return len(self.vocab.keys() | self._ids.keys())

  def __getattr__(self, name: str):
    # bos_token, pad_token_id, ...: the named special tokens (None where the folder names none, as transformers)
    attr = name.removesuffix("_id")
    if attr not in SPECIAL_ATTRS:
      raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
    value = self.__dict__.get("_special", {}).get(attr)
    token = None if value is None else _content(value)
    return token if attr == name or token is None else self.convert_tokens_to_ids(token)
