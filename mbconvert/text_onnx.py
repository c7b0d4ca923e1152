"""String-in ONNX: raw texts → logits and the predicted class, with the BERT tokenizer inside the graph.

`build_text_model` joins a tokenizer graph (`tokenizer_model`) to the plain classifier (model.onnx):

    texts: string [batch]
      → the batch normalised as HF's BertNormalizer and BertPreTokenizer do it (onnxruntime-extensions
        StringRegexReplace; lower-casing and accent stripping by StringMapping, one character at a time)
      → per text (a Loop): onnxruntime-extensions' BertTokenizer op, the word-piece repair, truncation,
        [CLS] … [SEP], padding
      → input_ids, attention_mask, token_type_ids: int64 [batch, width] → model.onnx
    outputs: logits float [batch, labels], label int64 [batch] (the argmax), label_name string [batch]

`width` is the longest row of the batch (dynamic sequence axis) or the export's fixed --seq-len. Truncation is HF's
for one text: at most max_length - 2 word pieces between [CLS] and [SEP].

The graph does more than call the op, because the op alone (as onnxruntime-extensions' own converter builds it) reads
221 of the 3,474 Toutiao test titles (6.4%) differently from the Hugging Face tokenizer (benchmarks/text_parity.py):
- it splits off only part of Unicode punctuation (not the full-width ，？！：（）); its tables of control characters,
  whitespace and CJK ranges differ from HF's, and its lower-casing and accent stripping cover little beyond Latin-1.
  So the graph does all of that first, the way HF does, with HF's own character classes: `hf_characters` and
  `hf_mapping` ask the installed `tokenizers` what it does to every code point (about a second, once a process),
  and the op is left only WordPiece;
- when a word fails WordPiece after some pieces ("3D" with no "##D"), the op keeps the pieces and adds [UNK]; HF
  gives one [UNK] for the whole word. The graph marks every word boundary with a private-use character that the
  op's vocabulary holds as a token of its own (id = vocabulary size), then drops the pieces of each word that ends
  in [UNK], and the marks;
- special tokens written in the text ("[CLS]", "[UNK]") are matched as HF matches them, before normalisation.
Measured with that: 0 texts differ on either benchmark test set, nor on any code point U+0020–U+2FFFF alone or
inside a word, with the Chinese (cased) and the MiniLM (lower-casing) tokenizer.

Limits:
- a NUL character ends the text (onnxruntime-extensions reads the input strings as C strings; HF drops the NUL and
  reads on);
- code points in planes 4–13 (unassigned in every Unicode version) are taken to be ordinary letters, unprobed;
- one text per row: text pairs are not supported; a batch must hold at least one text;
- only BERT WordPiece tokenizers (BertNormalizer with clean_text, BertPreTokenizer, WordPiece with at most 100
  characters a word, [CLS] text [SEP], added tokens matched as written) are accepted; others raise TokenizerError.

Run it in onnxruntime with the extensions' custom-op library registered (`session`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MissingDependencyError, TokenizerError
from .export import accuracy, compare, id2label, median_ms, onnx_session, size_mb
from .onnx_graph import Graph

TEXT_FILE = "model.text.onnx"
CUSTOM_DOMAIN = "ai.onnx.contrib"
OUTPUTS = ("logits", "label", "label_name")
# private-use characters (HF's clean-up removes every one from a text, so none can come from the text itself):
MARK = "\ue000"  # word boundary; the op's vocabulary holds it as a token of its own; U+E001… mark special tokens
STAND_IN = "\uf8fe"  # stands for a character the op would drop but HF keeps (below)
PLACEHOLDER = "\uf8ff"  # prefix of vocabulary entries no text can reach (the op reads one entry a line)
MAX_WORD_CHARS = 100  # the op's WordPiece limit, fixed in its code
# the op's own table of control characters (it drops them); those HF keeps become STAND_IN first, an ordinary
# letter for the op that no vocabulary entry holds (neither do they: unassigned or rare CJK code points)
OP_CONTROL = ((0, 8), (11, 12), (14, 31), (128, 159), (173, 173), (888, 889), (896, 899), (907, 907), (909, 909),
              (930, 930), (8203, 8207), (8234, 8238), (8288, 8302), (11930, 11930), (12020, 12030), (40957, 40958),
              (64110, 64111), (64218, 64254), (173790, 173790), (177973, 177982), (178206, 178207),
              (183970, 183982), (195102, 195102))


def require_extensions():
    """The onnxruntime_extensions module (MissingDependencyError naming the extra when absent)."""
    try:
        import onnxruntime_extensions
    except ImportError:
        raise MissingDependencyError("onnxruntime-extensions is not installed; the string-in ONNX model needs the "
                                     "optional extra: pip install 'mbconvert[export]'") from None
    return onnxruntime_extensions


# ---------------------------------------------------------------------------------------------- the tokenizer
@dataclass(frozen=True)
class TokenizerSpec:
    """What the graph needs from a Hugging Face BERT tokenizer."""

    vocab: tuple[str, ...]  # the op's vocabulary, by id: the tokenizer's, then MARK, then one mark per special token
    specials: tuple[tuple[str, int], ...]  # added tokens matched in the raw text (content, id), longest first
    lowercase: bool
    strip_accents: bool
    chinese_chars: bool
    unk: str
    cls_id: int
    sep_id: int
    unk_id: int
    pad_id: int
    max_length: int
    mapping: tuple[tuple[str, str], ...] = ()  # (character, what HF's accent stripping and lower-casing make of it)

    @property
    def mark_id(self) -> int:
        return len(self.vocab) - len(self.specials) - 1


def _backend(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"the string-in ONNX model needs a Hugging Face fast BERT tokenizer, not "
                             f"{type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def _check_pipeline(state: dict, name: str) -> None:
    norm, pre, model = state.get("normalizer") or {}, state.get("pre_tokenizer") or {}, state.get("model") or {}
    found = (norm.get("type"), pre.get("type"), model.get("type"))
    if found != ("BertNormalizer", "BertPreTokenizer", "WordPiece"):
        raise TokenizerError(f"{name}: the string-in ONNX model supports BERT WordPiece tokenizers only "
                             f"(normalizer, pre-tokenizer, model: {', '.join(map(str, found))})")
    if not norm.get("clean_text", True):
        raise TokenizerError(f"{name}: BertNormalizer(clean_text=False) is not supported (the op always cleans)")
    if model.get("max_input_chars_per_word", MAX_WORD_CHARS) != MAX_WORD_CHARS:
        raise TokenizerError(f"{name}: WordPiece max_input_chars_per_word must be {MAX_WORD_CHARS} (the op's), not "
                             f"{model['max_input_chars_per_word']}")


def _op_vocab(tokenizer) -> list[str]:
    """The vocabulary by id, with unreachable entries (empty, holding a line break or a private-use character: all
    removed from texts before WordPiece) replaced by placeholders, so that one entry a line keeps every id."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    size = max(by_id) + 1
    vocab = []
    for i in range(size):
        token = by_id.get(i, "")
        bare = token[2:] if token.startswith("##") else token
        reachable = bare and not any(c in "\r\n" or 0xE000 <= ord(c) <= 0xF8FF for c in token)
        vocab.append(token if reachable else f"{PLACEHOLDER}{i}")
    return vocab


def _specials(tokenizer, name: str) -> list[tuple[str, int]]:
    """Added tokens (BERT: the special tokens) that HF matches in the raw text, longest first."""
    out = []
    for i, added in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items()):
        if added.normalized or added.lstrip or added.rstrip or added.single_word:
            raise TokenizerError(f"{name}: added token {added.content!r} is matched with options the string-in "
                                 "ONNX model does not support (normalized, lstrip, rstrip or single_word)")
        out.append((added.content, int(i)))
    if len(out) > 0xFF:  # their marks are U+E001–U+E0FF
        raise TokenizerError(f"{name}: {len(out)} added tokens; the string-in ONNX model matches at most 255")
    return sorted(out, key=lambda t: (-len(t[0]), t[1]))


PLANES = ((0x1, 0x3FFFF), (0xE0000, 0x10FFFF))  # 0x40000–0xDFFFF: unassigned in every Unicode version


def _code_points(*planes) -> list[str]:
    return [chr(c) for lo, hi in planes for c in range(lo, hi + 1) if not 0xD800 <= c <= 0xDFFF]


def _per_char(normalizer, chars: list[str], sep: str = "\0") -> list[str]:
    """What `normalizer` makes of each character alone (one call, `sep`-separated: not among `chars`, unchanged)."""
    return normalizer.normalize_str(sep.join(chars)).split(sep)


@functools.lru_cache(maxsize=None)
def hf_characters() -> dict[str, frozenset[str]]:
    """What HF's BertNormalizer and BertPreTokenizer (the installed `tokenizers`, with its Unicode tables) do to each
    code point: `removed` by the clean-up, mapped to a `space`, spaced as `cjk`, split off as `punct`, dropped by
    accent `stripped`. About a second, once a process."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    chars = [c for c in _code_points(*PLANES) if c != "a"]
    clean = _per_char(BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=False,
                                     lowercase=False), chars, "a")
    cjk = _per_char(BertNormalizer(clean_text=False, handle_chinese_chars=True, strip_accents=False,
                                   lowercase=False), chars)
    strip = _per_char(BertNormalizer(clean_text=False, handle_chinese_chars=False, strip_accents=True,
                                     lowercase=False), chars)
    kept = [c for c, form in zip(chars, clean) if form == c and ord(c) < 0xF0000]
    pieces = BertPreTokenizer().pre_tokenize_str("a".join(kept))
    return {"removed": frozenset(c for c, form in zip(chars, clean) if form == "") | {"\0"},
            "space": frozenset(c for c, form in zip(chars, clean) if form == " "),
            "cjk": frozenset(c for c, form in zip(chars, cjk) if form == f" {c} "),
            "punct": frozenset(p for p, _ in pieces if len(p) == 1 and p != "a"),
            "stripped": frozenset(c for c, form in zip(chars, strip) if form == "")}


@functools.lru_cache(maxsize=4)
def hf_mapping(lowercase: bool, strip_accents: bool) -> tuple[tuple[str, str], ...]:
    """Every character that HF's accent stripping (NFD, marks dropped) and lower-casing turn into something else but
    not nothing, with what they become ("Ǎ" → "a", "한" → "ᄒ ᅡ ᆫ" as jamo, "Σ" → "σ"); the op's own are partial."""
    from tokenizers.normalizers import BertNormalizer

    if not (lowercase or strip_accents):
        return ()
    gone = hf_characters()["removed"] | hf_characters()["space"]
    chars = [c for c in _code_points(*PLANES) if c not in gone]
    forms = _per_char(BertNormalizer(clean_text=False, handle_chinese_chars=False, strip_accents=strip_accents,
                                     lowercase=lowercase), chars)
    return tuple((c, form) for c, form in zip(chars, forms) if form not in ("", c))


def _class(chars) -> str:
    """An RE2 character class body for `chars` (code point ranges)."""
    points, ranges = sorted(ord(c) for c in chars), []
    for p in points:
        if ranges and ranges[-1][1] == p - 1:
            ranges[-1][1] = p
        else:
            ranges.append([p, p])
    return "".join(f"\\x{{{lo:X}}}" + (f"-\\x{{{hi:X}}}" if hi > lo else "") for lo, hi in ranges)


def tokenizer_spec(tokenizer, max_length: int) -> TokenizerSpec:
    """Read and check a HF BERT tokenizer (TokenizerError if the graph cannot reproduce it)."""
    name = type(tokenizer).__name__
    state = _backend(tokenizer)
    _check_pipeline(state, name)
    if max_length < 2:
        raise TokenizerError(f"max length {max_length} leaves no room for [CLS] and [SEP]")
    ids = {k: tokenizer.convert_tokens_to_ids(getattr(tokenizer, k, None) or "")
           for k in ("cls_token", "sep_token", "unk_token")}
    if None in ids.values() or tokenizer("")["input_ids"] != [ids["cls_token"], ids["sep_token"]]:
        raise TokenizerError(f"{name}: the string-in ONNX model needs [CLS] text [SEP] encoding with known "
                             "[CLS], [SEP] and [UNK] tokens")
    norm, model = state["normalizer"], state["model"]
    specials = _specials(tokenizer, name)
    lowercase = bool(norm.get("lowercase", True))
    strip = norm.get("strip_accents")
    vocab = _op_vocab(tokenizer) + [MARK] + [chr(0xE001 + k) for k in range(len(specials))]
    pad = tokenizer.pad_token_id
    strip = lowercase if strip is None else bool(strip)
    return TokenizerSpec(vocab=tuple(vocab), specials=tuple(specials), lowercase=lowercase, strip_accents=strip,
                         chinese_chars=bool(norm.get("handle_chinese_chars", True)), unk=model["unk_token"],
                         cls_id=ids["cls_token"], sep_id=ids["sep_token"], unk_id=ids["unk_token"],
                         pad_id=0 if pad is None else int(pad), max_length=int(max_length),
                         mapping=hf_mapping(lowercase, strip))


# ---------------------------------------------------------------------------------------------- the graph
class _Graph(Graph):
    """The shared builder plus the string rewrite the tokenizer graph uses."""

    def replace(self, text: str, pattern: str, rewrite: str) -> str:
        return self.op("StringRegexReplace", [text, self.const(pattern, "pattern"), self.const(rewrite, "rewrite")],
                       "text", domain=CUSTOM_DOMAIN, global_replace=1)


def _literal(text: str) -> str:
    """An RE2 pattern matching `text` literally."""
    return "".join("\\" + c if c in r"\^$.|?*+()[]{}" else c for c in text)


def _normalize(g: _Graph, texts: str, spec: TokenizerSpec) -> tuple[str, str | None]:
    """The whole batch as HF's BertNormalizer and BertPreTokenizer see it, every word boundary marked: special tokens
    matched, clean-up, whitespace, CJK characters, accent marks dropped, punctuation split off. Returns (texts, None);
    or, when the tokenizer lower-cases or strips accents, (characters, row offsets): every character of every text,
    mapped to HF's form of it (`hf_mapping`; StringMapping), each row joined again in the Loop."""
    hf = hf_characters()
    removed = hf["removed"]
    if spec.specials:
        reserved = {chr(0xE000 + k) for k in range(len(spec.specials) + 1)}
        texts = g.replace(texts, f"[{_class(reserved)}]", "")  # HF removes them; they mark special tokens below
        for k, (content, _) in enumerate(spec.specials):
            texts = g.replace(texts, _literal(content), f" {chr(0xE001 + k)} ")
        removed = removed - reserved
    if spec.strip_accents:  # HF drops them after the splits below, which they do not touch
        removed = removed | hf["stripped"]
    texts = g.replace(texts, f"[{_class(removed)}]", "")
    texts = g.replace(texts, f"[{_class(hf['space'])}]+", f" {MARK} ")
    # CJK characters as written (HF: before lower-casing); punctuation after it, so characters that are mapped
    # (below) have the punctuation in their forms marked by the map instead
    split = (hf["cjk"] if spec.chinese_chars else set()) | (hf["punct"] - {c for c, _ in spec.mapping})
    texts = g.replace(texts, f"[{_class(split)}]", rf" {MARK} \0 {MARK} ")
    op_control = {chr(c) for lo, hi in OP_CONTROL for c in range(lo, hi + 1)} - hf["removed"]
    texts = g.replace(texts, f"[{_class(op_control)}]", STAND_IN)
    if not spec.mapping:
        return texts, None
    pieces = r"([\x00-\x40\x5B-\x7F]+|.)"  # runs of ASCII other than A-Z (never mapped) or one character
    chars, _, _, offsets = g.op("StringRegexSplitWithOffsets", [texts, g.const(pieces, "pattern"),
                                                                 g.const(".+", "keep")], "chars", outputs=4,
                                domain=CUSTOM_DOMAIN)
    table = "\n".join(c + "\t" + "".join(f" {MARK} {x} {MARK} " if x in hf["punct"] else x for x in form)
                      for c, form in spec.mapping)
    return g.op("StringMapping", [chars], "mapped", domain=CUSTOM_DOMAIN, map=table), offsets


def _repair(g: _Graph, pieces: str, spec: TokenizerSpec) -> str:
    """Word pieces between [CLS] and [SEP] (marks included) → HF's ids: a word that ends in [UNK] becomes one [UNK];
    marks dropped; special-token marks mapped to their ids."""
    from onnx import TensorProto

    ids = g.op("Concat", [pieces, g.const(np.array([spec.mark_id], np.int64))], axis=0)  # every word ends in a mark
    is_mark = g.op("Equal", [ids, g.const(np.int64(spec.mark_id))])
    is_unk = g.op("Equal", [ids, g.const(np.int64(spec.unk_id))])
    word = g.op("CumSum", [g.op("Cast", [is_mark], to=TensorProto.INT64), g.const(np.int64(0))], exclusive=1)
    marks = g.op("Squeeze", [g.op("NonZero", [is_mark]), g.const(np.array([0], np.int64))])
    word_end = g.op("Gather", [marks, word])
    unk = g.op("Cast", [is_unk], to=TensorProto.INT64)
    unks = g.op("CumSum", [unk, g.const(np.int64(0))])
    later = g.op("Add", [g.op("Sub", [g.op("Gather", [unks, word_end]), unks]), unk])  # [UNK]s from here to word end
    failed = g.op("Greater", [later, g.const(np.int64(0))])
    keep = g.op("And", [g.op("Not", [is_mark]), g.op("Or", [g.op("Not", [failed]), is_unk])])
    ids = g.op("Compress", [ids, keep], axis=0)
    if spec.specials:
        table = np.arange(len(spec.vocab), dtype=np.int64)
        table[spec.mark_id + 1:] = [i for _, i in spec.specials]
        ids = g.op("Gather", [g.const(table, "ids"), ids])
    return ids


def _row_text(g: _Graph, texts: str, offsets: str | None) -> str:
    """Text i of the batch, [1]: an element of `texts`, or its characters (`offsets`) joined."""
    if offsets is None:
        return g.op("Unsqueeze", [g.op("Gather", [texts, "i"]), g.const(np.array([0], np.int64))])
    bounds = g.op("Slice", [offsets, g.op("Unsqueeze", ["i", g.const(np.array([0], np.int64))]),
                            g.op("Add", [g.op("Unsqueeze", ["i", g.const(np.array([0], np.int64))]),
                                         g.const(np.array([2], np.int64))])])
    chars = g.op("Slice", [texts, g.op("Slice", [bounds, g.const(np.array([0], np.int64)),
                                                 g.const(np.array([1], np.int64))]),
                           g.op("Slice", [bounds, g.const(np.array([1], np.int64)),
                                          g.const(np.array([2], np.int64))])])
    return g.op("StringJoin", [chars, g.const("", "sep"), g.const(np.int64(0), "axis")], "joined",
                domain=CUSTOM_DOMAIN)


def _loop_body(spec: TokenizerSpec, texts: str, offsets: str | None, width: int):
    """One text: the op, the repair, truncation, [CLS] … [SEP], padding to `width`; scan outputs ids, mask, length."""
    from onnx import TensorProto, helper

    g = _Graph("row/")
    text = _row_text(g, texts, offsets)
    op_ids = g.op("BertTokenizer", [text], "op_ids", outputs=3, domain=CUSTOM_DOMAIN,
                  vocab_file="\n".join(spec.vocab), do_lower_case=0, strip_accents=0, tokenize_chinese_chars=0,
                  do_basic_tokenize=1,  # lower-casing, accents and CJK: done before, as HF does them
                  unk_token=spec.unk, cls_token=spec.vocab[spec.cls_id], sep_token=spec.vocab[spec.sep_id],
                  pad_token=spec.unk, mask_token=spec.unk, suffix_indicator="##", max_length=-1)[0]
    pieces = g.op("Slice", [op_ids, g.const(np.array([1], np.int64)), g.const(np.array([-1], np.int64))])
    ids = g.op("Slice", [_repair(g, pieces, spec), g.const(np.array([0], np.int64)),
                         g.const(np.array([spec.max_length - 2], np.int64))])
    ids = g.op("Concat", [g.const(np.array([spec.cls_id], np.int64)), ids,
                          g.const(np.array([spec.sep_id], np.int64))], axis=0)
    length = g.op("Shape", [ids])
    pads = g.op("Concat", [g.const(np.array([0], np.int64)), g.op("Sub", [g.const(np.array([width], np.int64)),
                                                                            length])], axis=0)
    g.nodes.append(helper.make_node("Identity", ["cond"], ["cond_out"]))
    g.nodes.append(helper.make_node("Pad", [ids, pads, g.const(np.int64(spec.pad_id))], ["row_ids"]))
    ones = g.op("ConstantOfShape", [length], value=helper.make_tensor("one", TensorProto.INT64, [1], [1]))
    g.nodes.append(helper.make_node("Pad", [ones, pads, g.const(np.int64(0))], ["row_mask"]))
    g.nodes.append(helper.make_node("Squeeze", [length, g.const(np.array([0], np.int64))], ["row_length"]))
    int64 = TensorProto.INT64
    return helper.make_graph(
        g.nodes, "tokenize_one", [helper.make_tensor_value_info("i", int64, []),
                                  helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("row_ids", int64, [width]),
         helper.make_tensor_value_info("row_mask", int64, [width]),
         helper.make_tensor_value_info("row_length", int64, [])], initializer=g.consts)


def tokenizer_model(spec: TokenizerSpec, opset: int = 17, ir_version: int | None = None, fixed: bool = False):
    """texts string [batch] → input_ids, attention_mask, token_type_ids int64 [batch, width]: width = max_length
    when `fixed`, else the batch's longest row."""
    from onnx import TensorProto, helper

    g = _Graph("tok/")
    normalized, offsets = _normalize(g, "texts", spec)
    batch = g.op("Gather", [g.op("Shape", ["texts"]), g.const(np.int64(0))])
    ids, mask, lengths = g.op("Loop", [batch, ""], "rows", outputs=3,
                              body=_loop_body(spec, normalized, offsets, spec.max_length))
    if fixed:
        g.nodes += [helper.make_node("Identity", [ids], ["input_ids"]),
                    helper.make_node("Identity", [mask], ["attention_mask"])]
    else:
        width = g.op("Unsqueeze", [g.op("ReduceMax", [lengths], keepdims=0), g.const(np.array([0], np.int64))])
        start, axis = g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64))
        g.nodes += [helper.make_node("Slice", [ids, start, width, axis], ["input_ids"]),
                    helper.make_node("Slice", [mask, start, width, axis], ["attention_mask"])]
    g.nodes.append(helper.make_node("Mul", ["attention_mask", g.const(np.int64(0))], ["token_type_ids"]))
    seq = spec.max_length if fixed else "sequence"
    graph = helper.make_graph(
        g.nodes, "tokenizer", [helper.make_tensor_value_info("texts", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", seq])
         for n in ("input_ids", "attention_mask", "token_type_ids")], initializer=g.consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(CUSTOM_DOMAIN, 1)])
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def build_text_model(plain, spec: TokenizerSpec, labels: list[str], fixed: bool = False):
    """The string-in model: `tokenizer_model` feeding `plain` (a ModelProto or path of the ids-in classifier with
    inputs input_ids, attention_mask, token_type_ids and output logits), plus label and label_name."""
    import onnx
    from onnx import TensorProto, compose, helper

    plain = onnx.load(str(plain)) if isinstance(plain, (str, Path)) else plain
    tok = tokenizer_model(spec, _opset(plain), plain.ir_version, fixed)
    names = {i.name for i in plain.graph.input}
    io_map = [(n, n) for n in ("input_ids", "attention_mask", "token_type_ids") if n in names]
    props = {p.key: p.value for p in plain.metadata_props}
    plain = onnx.ModelProto.FromString(plain.SerializeToString())
    del plain.metadata_props[:]
    model = compose.merge_models(tok, plain, io_map=io_map, outputs=["logits"], producer_name="mbconvert")
    g = _Graph("head/")
    g.nodes.append(helper.make_node("ArgMax", ["logits"], ["label"], axis=-1, keepdims=0))
    g.nodes.append(helper.make_node("Gather", [g.const(np.array(labels, dtype=object), "names"), "label"],
                                    ["label_name"]))
    model.graph.node.extend(g.nodes)
    model.graph.initializer.extend(g.consts)
    model.graph.output.extend([helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
                               helper.make_tensor_value_info("label_name", TensorProto.STRING, ["batch"])])
    helper.set_model_props(model, props | {"inputs": "texts", "outputs": ",".join(OUTPUTS),
                                           "max_length": str(spec.max_length)})
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------------------------------- running it
def session(model, threads: int = 2):
    """An onnxruntime session (CPU) with the extensions' custom ops registered; `model`: path or ModelProto."""
    import onnxruntime as ort

    ext = require_extensions()
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(ext.get_library_path())
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def _strings(texts) -> np.ndarray:
    return np.array(list(texts), dtype=object)


def run_text(sess, texts, outputs=("logits",), batch: int = 32) -> list[np.ndarray]:
    """`outputs` of a string-in session over `texts`, `batch` texts a call, concatenated."""
    texts = list(texts)
    parts = [sess.run(list(outputs), {"texts": _strings(texts[i:i + batch])}) for i in range(0, len(texts), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]


def ort_ids(sess, texts, batch: int = 64) -> list[list[int]]:
    """Token ids a tokenizer-model session gives each text (padding removed), `batch` texts a call."""
    texts, out = list(texts), []
    for start in range(0, len(texts), batch):
        ids, mask = sess.run(["input_ids", "attention_mask"], {"texts": _strings(texts[start:start + batch])})
        out += [row[m == 1].tolist() for row, m in zip(ids, mask)]
    return out


def hf_ids(tokenizer, texts, max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def token_parity(tokenizer, texts, max_length: int, examples: int = 3, sess=None) -> dict:
    """Token-id parity of the in-graph tokenizer with `tokenizer` (HF) on `texts`: how many texts get other ids, and
    the first `examples` of them (text, HF ids, ORT ids). `sess`: a tokenizer-model session (built when None)."""
    texts = list(texts)
    if sess is None:
        sess = session(tokenizer_model(tokenizer_spec(tokenizer, max_length)), threads=1)
    reference, ours = hf_ids(tokenizer, texts, max_length), ort_ids(sess, texts)
    differing = [k for k, (a, b) in enumerate(zip(reference, ours)) if a != b]
    return {"texts": len(texts), "differing": len(differing),
            "share_differing": len(differing) / len(texts) if texts else 0.0, "max_length": max_length,
            "examples": [{"text": texts[k], "hf_ids": reference[k], "ort_ids": ours[k]} for k in differing[:examples]]}


def text_latency(sess, texts, batch: int = 1, warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds of one call on the first `batch` of `texts` (repeated when fewer)."""
    texts = list(texts)
    feeds = {"texts": _strings([texts[k % len(texts)] for k in range(batch)])}
    return median_ms(lambda: sess.run(["logits"], feeds), repeats, warmup)


# ---------------------------------------------------------------------------------------------- in the export
def unsupported(tokenizer) -> str | None:
    """Why `tokenizer` cannot go inside the graph (None: it can)."""
    if tokenizer is None:
        return "no tokenizer (pass --tokenizer DIR)"
    try:
        tokenizer_spec(tokenizer, 8)
    except TokenizerError as e:
        return str(e)
    return None


def _plain_logits(plain: Path, tokenizer, texts: list[str], max_length: int, fixed: bool, threads: int):
    """The ids-in model on the HF tokenizer's ids at the same length: the path the string-in model replaces."""
    sess, out = onnx_session(plain, threads), []
    for start in range(0, len(texts), 32):
        enc = tokenizer(texts[start:start + 32], truncation=True, max_length=max_length, return_tensors="np",
                        padding="max_length" if fixed else True, return_token_type_ids=True)
        names = {i.name for i in sess.get_inputs()}
        out.append(sess.run(["logits"], {k: enc[k].astype(np.int64) for k in names})[0])
    return np.concatenate(out)


def export_text_format(model, plain: Path, folder: Path, tokenizer, texts, inputs, config) -> dict:
    """model.text.onnx next to `plain` (model.onnx) and export.json's section: token-id parity with the HF tokenizer
    and logit parity with `plain` fed by it, on `texts` (the export's --data rows; without them, texts decoded from
    the synthetic rows), accuracy and latency."""
    max_length = config.seq_len or model.config.max_position_embeddings
    spec, fixed = tokenizer_spec(tokenizer, max_length), config.seq_len is not None
    names = id2label(model)
    path = folder / TEXT_FILE
    built = build_text_model(plain, spec, [names[str(i)] for i in range(len(names))], fixed)
    import onnx

    onnx.save(built, str(path))
    source = "data" if texts is not None else "decoded synthetic rows"
    texts = list(texts)[:len(inputs.input_ids)] if texts is not None else \
        tokenizer.batch_decode(inputs.input_ids, skip_special_tokens=True)
    labels = inputs.labels if source == "data" else None
    sess = session(path, config.threads)
    logits = run_text(sess, texts)[0]
    reference = _plain_logits(plain, tokenizer, texts, max_length, fixed, config.threads)
    tokens = token_parity(tokenizer, texts, max_length, sess=session(tokenizer_model(spec, fixed=fixed),
                                                                        config.threads))
    section = {"file": path.name, "size_mb": size_mb(path), "inputs": "texts", "outputs": list(OUTPUTS),
               "max_length": max_length, "texts": source, "token_parity": tokens,
               "vs_onnx": compare(reference, logits, config.parity_atol), "accuracy": accuracy(logits, labels),
               "accuracy_onnx": accuracy(reference, labels),
               "latency": {f"batch{b}_ms": text_latency(sess, texts, b, repeats=config.latency_repeats)
                           for b in config.latency_batch_sizes}}
    if tokens["differing"]:
        section["warning"] = (f"{tokens['differing']} of {tokens['texts']} texts get other token ids than the HF "
                              "tokenizer (export.json: onnx-text.token_parity.examples)")
    elif not section["vs_onnx"]["passed"]:
        section["warning"] = (f"string-in logits differ from model.onnx by {section['vs_onnx']['max_abs_diff']:.3g}")
    return section
