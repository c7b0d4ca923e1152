"""Task vocabulary: prune a source model's word-embedding table to the tokens a task uses, and rewrite its WordPiece
tokenizer to match (`mbconvert SOURCE --prune-vocab`, `mbconvert prune-vocab`).

A 21k-token Chinese vocabulary spends most of a small model's embedding rows on tokens a task never sees. The kept
tokens are the special ones plus those that occur in the given texts (optionally only those seen `min_count` times,
or the `size` most frequent; with `fill`, the room left up to `size` goes to the dropped words whose loss changes the
model's prediction most); new ids follow the old ids' order. The pruning is exact: WordPiece takes the longest
vocabulary entry at each step, and every entry of the old segmentation of a text whose tokens were all kept is
still the longest in the smaller vocabulary, so such a text gets the same tokens, remapped, and the pruned model
the same logits. A word that needs a dropped token becomes [UNK] (or, in English, other kept pieces).

Objects in, objects out (no paths): the pipeline prunes the loaded source before the mapping, so the factorised
MobileBERT embedding is fitted to the rows that matter.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections import Counter

import torch
from torch import nn

from .data import Examples, encode
from .errors import ConfigError, TokenizerError

log = logging.getLogger("mbconvert")

NAMED_SPECIALS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
BATCH = 1024  # texts per tokenizer call


# ----------------------------------------------------------------------------------------------- texts
def _texts(texts) -> tuple[list[str], list[str] | None]:
    if isinstance(texts, Examples):
        return texts.texts, texts.text_pairs
    return list(texts), None


def _ids(tokenizer, texts: list[str], offsets: bool = False):
    """Token ids (no special tokens, no truncation) of each text, with their character offsets when `offsets`."""
    for start in range(0, len(texts), BATCH):
        enc = tokenizer(texts[start:start + BATCH], add_special_tokens=False, truncation=False,
                        return_offsets_mapping=offsets, return_attention_mask=False, return_token_type_ids=False)
        yield from (zip(enc["input_ids"], enc["offset_mapping"]) if offsets else enc["input_ids"])


def count_tokens(tokenizer, texts) -> Counter:
    """How often each token id occurs in `texts` (a list of texts or `Examples`, second texts included)."""
    counts: Counter = Counter()
    for part in _texts(texts):
        for ids in _ids(tokenizer, part or []):
            counts.update(ids)
    return counts


# ----------------------------------------------------------------------------------------------- selection
def special_ids(tokenizer) -> list[int]:
    """The ids that are always kept: the named special tokens and every special added token."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return sorted(ids)


def select_tokens(counts: Counter, specials, min_count: int = 1, size: int | None = None) -> list[int]:
    """The old ids to keep, ascending: `specials` plus the ids seen at least `min_count` times; with `size`, the
    vocabulary has at most `size` entries, specials included: the most frequent others (ties: the lower id)."""
    specials = set(specials)
    if size is not None and size < len(specials):
        raise ConfigError(f"vocab_size {size} is smaller than the {len(specials)} special tokens that are always "
                          "kept")
    others = [i for i, c in counts.items() if c >= min_count and i not in specials]
    if size is not None:
        others = sorted(others, key=lambda i: (-counts[i], i))[:size - len(specials)]
    return sorted(specials | set(others))


def fill_tokens(model, tokenizer, kept: list[int], size: int, batch_size: int = 256) -> list[int]:
    """`kept` plus up to `size - len(kept)` more old ids, ascending: the dropped words (tokens that the tokenizer
    reads, alone, as themselves) whose pruned reading changes `model`'s prediction on the word most.

    A vocabulary built from the task's texts re-splits or drops the words those texts lack ("casualties" →
    "casual ##ties"); which of them a test text will bring is unknown, but what reading the word wrong does to the
    model is not: each candidate is scored by the KL divergence from the model's class distribution on the word
    read with the full vocabulary to that on the word read with `kept` (ties: the lower id), and the highest fill
    the room. Deterministic: the same model, tokenizer and `kept` give the same ids."""
    from .similarity import predict_logits

    room = size - len(kept)
    old = {i: t for t, i in tokenizer.get_vocab().items()}
    dropped = sorted(set(old) - set(kept))
    if room <= 0 or not dropped:
        return sorted(kept)
    strings = [old[i] for i in dropped]
    words = [(i, w) for i, w, ids in zip(dropped, strings, _ids(tokenizer, strings)) if ids == [i]]
    if not words:
        return sorted(kept)
    texts = Examples([w for _, w in words], None, None)
    cap = model.config.max_position_embeddings
    with torch.no_grad():
        full = predict_logits(model, encode(texts, tokenizer, cap=cap), batch_size).double().log_softmax(-1)
        small = prune_embeddings(model, sorted(kept))
        part = predict_logits(small, encode(texts, prune_tokenizer(tokenizer, sorted(kept)), cap=cap),
                              batch_size).double().log_softmax(-1)
    kl = (full.exp() * (full - part)).sum(-1).tolist()
    best = sorted(range(len(words)), key=lambda k: (-kl[k], words[k][0]))[:room]
    log.info("vocabulary filled with %d of %d dropped words (the largest change of prediction, KL %.3g … %.3g)",
             len(best), len(words), kl[best[0]], kl[best[-1]])
    return sorted(set(kept) | {words[k][0] for k in best})


# ----------------------------------------------------------------------------------------------- tokenizer
def _backend(tokenizer) -> dict:
    """The tokenizer's serialised backend; TokenizerError unless it is a WordPiece tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        spec = json.loads(backend.to_str()) if backend is not None else None
    except Exception:  # tokenizers raises its own types for a backend it cannot serialise
        spec = None
    kind = ((spec or {}).get("model") or {}).get("type")
    if kind != "WordPiece":
        raise TokenizerError(f"vocabulary pruning needs a BERT WordPiece tokenizer; this one is "
                             f"{type(tokenizer).__name__} ({kind or 'no fast tokenizer backend'})")
    if tokenizer.unk_token is None:
        raise TokenizerError("vocabulary pruning needs an [UNK] token (dropped tokens become it); the tokenizer "
                             "has none")
    return spec


def _options(spec: dict) -> dict:
    """What a rebuilt tokenizer must keep: normalisation, pre-tokenisation and the WordPiece options."""
    model = {k: v for k, v in spec["model"].items() if k != "vocab"}
    return {"normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer"), "model": model}


def prune_tokenizer(tokenizer, kept: list[int]):
    """A BertTokenizerFast holding only the old ids `kept` (new id = position in `kept`), with the source's special
    tokens, normalisation and length limit; TokenizerError when the source cannot be rebuilt as one."""
    from transformers import BertTokenizerFast

    spec = _backend(tokenizer)
    old = {i: t for t, i in tokenizer.get_vocab().items()}
    vocab = {old[i]: new for new, i in enumerate(kept)}
    norm = spec.get("normalizer") or {}
    named = {a: getattr(tokenizer, a) for a in NAMED_SPECIALS if getattr(tokenizer, a, None) is not None}
    new = BertTokenizerFast(vocab=vocab, do_lower_case=norm.get("lowercase", getattr(tokenizer, "do_lower_case", True)),
                            tokenize_chinese_chars=norm.get("handle_chinese_chars", True),
                            strip_accents=norm.get("strip_accents"), model_max_length=tokenizer.model_max_length,
                            padding_side=tokenizer.padding_side, truncation_side=tokenizer.truncation_side, **named)
    extra = [t for i, t in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items())
             if str(t) not in named.values() and str(t) in vocab]
    if extra:
        new.add_tokens([copy.copy(t) for t in extra])
    if spec["model"].get("max_input_chars_per_word") is not None:
        new.backend_tokenizer.model.max_input_chars_per_word = spec["model"]["max_input_chars_per_word"]
    rebuilt, wanted = _options(json.loads(new.backend_tokenizer.to_str())), _options(spec)
    if rebuilt != wanted:
        what = next(k for k in wanted if rebuilt[k] != wanted[k])
        raise TokenizerError(f"cannot rewrite this tokenizer as a BERT WordPiece tokenizer: its {what} "
                             f"({json.dumps(wanted[what])[:120]}) is not BERT's")
    if new.get_vocab() != vocab:
        raise TokenizerError("the rewritten tokenizer's ids differ from the pruned vocabulary (duplicate tokens?)")
    return new


def vocab_txt(tokenizer) -> str | None:
    """A WordPiece tokenizer's vocab.txt (one token a line, line number = id); None for another tokenizer or ids
    with gaps."""
    try:
        _backend(tokenizer)
    except TokenizerError:
        return None
    by_id = sorted((i, t) for t, i in tokenizer.get_vocab().items())
    if [i for i, _ in by_id] != list(range(len(by_id))) or any("\n" in t for _, t in by_id):
        return None
    return "".join(t + "\n" for _, t in by_id)


# ----------------------------------------------------------------------------------------------- model
def prune_embeddings(model, kept: list[int]):
    """A copy of the BERT classifier whose word-embedding table holds only the rows `kept` (in that order)."""
    table = model.get_input_embeddings()
    if max(kept) >= table.num_embeddings:
        raise TokenizerError(f"the tokenizer has id {max(kept)} but the word embeddings have {table.num_embeddings} "
                             "rows")
    pad = model.config.pad_token_id
    new_pad = kept.index(pad) if pad is not None and pad in kept else None
    pruned = copy.deepcopy(model)
    rows = nn.Embedding(len(kept), table.embedding_dim, padding_idx=new_pad)
    with torch.no_grad():
        rows.weight.copy_(table.weight[torch.tensor(kept)])
    pruned.set_input_embeddings(rows.to(table.weight.device, table.weight.dtype))
    pruned.config.vocab_size, pruned.config.pad_token_id = len(kept), new_pad
    return pruned


@dataclasses.dataclass
class PrunedVocab:
    """A pruned model and tokenizer, the old id of each new id, and what the pruning did."""

    model: object
    tokenizer: object
    kept: list[int]
    report: dict


def prune_vocab(model, tokenizer, texts, *, min_count: int = 1, size: int | None = None,
                fill: bool = False) -> PrunedVocab:
    """Prune `model`'s word embeddings and `tokenizer` to the special tokens and the tokens of `texts` (a list of
    texts or `Examples`) seen at least `min_count` times, at most `size` entries (specials included); with `fill`,
    the room left below `size` goes to `fill_tokens` (as many dropped whole words as fit)."""
    if fill and size is None:
        raise ConfigError("filling the vocabulary needs its size (vocab_size)")
    _backend(tokenizer)
    texts = texts if isinstance(texts, Examples) else Examples(list(texts), None, None)
    counts = count_tokens(tokenizer, texts)
    specials = special_ids(tokenizer)
    kept = select_tokens(counts, specials, min_count, size)
    selected = len(kept)
    if fill:
        kept = fill_tokens(model, tokenizer, kept, size)
    new_tok = prune_tokenizer(tokenizer, kept)
    pruned = prune_embeddings(model, kept)
    table = model.get_input_embeddings().weight
    (before, hidden), seen = table.shape, len(set(counts) - set(specials))
    report = {"vocab_size_before": before, "vocab_size_after": len(kept), "special_tokens": len(specials),
              "min_count": min_count, "max_size": size, "texts": len(texts), "tokens_seen": seen,
              "seen_but_dropped": seen - (selected - len(specials)), "filled": len(kept) - selected,
              "source_parameters_saved": (before - len(kept)) * hidden,
              "source_bytes_saved": (before - len(kept)) * hidden * table.element_size()}
    return PrunedVocab(pruned, new_tok, kept, report)


def prune_source(src, texts, *, min_count: int = 1, size: int | None = None, fill: bool = False):
    """`prune_vocab` for a loaded `SourceModel` (mbconvert.load): returns (pruned SourceModel, report)."""
    if src.tokenizer is None:
        raise TokenizerError(f"no tokenizer beside {src.path}: pruning the vocabulary needs one; pass --tokenizer DIR")
    p = prune_vocab(src.model, src.tokenizer, texts, min_count=min_count, size=size, fill=fill)
    return dataclasses.replace(src, model=p.model, tokenizer=p.tokenizer), p.report


def prune_to_tokenizer(model, tokenizer, target):
    """`model` (read with `tokenizer`) pruned to the vocabulary of `target`, a tokenizer pruned from `tokenizer`:
    the source of a pruned conversion, made to read the conversion's ids (recover, check)."""
    old, new = tokenizer.get_vocab(), target.get_vocab()
    missing = [t for t in new if t not in old]
    if missing:
        raise TokenizerError(f"the model's tokenizer has {len(missing)} tokens the source's has not (e.g. "
                             f"{missing[0]!r}): it was not pruned from this source's vocabulary")
    return prune_embeddings(model, [old[t] for t, _ in sorted(new.items(), key=lambda kv: kv[1])])


# ----------------------------------------------------------------------------------------------- coverage
def coverage(tokenizer, pruned, texts) -> dict:
    """What pruning costs on `texts`: the share of their tokens that become [UNK] and were not before (tokens
    inside a word the pruned tokenizer reads as [UNK]), the share of texts with such a token, and the share of
    texts the pruned model reads differently at all (a new [UNK], or a word re-split into other kept pieces)."""
    texts, pairs = _texts(texts)
    new_vocab = pruned.get_vocab()
    remap = {i: new_vocab[t] for t, i in tokenizer.get_vocab().items() if t in new_vocab}
    old_unk, new_unk = tokenizer.unk_token_id, pruned.unk_token_id
    tokens = lost = 0
    hit, changed = [False] * len(texts), [False] * len(texts)
    for part in (texts, pairs or []):  # a pair's two texts count as one text
        pairs_of = zip(_ids(tokenizer, part, True), _ids(pruned, part, True))
        for k, ((old_ids, old_off), (new_ids, new_off)) in enumerate(pairs_of):
            unk_spans = [s for i, s in zip(new_ids, new_off) if i == new_unk]
            n = sum(1 for i, (a, b) in zip(old_ids, old_off)
                    if i != old_unk and any(s <= a and b <= e for s, e in unk_spans))
            tokens, lost = tokens + len(old_ids), lost + n
            hit[k] = hit[k] or n > 0
            changed[k] = changed[k] or [remap.get(i) for i in old_ids] != new_ids
    return {"texts": len(texts), "tokens": tokens, "new_unk_tokens": lost,
            "new_unk_token_share": lost / max(tokens, 1), "texts_with_new_unk_share": sum(hit) / max(len(texts), 1),
            "texts_changed_share": sum(changed) / max(len(texts), 1)}


# ----------------------------------------------------------------------------------------------- the pipeline's
def same_vocab(model, tok, source_model, source_tok, source_name: str):
    """The source model, made to read `model`'s token ids: unchanged when the vocabularies agree; pruned to `tok`'s
    vocabulary (exact: mbconvert.vocab) when `model` was converted with --prune-vocab. Without this, the source
    would read the pruned ids as other tokens."""
    from .load import check_tokenizer

    if tok is not None:
        check_tokenizer(tok, model.config.vocab_size)
    if model.config.vocab_size == source_model.config.vocab_size:
        return source_model
    if tok is None or source_tok is None:
        raise TokenizerError(f"the model has {model.config.vocab_size} tokens but {source_name} has "
                             f"{source_model.config.vocab_size}: give both their tokenizers (or the pruned source "
                             "from `mbconvert prune-vocab`)")
    log.warning("the model's vocabulary was pruned (%d of %s's %d tokens): %s is pruned to it, so both read the same "
                "ids (a text with a dropped token reads [UNK] in both; conversion.json's vocabulary.coverage says "
                "how often)", model.config.vocab_size, source_name, source_model.config.vocab_size, source_name)
    return prune_to_tokenizer(source_model, source_tok, tok)


def converted_saving(report: dict, mobile) -> dict:
    """The pruning's saving in the converted model: its factorised word table loses the dropped rows."""
    table = mobile.get_input_embeddings().weight
    params = (report["vocab_size_before"] - report["vocab_size_after"]) * table.shape[1]
    return {**report, "parameters_saved": params, "bytes_saved": params * table.element_size()}
