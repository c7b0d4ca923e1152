"""Issue 18: task vocabulary. `--prune-vocab` keeps the special tokens and the tokens the task's texts use, rewrites
the tokenizer to match, and prunes the source before the mapping; `mbconvert prune-vocab` writes the pruned source.
Pruning the source is exact: a text whose tokens were all kept gives the same logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, BertTokenizerFast)

import helpers
from mbconvert.cli import main
from mbconvert.config import ConvertConfig
from mbconvert.errors import ConfigError, TokenizerError
from mbconvert.vocab import coverage, fill_tokens, prune_vocab, select_tokens

EN = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "on", "a", "mat", "play", "run",
      "##ing", "##in", "##g", "##s", "##n", "##er", ".", ",", "!", "é"]
ZH_TEXTS = ["一丁七万丈", "丁七七三", "万万丈一"]  # the first CJK characters of helpers.CHARS
EN_TEXTS = ["The cat sat on a mat.", "a DOG, playing!", "The dogs run."]


def english_tokenizer() -> BertTokenizerFast:
    """A tiny lower-casing English WordPiece vocabulary (continuation pieces are ordinary entries)."""
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(EN)}, do_lower_case=True)


def english_student(seed=0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(EN), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(params=["chinese", "english"])
def case(request, tokenizer):
    if request.param == "chinese":
        return helpers.random_student(hidden=64, layers=2, heads=2, intermediate=128), tokenizer, ZH_TEXTS
    return english_student(), english_tokenizer(), EN_TEXTS


def logits(model, tokenizer, texts) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


# ------------------------------------------------------------------------------------------ the object-level API
def test_pruned_ids_are_the_old_ids_remapped_and_logits_are_unchanged(case):
    model, tok, texts = case
    p = prune_vocab(model, tok, texts)
    assert len(p.tokenizer) == p.model.config.vocab_size == len(p.kept) < len(tok)
    for text in texts:
        old, new = tok(text)["input_ids"], p.tokenizer(text)["input_ids"]
        assert [p.kept[i] for i in new] == old, text
    torch.testing.assert_close(logits(p.model, p.tokenizer, texts), logits(model, tok, texts), rtol=1e-5, atol=1e-5)


def test_the_pruned_tokenizer_keeps_the_normalisation_and_special_tokens(case):
    model, tok, texts = case
    p = prune_vocab(model, tok, texts)
    assert p.tokenizer.all_special_tokens == tok.all_special_tokens
    assert [p.kept[i] for i in p.tokenizer.all_special_ids] == tok.all_special_ids
    shouted = [t.upper() for t in texts]  # lower-casing still applies (Chinese has no case: the same text)
    assert [[p.kept[i] for i in ids] for ids in p.tokenizer(shouted)["input_ids"]] == tok(shouted)["input_ids"]
    assert p.model.config.pad_token_id == p.tokenizer.pad_token_id


def test_a_dropped_chinese_character_becomes_unk_and_the_model_reads_it_as_the_old_unk(tokenizer):
    model = helpers.random_student(hidden=64, layers=2, heads=2, intermediate=128)
    p = prune_vocab(model, tokenizer, ZH_TEXTS)
    text = "一丁九七"  # 九 is in the old vocabulary, not in ZH_TEXTS
    ids = p.tokenizer(text)["input_ids"]
    assert p.tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "一", "丁", "[UNK]", "七", "[SEP]"]
    old_ids = tokenizer(text)["input_ids"]
    as_unk = torch.tensor([[i if i in p.kept else tokenizer.unk_token_id for i in old_ids]])
    with torch.no_grad():
        expected = model(input_ids=as_unk).logits
    torch.testing.assert_close(logits(p.model, p.tokenizer, [text]), expected, rtol=1e-5, atol=1e-5)


def test_coverage_counts_the_tokens_that_become_unk_and_the_words_that_are_re_split():
    tok = english_tokenizer()
    p = prune_vocab(english_student(), tok, ["the cat sat", "playin playg"])  # play ##in, play ##g; never ##ing
    assert "##ing" not in p.tokenizer.get_vocab() and "##in" in p.tokenizer.get_vocab()
    eval_texts = ["the cat sat", "the dog sat", "playing"]
    cov = coverage(tok, p.tokenizer, eval_texts)
    # "dog" (1 token of 8) becomes [UNK]; "playing" = play ##ing before, play ##in ##g now: changed, not [UNK]
    assert p.tokenizer.tokenize("playing") == ["play", "##in", "##g"]
    assert cov["tokens"] == 3 + 3 + 2 and cov["new_unk_tokens"] == 1
    assert cov["new_unk_token_share"] == pytest.approx(1 / 8)
    assert cov["texts_with_new_unk_share"] == pytest.approx(1 / 3)
    assert cov["texts_changed_share"] == pytest.approx(2 / 3)


def test_vocab_size_and_min_count_select_as_specified(tokenizer):
    from collections import Counter

    counts = Counter({110: 3, 120: 2, 115: 2, 130: 1, 100: 9})  # 100 is [UNK]: special, kept anyway
    specials = [0, 100, 101, 102, 103]
    assert select_tokens(counts, specials) == [0, 100, 101, 102, 103, 110, 115, 120, 130]
    assert select_tokens(counts, specials, min_count=2) == [0, 100, 101, 102, 103, 110, 115, 120]
    assert select_tokens(counts, specials, size=7) == [0, 100, 101, 102, 103, 110, 115]  # tie 115/120: the lower id
    assert select_tokens(counts, specials, min_count=3, size=9) == [0, 100, 101, 102, 103, 110]
    assert select_tokens(counts, specials, size=5) == specials
    with pytest.raises(ConfigError, match="special tokens"):
        select_tokens(counts, specials, size=4)
    model = helpers.random_student(hidden=64, layers=2, heads=2, intermediate=128)
    p = prune_vocab(model, tokenizer, ["一一一丁丁七七万"], size=7)  # 一 ×3, then 丁/七 ×2 (丁 has the lower id)
    assert p.tokenizer.convert_ids_to_tokens(list(range(5, 7))) == ["一", "丁"]
    assert p.report["vocab_size_after"] == 7 and p.report["seen_but_dropped"] == 2


def kl_of_reading_alone(model, tok, pruned_model, pruned_tok, word) -> float:
    """KL from the model's class distribution on `word` read with the full vocabulary to that with the pruned one."""
    full = logits(model, tok, [word]).double().log_softmax(-1)
    part = logits(pruned_model, pruned_tok, [word]).double().log_softmax(-1)
    return float((full.exp() * (full - part)).sum())


def test_vocab_fill_gives_the_room_to_the_dropped_words_whose_loss_changes_the_prediction_most():
    model, tok = english_student(), english_tokenizer()
    texts = ["the cat sat"]
    base = prune_vocab(model, tok, texts)
    # the candidates: dropped tokens that read, alone, as themselves (never a ##piece)
    words = [w for w in EN if tok.convert_tokens_to_ids(w) not in base.kept and tok.tokenize(w) == [w]]
    assert "dog" in words and "##ing" not in words and len(words) >= 4
    kl = {w: kl_of_reading_alone(model, tok, base.model, base.tokenizer, w) for w in words}
    expected = sorted(words, key=lambda w: (-kl[w], tok.convert_tokens_to_ids(w)))[:3]
    p = prune_vocab(model, tok, texts, size=len(base.kept) + 3, fill=True)
    assert len(p.kept) == len(base.kept) + 3 and set(base.kept) < set(p.kept)
    assert sorted(set(p.kept) - set(base.kept)) == sorted(tok.convert_tokens_to_ids(expected))
    assert p.report["filled"] == 3 and p.report["seen_but_dropped"] == 0
    for w in expected:  # a filled word reads as itself again, and the model reads it as the unpruned one did
        assert p.tokenizer.tokenize(w) == [w]
        torch.testing.assert_close(logits(p.model, p.tokenizer, [w]), logits(model, tok, [w]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(p.model, p.tokenizer, texts), logits(model, tok, texts), rtol=1e-5, atol=1e-5)
    assert prune_vocab(model, tok, texts, size=len(base.kept) + 3, fill=True).kept == p.kept  # deterministic


def test_vocab_fill_takes_every_candidate_when_the_room_exceeds_them_and_nothing_without_room(tokenizer):
    model, tok = english_student(), english_tokenizer()
    base = prune_vocab(model, tok, ["the cat sat"])
    words = [w for w in EN if tok.convert_tokens_to_ids(w) not in base.kept and tok.tokenize(w) == [w]]
    everything = fill_tokens(model, tok, base.kept, len(EN))
    assert everything == sorted(set(base.kept) | set(tok.convert_tokens_to_ids(words)))
    assert fill_tokens(model, tok, base.kept, len(base.kept)) == base.kept
    capped = prune_vocab(model, tok, ["the cat sat on a mat"], size=len(base.kept), fill=True)  # full: no room
    assert capped.report["filled"] == 0 and len(capped.kept) == len(base.kept)
    with pytest.raises(ConfigError, match="vocab_size"):
        prune_vocab(model, tok, ["the cat"], fill=True)


def test_vocab_fill_needs_prune_vocab_and_a_size():
    with pytest.raises(ConfigError, match="--prune-vocab"):
        ConvertConfig(vocab_fill=True)
    with pytest.raises(ConfigError, match="--vocab-size"):
        ConvertConfig(prune_vocab=True, vocab_fill=True)
    assert ConvertConfig(prune_vocab=True, vocab_size=100, vocab_fill=True).vocab_fill is True


@pytest.mark.parametrize("fields", [dict(vocab_size=0), dict(vocab_size=-3), dict(vocab_size=math.nan),
                                    dict(vocab_min_count=0), dict(vocab_min_count=-1), dict(vocab_min_count=math.nan),
                                    dict(vocab_min_count=1.5), dict(vocab_fill="yes", vocab_size=100)])
def test_impossible_vocabulary_options_are_config_errors(fields):
    with pytest.raises(ConfigError, match=next(iter(fields))):
        ConvertConfig(prune_vocab=True, **fields)


def test_vocabulary_options_without_prune_vocab_are_refused_not_ignored():
    with pytest.raises(ConfigError, match="--prune-vocab"):
        ConvertConfig(vocab_size=1000)
    with pytest.raises(ConfigError, match="--prune-vocab"):
        ConvertConfig(vocab_min_count=2)


def test_a_tokenizer_that_is_not_wordpiece_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(vocab={"[UNK]": 0, "a": 1, "b": 2, "ab": 3}, merges=[("a", "b")], unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]")
    model = english_student()
    with pytest.raises(TokenizerError, match="WordPiece") as e:
        prune_vocab(model, tok, ["ab a b"])
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ the commands
@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vocab")
    model = helpers.random_student(hidden=64, layers=2, heads=2, intermediate=128)
    rows = helpers.synthetic_rows(80, seed=11)
    for r in rows[:40]:  # the training texts leave out some characters (CHARS[300:]): a real pruning
        r["text"] = "".join(c for c in r["text"] if c < helpers.CHARS[300]) or helpers.CHARS[0]
    model.save_pretrained(str(d / "student"))
    tokenizer.save_pretrained(str(d / "student"))
    return {"dir": d, "student": d / "student", "train": helpers.write_jsonl(d / "train.jsonl", rows[:40]),
            "dev": helpers.write_jsonl(d / "dev.jsonl", rows[40:])}


def cli(*args) -> int:
    return main([str(a) for a in args])


def test_prune_vocab_command_writes_a_bert_folder_that_reads_like_the_source(student, tokenizer, tmp_path):
    out = tmp_path / "pruned"
    assert cli("prune-vocab", student["student"], "--vocab-from", student["train"], "--eval", student["dev"],
               "-o", out) == 0
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    report = json.loads((out / "vocabulary.json").read_text())
    assert model.config.vocab_size == len(tok) == report["vocab_size_after"] < report["vocab_size_before"] == 504
    assert (out / "vocab.txt").read_text(encoding="utf-8").splitlines() == tok.convert_ids_to_tokens(range(len(tok)))
    assert 0 < report["coverage"]["new_unk_token_share"] < 1  # the dev texts use characters the training texts lack
    train = [r["text"] for r in helpers.read_jsonl(student["train"])]
    source = AutoModelForSequenceClassification.from_pretrained(str(student["student"])).eval()
    torch.testing.assert_close(logits(model, tok, train), logits(source, tokenizer, train), rtol=1e-5, atol=1e-5)
    plain = tmp_path / "corpus.txt"  # a plain text file: one text a line
    plain.write_text("\n".join(train) + "\n", encoding="utf-8")
    assert cli("prune-vocab", student["student"], "--vocab-from", plain, "-o", tmp_path / "from-txt") == 0
    assert (tmp_path / "from-txt" / "vocab.txt").read_bytes() == (out / "vocab.txt").read_bytes()


def test_prune_vocab_command_fills_the_vocabulary_to_its_size(student, tokenizer, tmp_path):
    out = tmp_path / "filled"
    assert cli("prune-vocab", student["student"], "--vocab-from", student["train"], "--vocab-size", "300",
               "--vocab-fill", "-o", out) == 0
    report = json.loads((out / "vocabulary.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == report["vocab_size_after"] == 300 and report["filled"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    train = [r["text"] for r in helpers.read_jsonl(student["train"])]
    source = AutoModelForSequenceClassification.from_pretrained(str(student["student"])).eval()
    torch.testing.assert_close(logits(model, tok, train), logits(source, tokenizer, train), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, says", [
    (["--vocab-from", "{train}"], "--prune-vocab"),  # a vocabulary option alone is refused, not ignored
    (["--prune-vocab"], "--vocab-from"),  # no texts to keep the tokens of
    (["--prune-vocab", "--vocab-from", "{dir}/missing.txt"], "missing.txt"),
    (["--prune-vocab", "--train", "{train}", "--vocab-size", "4"], "special tokens"),
    (["--prune-vocab", "--train", "{train}", "--vocab-fill"], "--vocab-size"),
])
def test_a_pruning_without_texts_or_with_impossible_values_is_one_line_exit_2(args, says, student, tmp_path, capsys):
    out = tmp_path / "out"
    args = [a.format(train=student["train"], dir=tmp_path) for a in args]
    code = cli(student["student"], "--bottleneck", "32", "--embedding-size", "32", *args, "-o", out)
    err = capsys.readouterr().err
    assert code == 2 and err.count("mbconvert: error:") == 1 and says in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.fixture(scope="module")
def pruned_conversion(student, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned_conversion") / "out"
    assert cli(student["student"], "--bottleneck", "32", "--embedding-size", "32", "--train", student["train"],
               "--eval", student["dev"], "--steps", "2", "--batch-size", "8", "--threads", "1", "--prune-vocab",
               "-o", out) == 0
    return out


def test_convert_with_prune_vocab_reports_the_saving_and_loads_with_auto_classes(pruned_conversion):
    out = pruned_conversion
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    vocab = json.loads((out / "conversion.json").read_text())["vocabulary"]
    assert model.config.model_type == "mobilebert"
    assert model.config.vocab_size == len(tok) == vocab["vocab_size_after"] < vocab["vocab_size_before"]
    assert vocab["parameters_saved"] == (vocab["vocab_size_before"] - vocab["vocab_size_after"]) * 32
    assert vocab["bytes_saved"] == 4 * vocab["parameters_saved"]
    assert 0 < vocab["coverage"]["texts_with_new_unk_share"] <= 1 and vocab["coverage"]["texts"] == 40
    assert (out / "vocab.txt").is_file() and (out / "recovery.json").is_file()


def test_the_mapping_is_fitted_to_the_pruned_rows(student, tmp_path):
    """`--prune-vocab` prunes before the mapping: it equals converting the pruned source folder."""
    common = ["--bottleneck", "32", "--embedding-size", "32", "--calib", student["train"], "--calib-samples", "16"]
    assert cli("prune-vocab", student["student"], "--vocab-from", student["train"], "-o", tmp_path / "pruned") == 0
    assert cli(tmp_path / "pruned", *common, "-o", tmp_path / "a") == 0
    assert cli(student["student"], *common, "--prune-vocab", "-o", tmp_path / "b") == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_recover_check_and_export_of_a_pruned_conversion_use_its_tokenizer(pruned_conversion, student, tmp_path,
                                                                           caplog):
    """Against the unpruned source, recover and check prune it to the conversion's vocabulary (same ids)."""
    out = tmp_path / "recovered"
    assert cli("recover", pruned_conversion, "--source", student["student"], "--train", student["train"],
               "--steps", "2", "--batch-size", "8", "--threads", "1", "-o", out) == 0
    code = cli("check", out, "--against", student["student"], "--data", student["dev"], "--report", tmp_path / "r",
               "--repeats", "1", "--threads", "1")
    assert code in (0, 1) and (tmp_path / "r" / "report.json").is_file()
    assert sum("is pruned to it" in r.getMessage() for r in caplog.records) == 2  # recover, then check
    assert "unpruned source" in json.loads((out / "recovery.json").read_text())["targets"]
    assert cli("export", out, "--format", "onnx", "--data", student["dev"], "-o", tmp_path / "export") == 0


def test_a_pruned_conversion_distils_the_unpruned_source_reading_its_own_tokens(student, tmp_path):
    """A capped vocabulary turns some training tokens into [UNK]; the task stage's targets stay the user's model's
    answers on the original tokens (mbconvert.recovery's logits_from): the very logits an unpruned conversion distils
    (one entry in a shared cache, not one per vocabulary)."""
    cache = tmp_path / "cache"
    common = ["--bottleneck", "32", "--embedding-size", "32", "--train", student["train"], "--steps", "2",
              "--batch-size", "8", "--threads", "1", "--cache-dir", cache]
    assert cli(student["student"], *common, "-o", tmp_path / "unpruned") == 0
    assert len(list(cache.glob("teacher-logits-*"))) == 1
    assert cli(student["student"], *common, "--prune-vocab", "--vocab-size", "64", "-o", tmp_path / "capped") == 0
    assert len(list(cache.glob("teacher-logits-*"))) == 1
    capped, unpruned = (json.loads((tmp_path / d / "recovery.json").read_text()) for d in ("capped", "unpruned"))
    assert "unpruned source" in capped["targets"] and "targets" not in unpruned
    assert capped["weights"] != unpruned["weights"]


def test_the_source_of_a_pruned_conversion_is_pruned_to_its_tokenizer(tokenizer):
    from mbconvert.vocab import same_vocab

    source = helpers.random_student(hidden=64, layers=2, heads=2, intermediate=128)
    p = prune_vocab(source, tokenizer, ZH_TEXTS)
    aligned = same_vocab(p.model, p.tokenizer, source, tokenizer, "student")
    torch.testing.assert_close(aligned.get_input_embeddings().weight, p.model.get_input_embeddings().weight)
    assert same_vocab(source, tokenizer, source, tokenizer, "student") is source  # same vocabulary: unchanged
    with pytest.raises(TokenizerError, match="tokenizer"):
        same_vocab(p.model, None, source, tokenizer, "student")
