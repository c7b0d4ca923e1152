"""Recovery (mbconvert.recovery, mbconvert.losses): what a user of `mbconvert recover` can rely on.

The model to recover is a deliberately lossy conversion of the trained student: bottleneck 16, one FFN,
16-wide embeddings and no calibration data, which leaves it near chance on the synthetic task.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from mbconvert import cli
from mbconvert.mapping import MobileBERTAdapter
from mbconvert.checkpoint import STATE_FILE
from mbconvert.config import ConvertConfig, RecoveryConfig, RunOptions
from mbconvert.data import Encoded, load_encoded
from mbconvert.errors import ConfigError, DataError, TrainingDivergedError
from mbconvert.load import load_source
from mbconvert.losses import (LOSSES, attention_kl_mapped, attention_kl_mean_heads, kd_logits, masked_row_kl,
                              relation_kl)
from mbconvert.data import bucketed_batches, mix_tokens
from mbconvert.recovery import recover
from mbconvert.recovery_plan import plan_stages

QUIET = RunOptions(progress=False)


@pytest.fixture(scope="module")
def teacher(trained_student):
    return load_source(trained_student)


@pytest.fixture(scope="module")
def lossy(teacher):
    """The unrecovered MobileBERT: a weights-only mapping into a tiny bottleneck."""
    mobile, _ = MobileBERTAdapter(ConvertConfig(bottleneck=16, ffn=1, embedding_size=16)).convert(teacher)
    return mobile


@pytest.fixture(scope="module")
def data(teacher, task_data):
    tok, cfg = teacher.tokenizer, teacher.config
    return {"train": load_encoded(task_data["train"], tok, cfg, limit=384),
            "dev": load_encoded(task_data["dev"], tok, cfg, limit=96)}


def accuracy(model, encoded: Encoded) -> float:
    with torch.no_grad():
        pred = model.eval()(**{k: v for k, v in encoded.batch(slice(None)).items() if k != "labels"}).logits
    return float((pred.argmax(-1) == encoded.labels).float().mean())


# -------------------------------------------------------------------- losses
def test_relation_loss_is_zero_for_identical_inputs():
    torch.manual_seed(0)
    qkv = tuple(torch.randn(2, 7, 32) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    assert relation_kl(qkv, qkv, mask, heads=4).item() == pytest.approx(0.0, abs=1e-6)


def test_relation_loss_compares_models_with_different_head_counts_and_widths():
    """Teacher q/k/v 256 wide (4 heads of 64), student q/k 16 wide and v 16 wide: only T×T relations meet."""
    torch.manual_seed(0)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0
    teacher = tuple(torch.randn(3, 9, 256) for _ in range(3))
    student = tuple(torch.randn(3, 9, 16, requires_grad=True) for _ in range(3))
    loss = relation_kl(student, teacher, mask, heads=8)
    loss.backward()
    assert loss.item() > 0 and all(torch.isfinite(s.grad).all() for s in student)
    # padding never counts: changing padded positions leaves the loss unchanged
    padded = tuple(t.clone() for t in teacher)
    for t in padded:
        t[0, 6:] = 100.0
    assert relation_kl(student, padded, mask, heads=8).item() == pytest.approx(loss.item(), rel=1e-5)


def test_attention_losses_and_kd_vanish_on_identical_inputs():
    torch.manual_seed(0)
    mask = torch.ones(2, 5, dtype=torch.long)
    teacher = torch.randn(2, 4, 5, 5).softmax(-1)
    assert attention_kl_mean_heads(teacher[:, :2], teacher, mask).item() > 0  # 2 student heads vs 4
    assert attention_kl_mapped(teacher[:, [3, 1]], teacher, mask, head_map=[3, 1]).item() == pytest.approx(0, abs=1e-6)
    logits = torch.randn(4, 3)
    assert kd_logits(logits, logits).item() == pytest.approx(0, abs=1e-6)
    assert set(LOSSES) >= {"hidden_mse", "relation_kl", "attention_kl_mean_heads", "kd_logits"}


def test_masked_attention_kl_counts_only_real_keys_and_query_rows():
    """The one masked KL (recovery's attention losses and the check's similarity): padding keys and padding query
    rows never count; "mean" averages the real rows, "sum" adds them."""
    torch.manual_seed(0)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    p, q = (torch.randn(2, 3, 6, 6).masked_fill(~mask[:, None, None, :].bool(), -1e9).log_softmax(-1)
            for _ in range(2))
    mean, total = masked_row_kl(p, q, mask), masked_row_kl(p, q, mask, "sum")
    real_rows = 3 * int(mask.sum())  # heads × real query rows
    assert mean.item() > 0 and total.item() == pytest.approx(mean.item() * real_rows, rel=1e-5)
    changed = q.clone()
    changed[1, :, 4:, :] = torch.randn(3, 2, 6).log_softmax(-1)  # padding query rows
    changed[1, :, :, 4:] = 5.0  # padding keys
    assert masked_row_kl(p, changed, mask).item() == pytest.approx(mean.item(), rel=1e-6)
    assert masked_row_kl(p, p, mask).item() == pytest.approx(0, abs=1e-7)


# -------------------------------------------------------------------- recovery
def test_plan_splits_steps_or_the_time_budget_between_layers_and_the_task_stage():
    stages = plan_stages(RecoveryConfig(steps=100, layerwise_share=0.3), n_layers=4, n_rows=1000)
    assert [(s.layer, s.steps) for s in stages] == [(0, 8), (1, 8), (2, 7), (3, 7), (None, 70)]
    one_epoch = plan_stages(RecoveryConfig(batch_size=32), n_layers=4, n_rows=1000)
    assert sum(s.steps for s in one_epoch) == 32
    timed = plan_stages(RecoveryConfig(budget_s=600, layerwise_share=0.2), n_layers=4, n_rows=1000)
    assert [(s.start_s, s.deadline_s) for s in timed] == [(0, 30), (30, 60), (60, 90), (90, 120), (120, 600)]


def test_length_bucketed_batches_cover_every_row_once_with_less_padding():
    lengths = torch.randint(5, 120, (1000,), generator=torch.Generator().manual_seed(1))
    plain = bucketed_batches(lengths, 32, seed=3, bucket=1)
    bucketed = bucketed_batches(lengths, 32, seed=3, bucket=10)
    for batches in (plain, bucketed):
        assert sorted(torch.cat(batches).tolist()) == list(range(1000))
        assert all(len(b) <= 32 for b in batches)
    width = lambda batches: sum(int(lengths[b].max()) for b in batches)  # noqa: E731  padded tokens per epoch
    assert width(bucketed) < 0.8 * width(plain)
    assert all(torch.equal(a, b) for a, b in zip(bucketed, bucketed_batches(lengths, 32, seed=3, bucket=10)))
    assert not all(torch.equal(a, b) for a, b in zip(bucketed, bucketed_batches(lengths, 32, seed=4, bucket=10)))


def test_token_mixing_swaps_only_real_tokens_of_the_chosen_rows():
    ids = torch.tensor([[101, 5, 6, 7, 102, 0, 0], [101, 8, 9, 102, 0, 0, 0], [101, 10, 11, 12, 13, 14, 102]])
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": torch.zeros_like(ids)}
    out, mixed = mix_tokens(inputs, rows=2, rate=0.5, generator=torch.Generator().manual_seed(0))
    new = out["input_ids"]
    assert int(mixed.sum()) == 2 and torch.equal(new[~mixed], ids[~mixed])
    assert not torch.equal(new, ids)
    special_or_pad = (ids == 0) | (ids == 101) | (ids == 102)
    assert torch.equal(new[special_or_pad], ids[special_or_pad])  # [CLS], [SEP] and padding stay
    assert set(new[~special_or_pad].tolist()) <= set(range(5, 15))  # drawn from the batch's own real tokens
    again, _ = mix_tokens(inputs, rows=2, rate=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], new)


def test_recovery_repairs_a_lossy_conversion_and_stops_within_tolerance(lossy, teacher, data, tmp_path):
    model = copy.deepcopy(lossy)
    before = accuracy(model, data["dev"])
    cfg = RecoveryConfig(steps=80, batch_size=32, eval_every=8)
    summary = recover(model, teacher.model, data["train"], cfg, eval_data=data["dev"], out_dir=tmp_path, run=QUIET)
    after = accuracy(model, data["dev"])
    assert before < 0.7 and summary["initial_accuracy"] == pytest.approx(before)
    assert after >= summary["source_accuracy"] - cfg.tolerance / 100  # within 1 point of the student
    assert summary["early_stopped"] and summary["steps"] < 80
    assert after == pytest.approx(summary["final_accuracy"])  # the best model is the one left in place
    assert summary["stages"]["layer-wise"]["steps"] == 24 and summary["stages"]["layer-wise"]["loss"]
    assert summary["accuracy_curve"][0][0] == 0 and not (tmp_path / STATE_FILE).exists()


@pytest.mark.parametrize("options", [{}, {"ema_decay": 0.8, "mix_rows": 0.5}], ids=["plain", "averaged-mixed"])
def test_resume_after_interruptions_equals_an_uninterrupted_run(lossy, teacher, data, tmp_path, options):
    """Interrupted once in the layer-wise stage and once in the task stage, resumed each time."""
    cfg = RecoveryConfig(steps=12, layerwise_share=0.5, batch_size=16, eval_every=2, tolerance=None, seed=3, **options)
    reference = copy.deepcopy(lossy)
    expected = recover(reference, teacher.model, data["train"], cfg, eval_data=data["dev"], out_dir=tmp_path / "a",
                       run=QUIET)

    model = copy.deepcopy(lossy)
    run = dict(eval_data=data["dev"], out_dir=tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        recover(model, teacher.model, data["train"], cfg, run=RunOptions(progress=False, stop_after_steps=3), **run)
    assert (tmp_path / "b" / STATE_FILE).is_file()
    model = copy.deepcopy(lossy)  # a fresh process: only the checkpoint survives
    with pytest.raises(KeyboardInterrupt):
        recover(model, teacher.model, data["train"], cfg, run=RunOptions(progress=False, stop_after_steps=9),
                resume=True, **run)
    model = copy.deepcopy(lossy)
    resumed = recover(model, teacher.model, data["train"], cfg, resume=True, run=QUIET, **run)

    want, got = reference.state_dict(), model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [c[::2] for c in resumed["accuracy_curve"]] == [c[::2] for c in expected["accuracy_curve"]]
    assert resumed["steps"] == expected["steps"] == 12


def test_the_weight_average_is_what_gets_evaluated_and_kept(lossy, teacher, data):
    """ema_decay=1 never moves the average: every evaluation sees the starting weights, and so does the result."""
    cfg = RecoveryConfig(steps=6, layerwise_share=0, batch_size=16, eval_every=2, tolerance=None, ema_decay=1.0)
    model = copy.deepcopy(lossy)
    summary = recover(model, teacher.model, data["train"], cfg, eval_data=data["dev"])
    assert len({acc for _, _, acc in summary["accuracy_curve"]}) == 1
    model_without_dev = copy.deepcopy(lossy)
    recover(model_without_dev, teacher.model, data["train"], cfg)
    for got in (model, model_without_dev):
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), lossy.state_dict().values()))


def test_keep_last_leaves_the_final_weights_not_the_best_dev_point(lossy, teacher, data):
    cfg = RecoveryConfig(steps=10, layerwise_share=0, batch_size=16, eval_every=5, tolerance=None, keep="last")
    model, without_dev = copy.deepcopy(lossy), copy.deepcopy(lossy)
    summary = recover(model, teacher.model, data["train"], cfg, eval_data=data["dev"])
    recover(without_dev, teacher.model, data["train"], cfg)  # no dev data: always the last weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), without_dev.state_dict().values()))
    assert summary["final_accuracy"] == summary["accuracy_curve"][-1][2] == pytest.approx(accuracy(model, data["dev"]))


def test_bf16_autocast_trains_and_repairs_like_fp32(lossy, teacher, data):
    cfg = RecoveryConfig(steps=80, batch_size=32, eval_every=8, bf16=True)
    fp32_steps, bf16_steps, model = copy.deepcopy(lossy), copy.deepcopy(lossy), copy.deepcopy(lossy)
    few_steps = dict(steps=3, layerwise_share=0, eval_every=3)  # the first step has LR 0 (warm-up)
    recover(fp32_steps, teacher.model, data["train"], dataclasses.replace(cfg, bf16=False, **few_steps))
    recover(bf16_steps, teacher.model, data["train"], dataclasses.replace(cfg, **few_steps))
    assert not all(torch.equal(a, b) for a, b in zip(fp32_steps.state_dict().values(), bf16_steps.state_dict().values()))
    summary = recover(model, teacher.model, data["train"], cfg, eval_data=data["dev"])
    assert summary["final_accuracy"] >= summary["source_accuracy"] - cfg.tolerance / 100
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_the_task_stage_distils_logits_from_another_model_when_given(lossy, teacher, data, tmp_path):
    """`logits_from` (a pruned conversion's unpruned source): its logits on its own rows are the task targets. With
    no layer-wise stage and no mixed rows the teacher is then unused: the run equals one against that model."""
    cfg = RecoveryConfig(steps=4, layerwise_share=0, batch_size=16)
    other = copy.deepcopy(teacher.model)
    with torch.no_grad():
        other.classifier.bias.add_(torch.arange(other.config.num_labels, dtype=torch.float32))  # other targets
    given, against_other, against_teacher = (copy.deepcopy(lossy) for _ in range(3))
    recover(given, teacher.model, data["train"], cfg, logits_from=(other, data["train"]), run=QUIET)
    recover(against_other, other, data["train"], cfg, run=QUIET)
    recover(against_teacher, teacher.model, data["train"], cfg, run=QUIET)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert same(given, against_other) and not same(given, against_teacher)
    with pytest.raises(DataError, match="same texts"):
        recover(copy.deepcopy(lossy), teacher.model, data["train"], cfg, logits_from=(other, data["dev"]), run=QUIET)
    with pytest.raises(KeyboardInterrupt):  # a checkpoint of a run with other targets is not resumed
        recover(copy.deepcopy(lossy), teacher.model, data["train"], cfg, out_dir=tmp_path,
                run=RunOptions(progress=False, stop_after_steps=2))
    with pytest.raises(ConfigError, match="other options, data or models"):
        recover(copy.deepcopy(lossy), teacher.model, data["train"], cfg, out_dir=tmp_path, resume=True, run=QUIET,
                logits_from=(other, data["train"]))


def test_empty_training_data_is_a_data_error(lossy, teacher, data):
    empty = Encoded(*(t[:0] for t in (data["train"].input_ids, data["train"].attention_mask,
                                      data["train"].token_type_ids, data["train"].labels)))
    with pytest.raises(DataError, match="no rows"):
        recover(copy.deepcopy(lossy), teacher.model, empty, RecoveryConfig(steps=1), run=QUIET)


@pytest.mark.parametrize("option", [{"keep": "first"}, {"mix_rows": 1.5}, {"mix_tokens": -0.1},
                                    {"ema_decay": 0.0}, {"ema_decay": 1.2}, {"lr": float("nan")},
                                    {"temperature": 0.0}, {"budget_s": float("nan")}, {"budget_s": -300.0},
                                    {"epochs": 0}, {"alpha": 2.0}, {"batch_size": 0}, {"eval_every": 0},
                                    {"steps": 5, "epochs": 1.0}])
def test_out_of_range_options_are_config_errors_when_the_config_is_built(option):
    with pytest.raises(ConfigError):
        RecoveryConfig(**option)


def test_a_diverging_recovery_stops_with_a_typed_error_and_saves_nothing(lossy, teacher, data, tmp_path):
    """A learning rate far too high makes the loss non-finite: no weights are left to save, no exit 0."""
    model = copy.deepcopy(lossy)
    with pytest.raises(TrainingDivergedError, match="diverged|non-finite"):
        recover(model, teacher.model, data["train"], RecoveryConfig(steps=6, layerwise_share=0, lr=1e30),
                out_dir=tmp_path, run=QUIET)
    assert not (tmp_path / "recovery.json").exists()


# -------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def converted_dir(lossy, teacher, tmp_path_factory):
    d = tmp_path_factory.mktemp("converted")
    lossy.save_pretrained(str(d))
    teacher.tokenizer.save_pretrained(str(d))
    return d


@pytest.mark.parametrize("content, message", [("", "empty"),
                                              ('{"text": "一二三", "label": "sports"}\n', "unknown label")])
def test_bad_training_data_exits_2_with_one_line(converted_dir, trained_student, tmp_path, capsys, content, message):
    bad = tmp_path / "train.jsonl"
    bad.write_text(content, encoding="utf-8")
    code = cli.main(["recover", str(converted_dir), "--source", str(trained_student), "--train", str(bad),
                     "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mbconvert:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_recover_command_saves_a_reloadable_model(converted_dir, trained_student, task_data, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    small = tmp_path / "train.jsonl"
    small.write_text("".join(task_data["train"].read_text(encoding="utf-8").splitlines(True)[:64]), encoding="utf-8")
    out = tmp_path / "out"
    code = cli.main(["recover", str(converted_dir), "--source", str(trained_student), "--train", str(small),
                     "--eval", str(task_data["dev"]), "--steps", "4", "--batch-size", "16", "-o", str(out)])
    assert code == 0 and " vs source " in capsys.readouterr().out
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert reloaded.config.model_type == "mobilebert" and (out / "model.safetensors").is_file()
    assert json.loads((out / "recovery.json").read_text(encoding="utf-8"))["steps"] <= 4


# -------------------------------------------------------------------- what a user is told
def test_a_recovery_of_very_few_steps_says_so(lossy, teacher, data, caplog):
    summary = recover(copy.deepcopy(lossy), teacher.model, data["train"], RecoveryConfig(steps=3, layerwise_share=0),
                      run=QUIET)
    assert "only 3 steps" in summary["warning"]
    assert any("only 3 steps" in r.getMessage() for r in caplog.records)
    full = recover(copy.deepcopy(lossy), teacher.model, data["train"], RecoveryConfig(steps=12, layerwise_share=0),
                   run=QUIET)
    assert "warning" not in full


def test_resuming_against_another_source_model_is_refused(lossy, teacher, data, tmp_path):
    """Same shapes, other weights: the checkpoint's fingerprint holds the source's content, not only its options."""
    cfg = RecoveryConfig(steps=8, layerwise_share=0, batch_size=16)
    with pytest.raises(KeyboardInterrupt):
        recover(copy.deepcopy(lossy), teacher.model, data["train"], cfg, out_dir=tmp_path,
                run=RunOptions(progress=False, stop_after_steps=2))
    other = copy.deepcopy(teacher.model)
    with torch.no_grad():
        other.classifier.bias.add_(0.01)
    with pytest.raises(ConfigError, match="other options, data or models"):
        recover(copy.deepcopy(lossy), other, data["train"], cfg, out_dir=tmp_path, resume=True, run=QUIET)


def test_each_progress_bar_counts_its_own_stage_from_zero_to_its_total(lossy, teacher, data, capsys):
    recover(copy.deepcopy(lossy), teacher.model, data["train"], RecoveryConfig(steps=20, layerwise_share=0.5),
            run=RunOptions(progress=True))
    bars = capsys.readouterr().err.replace("\r", "\n")
    task = [line for line in bars.splitlines() if line.startswith("recovery: task")]
    assert task and " 0/10 " in task[0] and " 10/10 " in task[-1], task[:1] + task[-1:]


def test_recover_in_place_needs_overwrite_for_a_folder_mbconvert_did_not_write(converted_dir, trained_student,
                                                                               task_data, tmp_path, capsys):
    """A user's own MobileBERT folder (no mbconvert marker) is rewritten whole only when asked."""
    import shutil

    folder = tmp_path / "users-mobilebert"
    shutil.copytree(converted_dir, folder)
    (folder / "notes.txt").write_text("mine", encoding="utf-8")
    small = tmp_path / "train.jsonl"
    small.write_text("".join(task_data["train"].read_text(encoding="utf-8").splitlines(True)[:32]), encoding="utf-8")
    args = ["recover", str(folder), "--source", str(trained_student), "--train", str(small), "--steps", "2"]
    assert cli.main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert cli.main(args + ["--overwrite"]) == 0
    assert (folder / "recovery.json").is_file() and not (folder / "notes.txt").exists()
