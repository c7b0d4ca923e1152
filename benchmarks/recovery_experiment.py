"""One recovery experiment on a benchmark student (the runs in benchmarks/NOTES.md, "Recovery and INT8 experiments").

    python benchmarks/recovery_experiment.py --suite agnews --share 0 --lr 1e-4 --budget 300 --int8

Prints test/dev accuracy, agreement and per-layer cosine/relative MSE before and after recovery, the dev curve and,
with --int8, FP32 vs dynamic-INT8 test accuracy. Converted models are cached in /tmp/exp (conversion ~85 s).
"""
import argparse, json, time, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
from mbconvert.load import load_student
from mbconvert.data import load_encoded
from mbconvert.mapping import MobileBERTAdapter, evaluate_mapping
from mbconvert.config import ConvertConfig, RecoveryConfig, ExportConfig
from mbconvert.recovery import recover
from mbconvert.similarity import predict_logits
from transformers import MobileBertForSequenceClassification
p = argparse.ArgumentParser()
p.add_argument("--suite", default="agnews")
p.add_argument("--norm", default="no_norm")
p.add_argument("--share", type=float, default=0.3)
p.add_argument("--lr", type=float, default=5e-4)
p.add_argument("--budget", type=float, default=300)
p.add_argument("--steps", type=int)
p.add_argument("--int8", action="store_true")
p.add_argument("--extra", default="{}")
p.add_argument("--no-recover", action="store_true")
p.add_argument("--cextra", default="{}")
p.add_argument("--test-curve", action="store_true")
a = p.parse_args()
torch.set_num_threads(2)
data = SHARED / a.suite
student = load_student(ROOT / "checkpoints" / {"agnews": "agnews-minilm", "toutiao": "toutiao-student"}[a.suite])
tok, cfg = student.tokenizer, student.config
train = load_encoded(data / "train.jsonl", tok, cfg, require_labels=True)
if a.suite == "toutiao": train = load_encoded(data / "train.jsonl", tok, cfg, require_labels=True, max_length=train.max_length, limit=8000)
dev = load_encoded(data / "dev.jsonl", tok, cfg, require_labels=True, max_length=train.max_length, limit=1000)
test = load_encoded(data / "test.jsonl", tok, cfg, require_labels=True, max_length=train.max_length)
calib = load_encoded(data / "train.jsonl", tok, cfg, limit=256, max_length=train.max_length)
mapped = Path(f"/tmp/exp/mapped-{a.suite}-{a.norm}" + a.cextra.replace(" ", "").replace("\"", ""))
if mapped.is_dir():
    mobile = MobileBertForSequenceClassification.from_pretrained(mapped); mobile.config._attn_implementation = "eager"
else:
    t0 = time.time()
    mobile, rep = MobileBERTAdapter(ConvertConfig(norm=a.norm, **json.loads(a.cextra))).convert(student, calib)
    print("convert s", time.time() - t0); mobile.save_pretrained(mapped)
def stats(tag):
    ev = evaluate_mapping(student.model, mobile, dev)
    lg = predict_logits(mobile, test)
    acc = float((lg.argmax(-1) == test.labels).float().mean())
    print(tag, "test", round(acc, 4), "dev", round(ev["converted"]["accuracy"], 4), "agree", round(ev["converted"]["agreement"], 4),
          "cos", [round(x, 3) for x in ev["converted"]["layer_cosine"]], "relmse", [f"{x:.3g}" for x in ev["converted"]["layer_rel_mse"]], flush=True)
    with torch.no_grad():
        b = dev.batch(slice(0, 64)); hs = mobile(**{k: v for k, v in b.items() if k != "labels"}, output_hidden_states=True).hidden_states
    print(tag, "max|h| per layer", [f"{h.abs().max():.3g}" for h in hs], flush=True)
stats("before")
if not a.no_recover:
    rc = RecoveryConfig(budget_s=a.budget if not a.steps else None, steps=a.steps, layerwise_share=a.share, lr=a.lr, tolerance=None, eval_every=100, progress=False, **json.loads(a.extra))
    if a.test_curve:  # also measure test accuracy at every evaluation, off the recovery's clock
        import mbconvert.recovery as R
        original, test_curve = R.Recovery._record_evaluation, []
        def record(self):
            original(self); t0 = time.monotonic()
            with self._ema_weights():
                acc = float((R._logits(self.student, test, self.device, 64).argmax(-1) == test.labels).float().mean())
            test_curve.append((self.p.step, round(self.elapsed), self.p.accuracy_curve[-1][2], round(acc, 4))); self._clock += time.monotonic() - t0
            print("eval", test_curve[-1], flush=True)
        R.Recovery._record_evaluation = record
    s = recover(mobile, student.model, train, config=rc, eval_data=dev, cache_dir="/tmp/exp/cache-" + a.suite)
    print("curve", [(st, round(sec), round(acc, 4)) for st, sec, acc in s["accuracy_curve"]], "teacher", s["teacher_accuracy"])
    stats("after")
if a.int8:
    from mbconvert.export import export_model
    import shutil; shutil.rmtree("/tmp/exp/onnx", ignore_errors=True)
    r = export_model(mobile, ExportConfig(formats=("onnx", "onnx-int8"), max_samples=len(test)), data=data / "test.jsonl", out_dir="/tmp/exp/onnx", tokenizer=tok)
    print("int8", {k: (v.get("accuracy"), v.get("size_mb")) for k, v in r["artifacts"].items()})
