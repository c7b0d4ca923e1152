"""Builders for the tests: a tiny character tokenizer, random-init students, a learnable synthetic task.

Everything is made here; nothing is downloaded. `train_student` trains a small BERT for a few hundred
steps so accuracy means something (≈1 s per 20 steps on 2 cores at the default size).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, MobileBertConfig

SPECIAL = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS = [chr(0x4E00 + i) for i in range(400)]  # 400 CJK characters, one token each
LABELS = ["news_a", "news_b", "news_c", "news_d"]


def make_tokenizer(folder: Path) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + CHARS) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    tok.save_pretrained(str(folder))
    return tok


def bert_config(hidden=512, layers=4, heads=8, intermediate=None, labels=len(LABELS), positions=128) -> BertConfig:
    cfg = BertConfig(vocab_size=len(SPECIAL) + len(CHARS), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=intermediate or 4 * hidden, num_labels=labels,
                     max_position_embeddings=positions, id2label=dict(enumerate(LABELS[:labels])),
                     label2id={n: i for i, n in enumerate(LABELS[:labels])})
    cfg._attn_implementation = "eager"
    return cfg


def mobilebert_config(**overrides) -> MobileBertConfig:
    """The tests' tiny MobileBERT target (hidden 256, bottleneck 64, 2 heads, 2 layers, 2 FFNs of 256, the test
    tokenizer's vocabulary and labels, eager attention); any field can be overridden."""
    fields = dict(hidden_size=256, intra_bottleneck_size=64, num_attention_heads=2, num_hidden_layers=2,
                  embedding_size=64, intermediate_size=256, num_feedforward_networks=2,
                  vocab_size=len(SPECIAL) + len(CHARS), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                  label2id={n: i for i, n in enumerate(LABELS)})
    cfg = MobileBertConfig(**(fields | overrides))
    cfg._attn_implementation = "eager"
    return cfg


def random_student(seed=0, **kw) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(**kw)).eval()


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Class k ⇔ the text holds one of class k's 10 keyword characters among random filler."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(len(LABELS))
        filler = [rng.choice(CHARS[40:]) for _ in range(rng.randint(6, 20))]
        for _ in range(rng.randint(1, 2)):
            filler.insert(rng.randrange(len(filler) + 1), CHARS[label * 10 + rng.randrange(10)])
        rows.append({"text": "".join(filler), "label": LABELS[label]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def train_student(model, tokenizer, rows, steps=200, batch_size=32, lr=3e-4, seed=0):
    """A few hundred AdamW steps on `rows`; returns the model in eval mode."""
    torch.manual_seed(seed)
    label2id = model.config.label2id
    enc = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
    labels = torch.tensor([label2id[r["label"]] for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(rows), (batch_size,), generator=g)
        out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=labels[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


def accuracy(model, tokenizer, rows) -> float:
    enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    gold = torch.tensor([model.config.label2id[r["label"]] for r in rows])
    return float((pred == gold).float().mean())


def to_uer(state_dict: dict) -> dict:
    """Rename canonical HF BERT keys to UER-py's (written independently of mbconvert.adapters.uer)."""
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("bert.")
        if k == "embeddings.word_embeddings.weight":
            out["embedding.word_embedding.weight"] = v
        elif k == "embeddings.position_embeddings.weight":
            out["embedding.position_embedding.weight"] = v
        elif k == "embeddings.token_type_embeddings.weight":
            out["embedding.segment_embedding.weight"] = torch.cat([torch.zeros_like(v[:1]), v])
        elif k.startswith("embeddings.LayerNorm."):
            out["embedding.layer_norm." + ("gamma" if k.endswith("weight") else "beta")] = v
        elif k.startswith("encoder.layer."):
            i, rest = k[len("encoder.layer."):].split(".", 1)
            p = f"encoder.transformer.{i}."
            names = {"attention.self.query": "self_attn.linear_layers.0", "attention.self.key": "self_attn.linear_layers.1",
                     "attention.self.value": "self_attn.linear_layers.2", "attention.output.dense": "self_attn.final_linear",
                     "intermediate.dense": "feed_forward.linear_1", "output.dense": "feed_forward.linear_2"}
            mod, param = rest.rsplit(".", 1)
            if mod in names:
                out[p + names[mod] + "." + param] = v
            else:
                ln = "layer_norm_1" if mod.startswith("attention") else "layer_norm_2"
                out[p + ln + "." + ("gamma" if param == "weight" else "beta")] = v
        elif k.startswith("pooler.dense."):
            out["output_layer_1." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("classifier."):
            out["output_layer_2." + k.rsplit(".", 1)[1]] = v
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def save_student_pt(model, tokenizer, folder: Path) -> Path:
    """A bare state dict `student.pt` with its tokenizer files and `labels.json` beside it (what a user has)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "student.pt")
    tokenizer.save_pretrained(str(folder))
    (folder / "labels.json").write_text(json.dumps(LABELS[:model.config.num_labels]), encoding="utf-8")
    return folder / "student.pt"


def folder_state(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path → sha256 of its bytes), so a test can prove nothing changed."""
    import hashlib

    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
