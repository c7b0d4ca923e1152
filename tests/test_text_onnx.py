"""The string-in ONNX model (mbconvert.text_onnx): raw texts → logits, label and class name, with the BERT tokenizer
inside the graph (onnxruntime-extensions' BertTokenizer op).

The spec: the graph gives exactly the Hugging Face tokenizer's ids — on the tests' Chinese character tokenizer and on
an English WordPiece tokenizer built here (lower-casing and not), over texts with mixed scripts, digits, ASCII and
full-width punctuation, emoji, accented and other non-ASCII letters, upper case, odd whitespace, control characters,
special tokens written in the text, words WordPiece cannot finish, and long texts truncated at the max length — and
the string-in model's logits are model.onnx's on those ids.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest

import helpers

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_extensions")

from mbconvert.config import ExportConfig  # noqa: E402
from mbconvert.errors import MissingDependencyError, TokenizerError  # noqa: E402
from mbconvert.pipeline import export_checkpoint  # noqa: E402
from mbconvert.text_onnx import (TEXT_FILE, hf_ids, ort_ids, session, token_parity, tokenizer_model,  # noqa: E402
                                 tokenizer_spec)

FAST = dict(latency_repeats=2, latency_batch_sizes=(1,))
LONG = "新闻" * 150 + " The quick brown fox " * 20

CHINESE = ["一丁七万丈三上下不与", "一丁，七万！丈三？（上下）", "一丁 七万\t丈三\n上下\r\n不与", "一丁3D打印七万2018年",
           "iPhone一丁X七万", "一丁😀七万👍🏽", "ＡＢＣ一丁１２３", "Ａ一丁" + "\u3000" + "七万\u00a0丈三\u200b上下",
           "一丁[CLS]七万[UNK]x", "Café 一丁 ÉCOLE", "", "   ", LONG, "一丁" * 300]
ENGLISH = ["The quick brown fox jumps over the lazy dog.", "THE QUICK Brown FOX", "Hello, World! 2024-05-01 $3.50",
           "fox€ fox😀 fox3x", "unaffable un-aff", "Café naïve résumé façade ÉCOLE", "Ǎğ Ẽ Łódź Dvořák İstanbul",
           "Σίσυφος ΣΟΦΊΑ Ёлка МОСКВА", "한국어 텍스트", "中文 mixed with English，标点！", "tab\there  new\nline\r\n",
           "zero\u200bwidth soft\u00adhyphen no\u00a0break", "control\x07chars\x7f\x1b", "[CLS] the [SEP] [MASK]",
           "[cls] [Unk]", "   leading and trailing   ", "", "dog " * 200, "x" * 150, "the" + "s" * 120]


def english_tokenizer(folder, lowercase: bool = True):
    """A tiny English WordPiece vocabulary: whole words, suffixes, every ASCII letter and digit as a word and as
    a continuation, punctuation, a few non-ASCII letters and CJK characters."""
    from transformers import BertTokenizerFast

    words = ["the", "quick", "brown", "fox", "jump", "over", "lazy", "dog", "hello", "world", "un", "aff", "cafe",
             "naive", "resume", "facade", "ecole", "istanbul", "mixed", "with", "english", "tab", "here", "new",
             "line", "zero", "width", "soft", "no", "break", "control", "chars", "leading", "and", "trailing",
             "σ", "ι", "ο", "φ", "ε", "λ", "κ", "α", "μ", "с", "к", "в", "а", "ё", "л", "é", "ł", "ó", "ź",
             "ᄒ", "ᅡ", "ᆫ", "ᄀ", "ᅮ", "ᆨ", "ᄋ", "ᅥ", "ᄐ", "ᅦ", "ᄉ", "ᅳ", "ᅳ", "ᄃ", "中", "文", "标", "点"]
    if not lowercase:
        words += ["The", "THE", "QUICK", "Brown", "FOX", "Hello", "World", "Café", "ÉCOLE", "É"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    punctuation = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~，！")
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(dict.fromkeys(words)) + letters +
             ["##" + c for c in letters] + ["##s", "##ed", "##able", "##ing"] + punctuation)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=lowercase)
    tok.save_pretrained(str(folder))
    return tok


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    return english_tokenizer(tmp_path_factory.mktemp("english"))


@pytest.fixture(scope="module")
def english_cased(tmp_path_factory):
    return english_tokenizer(tmp_path_factory.mktemp("english-cased"), lowercase=False)


def assert_same_ids(tokenizer, texts, max_length):
    parity = token_parity(tokenizer, texts, max_length, examples=len(texts))
    assert parity["texts"] == len(texts)
    assert parity["differing"] == 0, "\n".join(
        f"{e['text'][:60]!r}\n  HF  {tokenizer.convert_ids_to_tokens(e['hf_ids'])[:20]}\n"
        f"  ORT {tokenizer.convert_ids_to_tokens(e['ort_ids'])[:20]}" for e in parity["examples"])
    assert parity["share_differing"] == 0.0 and parity["examples"] == []


# ------------------------------------------------------------------------------------------------ token ids
@pytest.mark.parametrize("max_length", [16, 128])
def test_ids_equal_hf_on_chinese_samples(tokenizer, max_length):
    assert_same_ids(tokenizer, CHINESE, max_length)


@pytest.mark.parametrize("max_length", [16, 128])
def test_ids_equal_hf_on_english_samples_lowercased(english, max_length):
    assert_same_ids(english, ENGLISH + CHINESE, max_length)


def test_ids_equal_hf_on_english_samples_cased(english_cased):
    assert_same_ids(english_cased, ENGLISH + CHINESE, 64)


def test_samples_exercise_what_the_op_alone_gets_wrong(english, tokenizer):
    """The samples above cover the cases the graph repairs: a word WordPiece cannot finish is one [UNK] (the op keeps
    its pieces); full-width punctuation is split off; letters beyond Latin-1 are folded; special tokens in the text
    are matched."""
    unk, cls, sep = english.unk_token_id, english.cls_token_id, english.sep_token_id
    assert hf_ids(english, ["fox€"], 16) == [[cls, unk, sep]], "the whole word, not fox + [UNK]"
    assert english.convert_ids_to_tokens(hf_ids(english, ["Ǎğ Dvořák"], 16)[0])[1:-1] == \
        ["a", "##g", "d", "##v", "##o", "##r", "##a", "##k"]
    assert english.convert_ids_to_tokens(hf_ids(english, ["[CLS] [MASK]"], 16)[0]) == \
        ["[CLS]", "[CLS]", "[MASK]", "[SEP]"]
    assert tokenizer.convert_ids_to_tokens(hf_ids(tokenizer, ["一丁，七"], 16)[0]) == \
        ["[CLS]", "一", "丁", "[UNK]", "七", "[SEP]"]
    sess = session(tokenizer_model(tokenizer_spec(english, 16)), threads=1)
    assert ort_ids(sess, ["fox€", "Ǎğ Dvořák", "[CLS] [MASK]"]) == hf_ids(english, ["fox€", "Ǎğ Dvořák",
                                                                                    "[CLS] [MASK]"], 16)


def test_long_texts_are_truncated_at_the_max_length(tokenizer, english):
    for tok, text in ((tokenizer, LONG), (english, "dog " * 200)):
        for max_length in (8, 32, 128):
            sess = session(tokenizer_model(tokenizer_spec(tok, max_length)), threads=1)
            ids = ort_ids(sess, [text])[0]
            assert len(ids) == max_length and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
            assert ids == hf_ids(tok, [text], max_length)[0]


@pytest.mark.parametrize("fixed", [False, True])
def test_a_batch_is_padded_like_hf(english, fixed):
    """Dynamic: as wide as the longest row (padding=True); fixed: max_length wide (padding="max_length")."""
    texts = ["the fox", "hello world, the quick brown fox jumps", "", "dog " * 50]
    sess = session(tokenizer_model(tokenizer_spec(english, 24), fixed=fixed), threads=1)
    got = sess.run(["input_ids", "attention_mask", "token_type_ids"], {"texts": np.array(texts, dtype=object)})
    want = english(texts, truncation=True, max_length=24, padding="max_length" if fixed else True,
                   return_tensors="np", return_token_type_ids=True)
    for name, array in zip(("input_ids", "attention_mask", "token_type_ids"), got):
        assert array.dtype == np.int64 and np.array_equal(array, want[name]), name
    assert got[0].shape == (4, 24)


def test_parity_reports_the_share_and_first_differing_examples(english):
    """A tokenizer model truncating at 8 measured against HF at 16: the long texts differ, and are shown."""
    sess = session(tokenizer_model(tokenizer_spec(english, 8)), threads=1)
    texts = ["the fox", "the quick brown fox jumps over the lazy dog", "dog " * 10, "hello"]
    parity = token_parity(english, texts, 16, examples=1, sess=sess)
    assert parity["texts"] == 4 and parity["differing"] == 2 and parity["share_differing"] == 0.5
    [example] = parity["examples"]
    assert example["text"] == texts[1]
    assert example["hf_ids"] == hf_ids(english, [texts[1]], 16)[0] and len(example["ort_ids"]) == 8


def test_tokenizers_the_graph_cannot_reproduce_are_refused(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(TokenizerError, match="BERT WordPiece"):
        tokenizer_spec(PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]"), 16)
    with pytest.raises(TokenizerError, match="no room"):
        tokenizer_spec(tokenizer, 1)


# ------------------------------------------------------------------------------------------------ the model
def english_student(tok):
    from transformers import BertForSequenceClassification

    import torch

    cfg = helpers.bert_config(hidden=32, layers=2, heads=2, intermediate=64)
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def chinese_export(tmp_path_factory, tokenizer):
    """A small BERT with the Chinese tokenizer; onnx-text on a labelled data file (flexible length)."""
    d = tmp_path_factory.mktemp("zh")
    helpers.random_student(hidden=32, layers=2, heads=2, intermediate=64).save_pretrained(str(d / "model"))
    tokenizer.save_pretrained(str(d / "model"))
    rows = helpers.synthetic_rows(40, seed=4) + [{"text": t, "label": helpers.LABELS[0]} for t in CHINESE if t.strip()]
    data = helpers.write_jsonl(d / "test.jsonl", rows)
    report = export_checkpoint(str(d / "model"), ExportConfig(formats=("onnx-text",), **FAST), data=str(data))
    return report, d


def test_string_in_logits_equal_the_plain_onnx_model(chinese_export, tokenizer):
    import onnx

    report, d = chinese_export
    folder = d / "model" / "export"
    texts = [r["text"] for r in helpers.read_jsonl(d / "test.jsonl")]
    text = session(folder / TEXT_FILE, threads=1)
    assert [i.name for i in text.get_inputs()] == ["texts"]
    logits, label, name = text.run(["logits", "label", "label_name"], {"texts": np.array(texts, dtype=object)})
    plain = session(folder / "model.onnx", threads=1)
    enc = tokenizer(texts, truncation=True, max_length=128, padding=True, return_tensors="np",
                    return_token_type_ids=True)
    want = plain.run(["logits"], {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask",
                                                                        "token_type_ids")})[0]
    assert logits.dtype == np.float32 and logits.shape == (len(texts), 4)
    assert np.abs(logits - want).max() <= 1e-4
    assert (label == want.argmax(-1)).all() and label.dtype == np.int64
    assert list(name) == [helpers.LABELS[i] for i in label]
    meta = {p.key: p.value for p in onnx.load(str(folder / TEXT_FILE)).metadata_props}
    assert json.loads(meta["id2label"]) == {str(i): n for i, n in enumerate(helpers.LABELS)}
    assert meta["inputs"] == "texts" and meta["max_length"] == "128" and meta["mbconvert_version"]


def test_export_json_records_token_and_logit_parity(chinese_export):
    report, d = chinese_export
    section = report["artifacts"]["onnx-text"]
    assert section["file"] == TEXT_FILE and section["texts"] == "data" and section["max_length"] == 128
    assert section["token_parity"]["texts"] == 40 + len(CHINESE) - 2 and section["token_parity"]["differing"] == 0
    assert section["vs_onnx"]["passed"] and section["vs_onnx"]["max_abs_diff"] <= 1e-4
    assert section["accuracy"] == section["accuracy_onnx"] and section["accuracy"] is not None
    assert section["latency"]["batch1_ms"] > 0 and "warning" not in section
    assert report["config"]["formats"] == ["onnx-text"] and "onnxruntime_extensions" in report["versions"]
    on_disk = json.loads((d / "model" / "export" / "export.json").read_text())
    assert on_disk["artifacts"]["onnx-text"]["token_parity"] == section["token_parity"]


def test_fixed_length_english_export_without_data(tmp_path, english):
    """--seq-len 24, no --data: the rows are texts decoded from the synthetic ids; width fixed at 24."""
    model = english_student(english)
    report = export_checkpoint(model, ExportConfig(formats=("onnx", "onnx-text"), seq_len=24, **FAST),
                               out=tmp_path / "out", tokenizer=english)
    section = report["artifacts"]["onnx-text"]
    assert section["texts"] == "decoded synthetic rows" and section["max_length"] == 24
    assert section["token_parity"]["differing"] == 0 and section["vs_onnx"]["passed"]
    sess = session(tmp_path / "out" / TEXT_FILE, threads=1)
    logits, label = sess.run(["logits", "label"], {"texts": np.array(ENGLISH, dtype=object)})
    plain = session(tmp_path / "out" / "model.onnx", threads=1)
    enc = english(ENGLISH, truncation=True, max_length=24, padding="max_length", return_tensors="np",
                  return_token_type_ids=True)
    want = plain.run(["logits"], {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask",
                                                                        "token_type_ids")})[0]
    assert np.abs(logits - want).max() <= 1e-4 and (label == want.argmax(-1)).all()


# ------------------------------------------------------------------------------------------------ formats
def test_onnx_text_without_a_tokenizer(tmp_path, caplog, monkeypatch):
    """Asked for: TokenizerError (exit 2); by default: skipped with a warning, the rest exported."""
    for name in ("coremltools", "executorch", "litert_torch"):  # the default formats: the ONNX ones only
        monkeypatch.setitem(sys.modules, name, None)
    model = helpers.random_student(hidden=32, layers=1, heads=2, intermediate=64)
    with pytest.raises(TokenizerError, match="onnx-text: no tokenizer"):
        export_checkpoint(model, ExportConfig(formats=("onnx-text",), **FAST), out=tmp_path / "asked")
    assert not (tmp_path / "asked").exists()
    with caplog.at_level(logging.WARNING, logger="mbconvert"):
        report = export_checkpoint(model, ExportConfig(formats=None, **FAST), out=tmp_path / "default")
    assert list(report["artifacts"]) == ["onnx", "onnx-int8"]
    assert any("skipped onnx-text: no tokenizer" in r.getMessage() for r in caplog.records)


def test_onnx_text_without_the_extensions_names_the_extra(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)
    model = helpers.random_student(hidden=32, layers=1, heads=2, intermediate=64)
    with pytest.raises(MissingDependencyError, match=r"onnxruntime_extensions.*mbconvert\[export\]"):
        export_checkpoint(model, ExportConfig(formats=("onnx-text",)), out=tmp_path / "out", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()
