"""How faithful a pruned MobileBERT is to its student, more quietly than test accuracy (issue 18).

    python benchmarks/vocab_kl.py /tmp/bench/vocab-ag-fill [/tmp/bench/vocab-ag-fill-s1 ...] \
        [--student checkpoints/agnews-minilm] [--data ../shared/data/agnews]

Each argument is a `benchmarks/vocab.py --work` folder (its `unpruned/` and `pruned/` MobileBERTs). Over the dev +
test texts, the mean KL divergence from the student's class distribution (reading its own tokens) to each
MobileBERT's (PyTorch FP32, each reading with its own tokenizer, length 128), split by whether the pruned tokenizer
reads the text differently from the student's. 1,520 test texts weigh 0.07 pt each, so accuracy cannot separate
two vocabularies that differ by a few texts; the KL over all 2,280 held-out texts can (benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def log_probs(folder: Path, texts: list[str], batch: int = 64) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    out = []
    for s in range(0, len(texts), batch):
        enc = tok(texts[s:s + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append(model(**enc).logits.double().log_softmax(-1))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="benchmarks/vocab.py --work folders")
    p.add_argument("--student", type=Path, default=ROOT / "checkpoints" / "agnews-minilm")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "agnews")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    texts = [json.loads(line)["text"] for split in ("dev", "test")
             for line in (args.data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    student = log_probs(args.student, texts)
    student_tok = AutoTokenizer.from_pretrained(str(args.student))
    print("| run | model | all texts | texts read differently | the others |\n|---|---|---|---|---|")
    for run in args.runs:
        pruned_tok = AutoTokenizer.from_pretrained(str(run / "pruned"))
        changed = torch.tensor([student_tok.tokenize(t) != pruned_tok.tokenize(t) for t in texts])
        for variant in ("unpruned", "pruned"):
            lp = log_probs(run / variant, texts)
            kl = (student.exp() * (student - lp)).sum(-1)
            print(f"| {run.name} | {variant} | {kl.mean():.4f} | {kl[changed].mean():.4f} ({int(changed.sum())}) | "
                  f"{kl[~changed].mean():.4f} |", flush=True)


if __name__ == "__main__":
    main()
