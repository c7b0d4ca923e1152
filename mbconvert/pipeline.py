"""The path-level pipeline: files in, folders out. `mbconvert student.pt --train t.jsonl` is `convert_checkpoint`.

    convert_checkpoint  load the source once → read and tokenise the data once → map (mbconvert.mapping)
                        → [recover in memory (mbconvert.recovery)] → one folder, written whole
    recover_checkpoint  a converted folder + its source model → recover → the folder, rewritten whole
    check_checkpoint    both models + labelled data → CompatibilityTestSuite (mbconvert.check) → report folder
    export_checkpoint   a model → ONNX / INT8 / Core ML (mbconvert.export) → export folder
    prune_checkpoint    a source model pruned to a task's vocabulary (mbconvert.vocab) → a BERT folder

The stage modules take and return objects (models, tokenizers, `Examples`/`Encoded` data) and never see a path;
this module holds the file glue: where outputs go, what may be replaced (mbconvert.fileio.check_output), caches
(mbconvert.cache, never inside an output folder), `--resume`, model cards. The CLI, the demo and the pytest
plugin call only this module. Every function also takes loaded objects where a path is accepted (a
`PreTrainedModel` for a source, a list of texts or a `datasets.Dataset` for data).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from .cache import cache_root, content_key, model_key
from .canonical import as_bert, head_activation
from .checkpoint import fingerprint, same_run
from .corpus import Corpus, data_key, open_corpus, sample_examples, should_stream
from .config import CheckConfig, ConvertConfig, ExportConfig, RecoveryConfig, RunOptions
from .data import Encoded, Examples, as_examples, encode, label_maps, read_texts, with_unlabelled
from .distributed import process_group
from .errors import ConfigError, TokenizerError
from .family_mapping import describe
from .fileio import atomic_dir, check_output_dir, write_json
from .load import SourceModel, is_converted, load_classifier, load_source
from .numerics import activation_peaks
from .vocab import converted_saving, same_vocab

log = logging.getLogger("mbconvert")
CONVERSION_FILE, RECOVERY_FILE, VOCAB_FILE = "conversion.json", "recovery.json", "vocabulary.json"
CALIB_CAP = 128  # calibration sequences: at most this many tokens (the fits need real tokens, not length)
HELD_OUT = 256  # texts after the calibration sample that measure the mapping before recovery


# ----------------------------------------------------------------------------------------------- helpers
def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def default_output(source, suffix: str = "mobilebert") -> Path:
    """`<source>-mobilebert` beside the source file or folder; `mobilebert-out` for an in-memory model."""
    if not _is_path(source):
        return Path(f"{suffix}-out")
    p = Path(source)
    return p.parent / f"{p.stem if p.is_file() else p.name}-{suffix}"


def _paths(*items) -> list[Path]:
    return [Path(x) for x in items if _is_path(x)]


def _load_source(source, config: ConvertConfig, tokenizer=None, labels=None) -> SourceModel:
    return load_source(source, heads=config.heads, layers=config.layers, tokenizer=tokenizer, labels=labels,
                       seed=config.seed, require_tokenizer=False)


def _examples(data, model_config, require_labels: bool = False) -> Examples:
    label2id, n = label_maps(model_config)
    return as_examples(data, label2id=label2id, num_labels=n, require_labels=require_labels)


def _save_model(out: Path, model, tokenizer, files: dict) -> None:
    """The model folder, written whole: weights, tokenizer, JSON reports and the model card. The caller checked the
    output folder (check_output_dir) before any work, so what is there now is this run's own. Under several
    processes (torchrun, accelerate launch) the main one writes it and the others wait."""
    from .report import model_card

    group = process_group()
    if not group.main:
        group.barrier()
        return
    with atomic_dir(out, kind="model", overwrite=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        _save_tokenizer(tokenizer, tmp)
        for name, obj in files.items():
            write_json(tmp / name, obj)
        (tmp / "README.md").write_text(model_card(model, files.get(CONVERSION_FILE), files.get(RECOVERY_FILE),
                                                  tokenizer is not None),
                                       encoding="utf-8")
    log.info("wrote %s", out)
    group.barrier()


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer's files, plus a vocab.txt for a WordPiece tokenizer (transformers 5 writes only tokenizer.json;
    on-device WordPiece readers and `--tokenizer DIR` read vocab.txt)."""
    if tokenizer is None:
        return
    tokenizer.save_pretrained(str(folder))
    from .vocab import vocab_txt

    text = vocab_txt(tokenizer)
    if text is not None and not (folder / "vocab.txt").exists():
        (folder / "vocab.txt").write_text(text, encoding="utf-8")


def check_device(run: RunOptions) -> RunOptions:
    """Refuse an unknown or unavailable `device` before any work: torch would only fail deep inside recovery,
    after the conversion was written."""
    if run.device is not None:
        import torch

        try:
            device = torch.device(run.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"device {run.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {run.device!r}: CUDA is not available on this machine; use --device cpu")
    return run


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


# ----------------------------------------------------------------------------------------------- convert
def map_source(src: SourceModel, config: ConvertConfig, calib: Examples | None) -> tuple[object, dict]:
    """Map a loaded source into MobileBERT; with calibration text, also measure the mapping on held-out texts.
    Returns (MobileBERT, conversion report)."""
    from .mapping import MobileBERTAdapter, evaluate_mapping

    calib_enc = held_out = None
    if calib is not None:
        shuffled = calib.shuffled(seed=config.seed)
        calib_enc = encode(shuffled.take(slice(0, config.calib_samples)), src.tokenizer,
                           max_length=config.calib_max_length, cap=min(CALIB_CAP, src.config.max_position_embeddings))
        if len(shuffled) > config.calib_samples:
            held_out = encode(shuffled.take(slice(config.calib_samples, config.calib_samples + HELD_OUT)),
                              src.tokenizer, max_length=calib_enc.max_length)
    c = src.config
    log.info("mapping %s (%s, %d layers, hidden %d, %d heads) → MobileBERT bottleneck %d, %d FFNs", src.path,
             src.family, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, config.bottleneck, config.ffn)
    mobile, report = MobileBERTAdapter(config).convert(src, calib_enc)
    report = {"source": {"path": src.path, "family": src.family, "has_head": src.has_head,
                         "ignored_keys": src.ignored_keys, "hidden_size": c.hidden_size,
                         "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
                         "num_hidden_layers": c.num_hidden_layers, "mapping": describe(c, src.family)},
              "config": config.to_dict(), **report}
    if held_out is not None:
        ev = report["evaluation"] = evaluate_mapping(src.model, mobile, held_out, config.seed)
        log.info("before recovery, on %d held-out calibration texts: agreement with the source %.3f "
                 "(random init %.3f); last-layer cosine %.3f (random init %.3f)", ev["texts"],
                 ev["converted"]["agreement"], ev["random_init"]["agreement"],
                 ev["converted"]["layer_cosine"][-1], ev["random_init"]["layer_cosine"][-1])
    if calib_enc is not None:  # FP16 range of the converted model, on the texts the mapping did not fit
        report["activations"] = activation_peaks(mobile, held_out if held_out is not None else calib_enc)
    return mobile, report


def _conversion_key(src: SourceModel, config: ConvertConfig, calib: Examples | None) -> str:
    calib_part = None if calib is None else [calib.texts, calib.text_pairs, calib.labels]
    act = head_activation(src.config)  # not in the weights: a ReLU/GELU head is another function
    return content_key(model_key(src.model), config.to_dict(), calib_part, *([act] if act != "tanh" else []))


def _warn_missing(src: SourceModel, calib) -> None:
    """What a weights-only conversion lacks, and the flag that adds it."""
    if src.tokenizer is None:
        log.warning("warning: no tokenizer beside %s: the output has none (it cannot read text until you add one) "
                    "and the mapping uses the weights alone; pass --tokenizer DIR (a folder with vocab.txt or "
                    "tokenizer.json) and --calib FILE (or --train FILE)", src.path)
    elif calib is None:
        log.warning("warning: no calibration text: the mapping uses the weights alone, which is markedly worse "
                    "(see README); pass --calib FILE (a few hundred texts) or --train FILE")


def _prune(src: SourceModel, config: ConvertConfig, vocab_from, texts: Examples | None, eval_ex: Examples | None
           ) -> tuple[SourceModel, dict | None]:
    """`--prune-vocab`: the source pruned to the tokens of `vocab_from` (else `texts`, the task's) before anything
    reads it, and what that did (with the coverage on `eval_ex`)."""
    if vocab_from is not None and not config.prune_vocab:
        raise ConfigError("--vocab-from names the texts whose tokens --prune-vocab keeps: pass --prune-vocab too")
    if not config.prune_vocab:
        return src, None
    from .vocab import coverage, prune_source

    texts = read_texts(vocab_from) if vocab_from is not None else texts
    if texts is None:
        raise ConfigError("--prune-vocab keeps the tokens of the task's texts: pass --vocab-from FILE, --train or "
                          "--calib")
    original = src.tokenizer
    src, report = prune_source(src, texts, min_count=config.vocab_min_count, size=config.vocab_size,
                               fill=config.vocab_fill)
    if eval_ex is not None:
        report["coverage"] = coverage(original, src.tokenizer, eval_ex)
    log.info("vocabulary pruned to the tokens of %d texts: %d → %d tokens%s", report["texts"],
             report["vocab_size_before"], report["vocab_size_after"], "" if eval_ex is None else
             f"; on the eval texts {report['coverage']['new_unk_token_share']:.2%} of the tokens become [UNK]")
    return src, report


def convert_checkpoint(source, out=None, config: ConvertConfig | None = None, *, calib=None, tokenizer=None,
                       labels=None, train=None, eval_data=None, recovery: RecoveryConfig | None = None,
                       run: RunOptions | None = None, resume: bool = False, overwrite: bool = False,
                       vocab_from=None, unlabelled=None) -> dict:
    """`mbconvert SOURCE`: load → map → save; with `train`, recover in memory and save once. Returns
    conversion.json's content (with the recovery summary under "recovery").

    `source`: a checkpoint path (any supported format) or a loaded `PreTrainedModel` (pass its `tokenizer`).
    `calib`/`train`/`eval_data`: a data file, a list of texts, (texts, labels) or a `datasets.Dataset`; calibration
    defaults to a sample of `train`. `out`: default `<source>-mobilebert`; an existing folder that mbconvert did not
    write is refused unless `overwrite`. `resume`: continue an interrupted run in `out` (a finished one is a no-op).
    `config.prune_vocab`: prune the source's vocabulary to the tokens of `vocab_from` (else `train`, else `calib`)
    before the mapping (mbconvert.vocab); the output holds the pruned tokenizer. `unlabelled`: texts without labels
    (a .txt file, a data file or a list) that recovery distils on beside `train` (mbconvert.data.read_texts).
    """
    config, run = config or ConvertConfig(), check_device(run or RunOptions())
    out = Path(out) if out is not None else default_output(source)
    check_output_dir(out, sources=_paths(source, tokenizer, labels, calib, train, eval_data, vocab_from, unlabelled),
                     overwrite=overwrite)
    if unlabelled is not None and train is None:
        raise ConfigError("--unlabelled adds texts to the recovery's distillation: pass --train too")
    src = _load_source(source, config, tokenizer, labels)
    calib = calib if calib is not None else train
    if calib is not None and src.tokenizer is None:
        raise TokenizerError(f"no tokenizer beside {src.path}: reading text needs one; pass --tokenizer DIR")
    _warn_missing(src, calib)
    stream = train is not None and should_stream(run, train, unlabelled)  # mbconvert.corpus: not read into memory
    if stream and config.prune_vocab and vocab_from is None:
        raise ConfigError("--prune-vocab keeps the tokens of every --train text, which --stream does not read into "
                          "memory: pass --vocab-from FILE (a sample of the texts) or --stream off")
    train_ex = _examples(train, src.config) if train is not None and not stream else None
    if calib is train and stream:  # a seeded sample (every row, in order, when the data is that small)
        calib_ex = sample_examples(train, *label_maps(src.config), n=config.calib_samples + HELD_OUT, seed=config.seed,
                                   cache_dir=run.cache_dir)
    else:
        calib_ex = train_ex if calib is train and train_ex is not None else (
            _examples(calib, src.config) if calib is not None else None)
    eval_ex = _examples(eval_data, src.config) if eval_data is not None else None  # bad dev data: before any write
    extra = unlabelled if stream else read_texts(unlabelled) if unlabelled is not None else None
    unpruned = src
    src, vocab_report = _prune(src, config, vocab_from, train_ex or calib_ex, eval_ex)
    key = _conversion_key(src, config, calib_ex)
    previous = _read_json(out / CONVERSION_FILE) if resume else None
    if previous is not None and previous.get("key") == key:
        log.info("resuming: %s already holds this conversion", out)
        mobile, report = load_classifier(out)[0], previous
    elif previous is not None:
        raise ConfigError(f"{out} holds a conversion of another source, settings or calibration text; rerun "
                          "without --resume to start over")
    else:
        mobile, report = map_source(src, config, calib_ex)
        if vocab_report is not None:
            report["vocabulary"] = converted_saving(vocab_report, mobile)
        report["key"] = key
        report["mapped_weights"] = model_key(mobile)
        _save_model(out, mobile, src.tokenizer, {CONVERSION_FILE: report})
    if train is not None:
        report["recovery"] = _recover(mobile, src, out, report, train if stream else train_ex, eval_ex,
                                      recovery or RecoveryConfig(), run, resume, src.tokenizer, extra,
                                      logits_from=unpruned if vocab_report is not None else None)
    return report


# ----------------------------------------------------------------------------------------------- recover
def head_map_from(conversion: dict | None) -> list[list[int]] | None:
    """Per layer, the source heads the mapping kept (conversion.json), if it says."""
    layers = (conversion or {}).get("layers")
    if not isinstance(layers, list):
        return None
    kept = [(layer.get("attention") or {}).get("heads_kept", layer.get("heads_kept")) for layer in layers]
    return kept if all(isinstance(k, list) for k in kept) else None


def _encode_for(model, examples: Examples, tokenizer, cfg: RecoveryConfig, run: RunOptions) -> Encoded:
    return encode(examples, tokenizer, max_length=cfg.max_length, cache_dir=cache_root(run.cache_dir),
                  cap=model.config.max_position_embeddings)


def _recover(mobile, src: SourceModel, out: Path, conversion: dict | None, train: Examples, eval_data,
             cfg: RecoveryConfig, run: RunOptions, resume: bool, tokenizer, unlabelled: Examples | None = None,
             logits_from: SourceModel | None = None) -> dict:
    """Recover `mobile` in memory against the source, then write `out` whole (weights + recovery.json).
    `unlabelled`: texts appended to `train` without labels (distilled only). `train` (and `unlabelled`) not yet
    read (a path or a datasets.Dataset): streamed through mbconvert.corpus. `logits_from`: the unpruned source of a
    pruned conversion, whose logits on its own tokenisation of the texts are the task stage's targets."""
    from .recovery import recover, targets_key
    from .report import summary_line

    def encoded(tok):
        if not isinstance(train, Examples):
            return open_corpus(train, unlabelled, tok, *label_maps(mobile.config), max_length=cfg.max_length,
                               cap=mobile.config.max_position_embeddings, cache_dir=run.cache_dir,
                               progress=run.progress)
        return _encode_for(mobile, train if unlabelled is None else with_unlabelled(train, unlabelled), tok, cfg, run)

    train_enc = encoded(tokenizer)
    if not isinstance(train, Examples):
        rows = dict(train_enc.rows)
    else:
        rows = {"labelled": len(train) if train.labels is not None else 0,
                "unlabelled": (len(train) if train.labels is None else 0) + (len(unlabelled) if unlabelled else 0)}
    logit_rows = None if logits_from is None else (logits_from.model, encoded(logits_from.tokenizer))
    eval_enc = _encode_for(mobile, _examples(eval_data, mobile.config), tokenizer, cfg, run) \
        if eval_data is not None else None
    done = _read_json(out / RECOVERY_FILE) if resume else None
    if done is not None:  # a finished run: resuming it is a no-op when it is this run and `mobile` is its result
        teacher = targets_key(model_key(src.model), None if logit_rows is None else
                              (model_key(logit_rows[0]), data_key(logit_rows[1])))
        expected = fingerprint(cfg.to_dict(), teacher, "", data_key(train_enc), data_key(eval_enc))
        if same_run(done.get("fingerprint"), expected, ignore=("start",)) and done.get("weights") == model_key(mobile):
            log.info("resuming: %s already holds this recovery (%d steps); nothing to do", out, done.get("steps", 0))
            return done
        raise ConfigError(f"{out} holds a recovery with other options, data or models; rerun without --resume")
    summary = recover(mobile, src.model, train_enc, cfg, eval_enc, out_dir=out, resume=resume,
                      head_map=head_map_from(conversion), run=run, logits_from=logit_rows)
    if logit_rows is not None:
        summary["targets"] = "the unpruned source's logits on its own tokenisation of the training texts"
    summary["weights"], summary["training_rows"] = model_key(mobile), rows
    sample = train_enc.head(256) if isinstance(train_enc, Corpus) else train_enc
    summary["activations"] = activation_peaks(mobile, eval_enc if eval_enc is not None else sample,
                                              max_rows=None if eval_enc is not None else 256)  # FP16 range
    if process_group().main:
        print(summary_line(summary))
    files = {RECOVERY_FILE: summary}
    if conversion is not None:
        files[CONVERSION_FILE] = conversion
    _save_model(out, mobile, tokenizer, files)
    return summary


def recover_checkpoint(model_dir, source, train, eval_data=None, config: RecoveryConfig | None = None,
                       out=None, resume: bool = False, tokenizer=None, run: RunOptions | None = None,
                       overwrite: bool = False, unlabelled=None) -> dict:
    """`mbconvert recover`: a converted MobileBERT folder and its source model → recovered folder (default: the
    model folder itself, rewritten whole). `unlabelled`: texts without labels distilled beside `train`. Returns the
    recovery summary."""
    cfg, run = config or RecoveryConfig(), check_device(run or RunOptions())
    model_dir = Path(model_dir)
    if not is_converted(model_dir):
        raise ConfigError(f"{model_dir} is not a converted MobileBERT folder (no MobileBERT config.json): recover "
                          "trains mbconvert's output; convert the source first")
    out = Path(out) if out is not None else model_dir
    inputs = _paths(source, tokenizer, train, eval_data, unlabelled) + ([] if out == model_dir else [model_dir])
    check_output_dir(out, sources=inputs, overwrite=overwrite)  # in place: mbconvert's own folder, or --overwrite
    model, tok = load_classifier(model_dir, tokenizer=tokenizer)
    src = load_source(source, tokenizer=tokenizer, require_tokenizer=tok is None)
    tok = tok or src.tokenizer
    unpruned = src
    src = dataclasses.replace(src, model=same_vocab(model, tok, src.model, src.tokenizer, src.path))
    conversion = _read_json(model_dir / CONVERSION_FILE)
    stream = should_stream(run, train, unlabelled)  # mbconvert.corpus: not read into memory
    extra = unlabelled if stream else read_texts(unlabelled) if unlabelled is not None else None
    pruned = src.model is not unpruned.model and unpruned.tokenizer is not None
    return _recover(model, src, out, conversion, train if stream else _examples(train, model.config), eval_data, cfg,
                    run, resume, tok, extra, logits_from=unpruned if pruned else None)


# ----------------------------------------------------------------------------------------------- check
def check_checkpoint(model, against, data, config: CheckConfig | None = None, report_dir=None, tokenizer=None):
    """`mbconvert check`: run the CompatibilityTestSuite on both models and labelled data; write the report folder
    (default MODEL/report), print the summary. Returns the CheckResult."""
    from .check import CompatibilityTestSuite

    config = config or CheckConfig()
    converted, tok = load_classifier(model, tokenizer=tokenizer)
    source, source_tok = load_classifier(against, tokenizer=tokenizer)
    tok = tok or source_tok
    if tok is None:
        raise TokenizerError(f"no tokenizer found in {model} or beside {against}; pass --tokenizer DIR")
    source = same_vocab(converted, tok, source, source_tok, str(against))
    examples = _examples(data, converted.config, require_labels=True)
    encoded = encode(examples, tok, max_length=config.max_length, cap=converted.config.max_position_embeddings)
    result = CompatibilityTestSuite(source, converted, encoded, config, tokenizer=tok, source_path=str(against),
                                    converted_path=str(model), data_path=str(data) if _is_path(data) else "<memory>"
                                    ).run()
    if report_dir is None and not _is_path(model):
        raise ConfigError("report_dir is required when checking a model object")
    if report_dir is None:
        model_path = Path(model)
        report_dir = (model_path if model_path.is_dir() else model_path.parent) / "report"
    result.write_report(report_dir)
    print(result.summary())
    print(f"report: {Path(report_dir) / 'report.html'}")
    return result


# ----------------------------------------------------------------------------------------------- export
def export_checkpoint(model, config: ExportConfig | None = None, data=None, out=None, tokenizer=None) -> dict:
    """`mbconvert export`: a converted folder or any source checkpoint → out (default MODEL/export, or
    `<file>-export` beside a checkpoint file), written whole with config.json and the tokenizer files, so that an
    app (or transformers/onnxruntime) needs nothing else. Returns export.json's content."""
    from .export import export_model, resolve_formats, text_format

    explicit = config is not None and config.formats is not None
    config = resolve_formats(config or ExportConfig())  # None: every installed format; fails before any work
    if config.int8_static and data is None and "onnx-int8" in config.formats:
        raise ConfigError("static INT8 needs calibration text: pass --data")
    if _is_path(model):
        path = Path(model)
        loaded, tok = load_classifier(path, tokenizer=tokenizer)
        out = Path(out) if out is not None else (path / "export" if path.is_dir() else
                                                 path.parent / f"{path.stem}-export")
        source = str(path)
    else:
        if out is None:
            raise ConfigError("out is required when exporting a model object")
        loaded, tok, out, source = model, tokenizer, Path(out), type(model).__name__
    if config.seq_len and not config.seq_len <= loaded.config.max_position_embeddings:
        raise ConfigError(f"--seq-len {config.seq_len} is outside 1..{loaded.config.max_position_embeddings} "
                          "(the model's position embeddings)")
    config = text_format(config, tok, explicit)  # the string-in ONNX model needs a BERT WordPiece tokenizer
    encoded = texts = None
    if data is not None:
        from .load import check_tokenizer

        if tok is None:
            raise TokenizerError(f"no tokenizer for {source}: reading --data needs one; pass --tokenizer DIR")
        check_tokenizer(tok, loaded.config.vocab_size)  # ids beyond the embeddings would fail deep in the model
        label2id, n = label_maps(loaded.config)
        examples = as_examples(data, label2id=label2id, num_labels=n, limit=config.max_samples)
        encoded = encode(examples, tok, max_length=config.seq_len, cap=loaded.config.max_position_embeddings)
        texts = examples.texts if examples.text_pairs is None else None  # the string-in model reads one text
    inputs = _paths(data, tokenizer)
    if _is_path(model):  # MODEL/export may sit inside the model folder: protect the model's own files
        path = Path(model)
        inputs += [p for p in path.iterdir() if p.name != out.name] if path.is_dir() else [path]
    check_output_dir(out, sources=inputs, overwrite=False)
    with atomic_dir(out, kind="export") as tmp:
        report = export_model(loaded.eval(), tmp, config, encoded, source=source,
                        data_source=str(data) if _is_path(data) else ("<memory>" if data is not None else None),
                        tokenizer=tok, texts=texts)
        report["out_dir"] = str(out)
        _save_tokenizer(tok, tmp)  # with config.json (export_model): the folder loads like a Hugging Face folder
        if tok is None:
            report["warnings"].append("no tokenizer: the export folder has config.json but no tokenizer files")
            log.warning("warning: %s", report["warnings"][-1])
        write_json(tmp / "export.json", report)
    from .export import render_summary

    print(render_summary(report))
    return report


# ----------------------------------------------------------------------------------------------- prune-vocab
def prune_checkpoint(source, out=None, vocab_from=None, config: ConvertConfig | None = None, *, eval_data=None,
                     tokenizer=None, labels=None, overwrite: bool = False) -> dict:
    """`mbconvert prune-vocab`: the source model pruned to the tokens of `vocab_from` (a data or .txt file, or a list
    of texts), as a Hugging Face BertForSequenceClassification folder with its rewritten tokenizer and
    vocabulary.json (default `<source>-pruned`): the like-for-like baseline of a `--prune-vocab` conversion.
    `config`: vocab_min_count and vocab_size (prune_vocab is implied). Returns vocabulary.json's content."""
    config = dataclasses.replace(config or ConvertConfig(), prune_vocab=True)
    if vocab_from is None:
        raise ConfigError("prune-vocab keeps the tokens of the texts in --vocab-from FILE: pass it")
    out = Path(out) if out is not None else default_output(source, "pruned")
    check_output_dir(out, sources=_paths(source, tokenizer, labels, vocab_from, eval_data), overwrite=overwrite)
    src = load_source(source, heads=config.heads, layers=config.layers, tokenizer=tokenizer, labels=labels,
                      seed=config.seed)
    eval_ex = _examples(eval_data, src.config) if eval_data is not None else None
    src, report = _prune(src, config, vocab_from, None, eval_ex)
    report["source"] = src.path
    with atomic_dir(out, kind="model", overwrite=True) as tmp:
        as_bert(src.model).save_pretrained(str(tmp), safe_serialization=True)
        _save_tokenizer(src.tokenizer, tmp)
        write_json(tmp / VOCAB_FILE, report)
    log.info("wrote %s", out)
    return report
