"""INT8 sensitivity of an exported model (the table in benchmarks/NOTES.md): dynamic quantisation variants.

    python benchmarks/int8_sensitivity.py model.onnx agnews output/bottleneck

Arguments: the FP32 ONNX file, the suite, then name fragments of MatMuls to keep in FP32 (one variant each).
"""
import sys, numpy as np, onnxruntime as ort
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process
from mbconvert.load import load_student
from mbconvert.data import load_encoded
fp32 = Path(sys.argv[1]); suite = sys.argv[2] if len(sys.argv) > 2 else "agnews"
student = load_student(ROOT / "checkpoints" / {"agnews": "agnews-minilm", "toutiao": "toutiao-student"}[suite])
data = ROOT.parent / "shared" / "data" / suite
train = load_encoded(data / "train.jsonl", student.tokenizer, student.config, require_labels=True, limit=100)
test = load_encoded(data / "test.jsonl", student.tokenizer, student.config, require_labels=True, limit=600)
def acc(path):
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    preds = []
    for b in test.batches(64):
        out = s.run(["logits"], {k: b[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")})[0]
        preds.append(out.argmax(-1))
    return float((np.concatenate(preds) == test.labels.numpy()).mean())
prep = Path("/tmp/exp/prep.onnx"); quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
print("fp32", acc(fp32), flush=True)
import onnx
names = [n.name for n in onnx.load(str(prep)).graph.node]
variants = {
 "default": {},
 "per_channel": {"per_channel": True},
 "matmul_only": {"op_types_to_quantize": ["MatMul"]},
 "matmul_only_pc": {"op_types_to_quantize": ["MatMul"], "per_channel": True},
}
for pat in sys.argv[3:]:
    variants["excl " + pat] = {"op_types_to_quantize": ["MatMul"], "per_channel": True, "nodes_to_exclude": [n for n in names if pat in n]}
for name, kw in variants.items():
    out = Path("/tmp/exp/q.onnx")
    quantize_dynamic(str(prep), str(out), weight_type=QuantType.QInt8, **kw)
    print(name, acc(out), round(out.stat().st_size / 2**20, 1), flush=True)
