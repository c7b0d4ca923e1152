"""Recovery on several processes (mbconvert.distributed): `torchrun` / `accelerate launch` run the same command as
DDP, `--batch-size` stays the global batch, and the result is one process's to float tolerance.

The launches are real: two CPU processes on the gloo backend, one thread each, a tiny model and 14 steps.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import MobileBertForSequenceClassification

import helpers
from mbconvert import pipeline
from mbconvert.checkpoint import STATE_FILE
from mbconvert.cli import main
from mbconvert.config import ConvertConfig, RecoveryConfig
from mbconvert.data import UNLABELLED, load_encoded
from mbconvert.distributed import Group
from mbconvert.load import load_source
from mbconvert.transfer import Transfer

ROOT = Path(__file__).resolve().parents[1]
GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
needs_gloo = pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is not available")
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="accelerate is not installed (pip install -e '.[distributed]')")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", "0"]  # --multi_gpu: accelerate's torchrun launcher, on CPUs too
# What both runs of a comparison recover with: 31 rows (26 labelled, 5 unlabelled) at batch 5 give uneven shares
# (3 + 2 rows) and, once per epoch, a one-row batch that leaves the second process an empty share.
RECIPE = {"steps": 14, "batch_size": 5, "tolerance": None, "keep": "last", "mix_rows": 0.5, "eval_every": 3}
FLAGS = ["--steps", "14", "--batch-size", "5", "--no-early-stop", "--keep-last", "--mix-rows", "0.5",
         "--eval-every", "3", "--device", "cpu"]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}  # measured: 6e-8 apart; shares weighted per process instead: 4.5e-4


# -------------------------------------------------------------------- in one process: the shares
@pytest.mark.parametrize("rows, size", [(5, 2), (5, 3), (1, 2)], ids=["uneven", "three", "empty-share"])
def test_the_processes_shares_of_a_batch_add_up_to_its_loss_and_gradient(small_student, rows, size):
    """Each process runs its rows of the batch; the shares' losses and gradients sum to the whole batch's, for the
    layer-wise loss (token-weighted, through a width projection) and the task loss (KD over all rows, CE over the
    labelled unmixed ones), also when a process has no rows."""
    source = load_source(small_student / "student")
    torch.manual_seed(0)
    student = MobileBertForSequenceClassification(helpers.mobilebert_config()).eval()  # eval: no dropout
    transfer = Transfer(student, source.model, RecoveryConfig(mix_rows=0.5), None)
    projections = transfer.add_projections("cpu")  # the student is wider than the source
    data = load_encoded(small_student / "train.jsonl", source.tokenizer, source.config, limit=rows)
    batch = data.batch(slice(None))
    batch["labels"][1:2] = UNLABELLED
    with torch.no_grad():
        targets = source.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    trained = list(student.parameters()) + list(projections.parameters())
    taps = transfer.taps(0)
    losses = {"layer-wise": lambda share: transfer.layer_loss(0, batch, taps, share),
              "task": lambda share: transfer.task_loss(batch, targets, 7, share)}
    for kind, loss_of in losses.items():
        whole = loss_of(None)
        want = torch.autograd.grad(whole, trained, allow_unused=True)
        shares = [loss_of(Group(rank, size).rows(rows)) for rank in range(size)]
        got = [sum(g for g in gs if g is not None) if any(g is not None for g in gs) else None
               for gs in zip(*(torch.autograd.grad(s, trained, allow_unused=True) for s in shares))]
        torch.testing.assert_close(sum(shares), whole, msg=kind)
        for w, g in zip(want, got):
            assert (w is None) == (g is None)
            if w is not None:
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7, msg=kind)
    for tap in taps:
        tap.remove()


def test_shares_are_contiguous_and_cover_every_row_once():
    for n in range(7):
        for size in (1, 2, 3):
            shares = [Group(r, size).rows(n) for r in range(size)]
            assert [i for s in shares for i in range(n)[s]] == list(range(n))
            assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1


# -------------------------------------------------------------------- real launches
@pytest.fixture(scope="module")
def task(small_student, tmp_path_factory):
    """A converted tiny MobileBERT, its source, and the comparison's data (train, unlabelled, dev)."""
    d = tmp_path_factory.mktemp("distributed")
    rows = helpers.read_jsonl(small_student / "train.jsonl")
    helpers.write_jsonl(d / "train.jsonl", rows[:26])
    (d / "extra.txt").write_text("".join(r["text"] + "\n" for r in rows[26:31]), encoding="utf-8")
    pipeline.convert_checkpoint(small_student / "student", d / "mapped", ConvertConfig(bottleneck=32, ffn=1),
                                calib=d / "train.jsonl")
    return {"dir": d, "source": small_student / "student", "dev": small_student / "dev.jsonl"}


def _model(task, name: str, dropout: float) -> Path:
    """A copy of the converted folder to recover in place, with the attention dropout given."""
    import shutil

    out = task["dir"] / name
    shutil.copytree(task["dir"] / "mapped", out)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config["attention_probs_dropout_prob"] = dropout
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


def _recover_args(task, model: Path) -> list[str]:
    d = task["dir"]
    return [str(a) for a in ["recover", model, "--source", task["source"], "--train", d / "train.jsonl",
                             "--unlabelled", d / "extra.txt", "--eval", task["dev"], *FLAGS]]


def _launch(launcher: list[str], args: list[str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _weights(model: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model / "model.safetensors"))


@needs_gloo
def test_two_processes_train_the_weights_of_one(task):
    """`torchrun --nproc_per_node 2 -m mbconvert recover ...` equals `mbconvert recover ...` to float tolerance, with
    uneven and empty shares, unlabelled rows and token mixing; the output says it ran on 2 processes."""
    one, two = _model(task, "one", 0.0), _model(task, "two", 0.0)  # dropout draws differ per process: off here
    assert main(_recover_args(task, one)) == 0
    _launch(TORCHRUN, ["-m", "mbconvert", *_recover_args(task, two)])
    start, want, got = _weights(task["dir"] / "mapped"), _weights(one), _weights(two)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOLERANCE, msg=k)
    assert max(float((want[k] - start[k]).abs().max()) for k in want) > 100 * TOLERANCE["atol"]  # it did train
    summary = {n: json.loads((m / "recovery.json").read_text(encoding="utf-8")) for n, m in (("one", one), ("two", two))}
    assert summary["two"]["processes"] == 2 and "processes" not in summary["one"]
    assert summary["one"]["steps"] == summary["two"]["steps"] == 14
    for kind in ("layer-wise", "task"):
        torch.testing.assert_close(torch.tensor(summary["two"]["stages"][kind]["loss"]),
                                   torch.tensor(summary["one"]["stages"][kind]["loss"]), rtol=1e-5, atol=1e-7)
    assert not (two / STATE_FILE).exists()


STOP_AND_CHECKPOINT = """
import sys
from mbconvert import pipeline
from mbconvert.config import RecoveryConfig, RunOptions
model, source, train, extra, dev, stop = sys.argv[1:7]
try:
    pipeline.recover_checkpoint(model, source, train, eval_data=dev, unlabelled=extra, config=RecoveryConfig(**{RECIPE}),
                                run=RunOptions(device="cpu", progress=False, stop_after_steps=int(stop)))
except KeyboardInterrupt:
    sys.exit(3)
"""


@needs_gloo
@needs_accelerate
def test_a_two_process_run_stopped_and_resumed_equals_an_uninterrupted_one(task):
    """With dropout on: a 2-process run stopped after 3 steps (mid layer-wise stage, checkpointed) and finished by
    `mbconvert recover --resume` gives the bytes of an uninterrupted 2-process run. The uninterrupted run is the issue's
    `accelerate launch ... -m mbconvert recover`, the other two are torchrun's: the launcher changes nothing."""
    d = task["dir"]
    script = d / "stop_and_checkpoint.py"
    script.write_text(STOP_AND_CHECKPOINT.replace("{RECIPE}", repr(RECIPE)), encoding="utf-8")
    whole, parts = _model(task, "whole", 0.1), _model(task, "parts", 0.1)
    _launch(ACCELERATE, ["-m", "mbconvert", *_recover_args(task, whole)])
    data = [str(p) for p in (task["source"], d / "train.jsonl", d / "extra.txt", task["dev"])]
    assert _launch(TORCHRUN, [str(script), str(parts), *data, "3"], expect_ok=False).returncode != 0
    assert (parts / STATE_FILE).is_file()
    done = _launch(TORCHRUN, ["-m", "mbconvert", *_recover_args(task, parts), "--resume"])
    assert "resuming recovery at step 3" in done.stdout + done.stderr
    want, got = _weights(whole), _weights(parts)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    summaries = [json.loads((m / "recovery.json").read_text(encoding="utf-8")) for m in (whole, parts)]
    assert [[c[0], c[2]] for c in summaries[0]["accuracy_curve"]] == [[c[0], c[2]] for c in summaries[1]["accuracy_curve"]]
    assert summaries[0]["processes"] == summaries[1]["processes"] == 2 and summaries[1]["steps"] == 14
