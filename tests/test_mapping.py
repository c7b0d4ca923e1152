"""The MobileBERTAdapter: what each mapped piece must preserve, measured."""

from __future__ import annotations

import json

import pytest
import torch

import helpers
from transformers import MobileBertForSequenceClassification

from mbconvert.layer_mapping import LayerMapper
from mbconvert.mapping import MobileBERTAdapter, TeacherActivations, evaluate_mapping, weight_importance
from mbconvert.cli import main
from mbconvert.config import ConvertConfig
from mbconvert.data import encode, read_examples
from mbconvert.errors import ConfigError
from mbconvert.load import load_source


@pytest.fixture(scope="module")
def source(trained_student):
    return load_source(trained_student)


@pytest.fixture(scope="module")
def calib(source, task_data):
    rows = read_examples(task_data["train"], label2id=source.config.label2id).subset(128, seed=0)
    return encode(rows, source.tokenizer)


@pytest.fixture(scope="module")
def held_out(source, task_data):
    return encode(read_examples(task_data["dev"], label2id=source.config.label2id), source.tokenizer)


@pytest.fixture(scope="module")
def mapped(source, calib):
    return MobileBERTAdapter(ConvertConfig(bottleneck=64, ffn=4)).convert(source, calib)


def test_layer_activations_are_the_students_states_on_real_tokens(source, calib):
    """TeacherActivations.layer(i): layer i's input, post-attention state and output, padding dropped."""
    teacher, i = source.model, 1
    with torch.no_grad():
        layer = TeacherActivations(teacher, calib).layer(i)
        t = teacher.bert.encoder.layer[i]
        post_attention = t.attention(layer.x_seq, attention_mask=layer.mask4d)[0]
        output = t(layer.x_seq, attention_mask=layer.mask4d)
    real_tokens = int(calib.attention_mask.sum())
    assert layer.x.shape == layer.s.shape == layer.out.shape == (real_tokens, teacher.config.hidden_size)
    assert torch.equal(layer.x, layer.x_seq[layer.mask])
    assert torch.allclose(layer.s, layer.flat(post_attention), atol=1e-5)
    assert torch.allclose(layer.out, layer.flat(output), atol=1e-5)


def test_one_layer_mapped_alone_reproduces_the_students_layer(source, calib):
    """LayerMapper fed the student's own layer input: what it returns is what the mapped MobileBERT layer computes,
    zero at padding, and close to the student's layer output."""
    teacher, i = source.model, 0
    adapter = MobileBERTAdapter(ConvertConfig(bottleneck=64, ffn=4))
    mc = adapter.target_config(teacher.config)
    mobile_layer = MobileBertForSequenceClassification(mc).eval().mobilebert.encoder.layer[i]
    heads, neurons = weight_importance(teacher)
    with torch.no_grad():
        layer = TeacherActivations(teacher, calib).layer(i)
        mapper = LayerMapper(adapter.config, teacher.bert.encoder.layer[i], mobile_layer, mc, heads[i], neurons[i])
        report, out = mapper.run(layer, layer.x_seq)
        computed = mobile_layer(layer.x_seq, attention_mask=layer.mask4d)
    assert out.shape == layer.x_seq.shape and out[~layer.mask].abs().max() == 0
    assert torch.allclose(layer.flat(out), layer.flat(computed), atol=1e-4)
    cosine = torch.nn.functional.cosine_similarity(layer.flat(out), layer.out, dim=-1)
    assert cosine.mean() > 0.95
    assert {"stream_energy", "attention", "ffn", "output_fit_r2"} <= set(report)


def test_embedding_factorisation_error_is_the_dropped_singular_values(source, mapped):
    mobile, report = mapped
    word = source.model.bert.embeddings.word_embeddings.weight.detach().double()
    singular = torch.linalg.svdvals(word)
    e = 128
    expected = singular[e:].pow(2).sum().sqrt()
    emb = mobile.mobilebert.embeddings
    centre = emb.embedding_transformation.weight[:, e:2 * e].double()  # the current token's block
    rebuilt = emb.word_embeddings.weight.double() @ centre.T
    assert torch.allclose((word - rebuilt).norm(), expected, rtol=1e-4)
    assert report["embeddings"]["frobenius_error"] == pytest.approx(float(expected), rel=1e-4)
    neighbours = torch.cat([emb.embedding_transformation.weight[:, :e], emb.embedding_transformation.weight[:, 2 * e:]], 1)
    assert neighbours.abs().max() == 0  # trigram neighbour blocks start at zero


def test_classifier_head_is_copied_exactly(source, mapped):
    mobile, _ = mapped
    assert torch.equal(mobile.classifier.weight, source.model.classifier.weight)
    assert torch.equal(mobile.mobilebert.pooler.dense.weight, source.model.bert.pooler.dense.weight)


def test_heads_and_neurons_are_chosen_by_importance_and_balanced(mapped):
    _, report = mapped
    for layer in report["layers"]:
        att = layer["attention"]
        assert len(att["heads_kept"]) == 2 and len(set(att["heads_kept"])) == 2
        assert att["importance_kept"] >= 0.5  # the 2 most important of 4 heads carry at least half
        ffn = layer["ffn"]
        assert ffn["neurons_kept"] == ffn["neurons_total"] == 1024  # 4 FFNs × 256 = all neurons
        shares = ffn["importance_share_per_ffn"]
        assert max(shares) - min(shares) < 0.02 and sum(shares) == pytest.approx(1.0)


def test_mapped_model_beats_random_init_clearly(source, mapped, held_out):
    mobile, _ = mapped
    result = evaluate_mapping(source.model, mobile, held_out)
    conv, rand = result["converted"], result["random_init"]
    assert conv["agreement"] >= 0.9 > rand["agreement"] + 0.3
    for c, r in zip(conv["layer_cosine"], rand["layer_cosine"]):
        assert c > 0.8 and c > r + 0.5


def test_calibration_beats_weights_only(source, calib, held_out, mapped):
    weights_only, _ = MobileBERTAdapter(ConvertConfig(bottleneck=64, ffn=4)).convert(source)
    fitted = evaluate_mapping(source.model, mapped[0], held_out)["converted"]["layer_cosine"]
    blind = evaluate_mapping(source.model, weights_only, held_out)["converted"]["layer_cosine"]
    assert fitted[-1] > blind[-1]


@pytest.mark.parametrize("options", [dict(norm="layer_norm"), dict(act="gelu"), dict(ffn=2, intermediate_size=128)])
def test_fidelity_options_convert_and_stay_close(source, calib, held_out, options):
    mobile, _ = MobileBERTAdapter(ConvertConfig(bottleneck=64, **options)).convert(source, calib)
    assert mobile.config.normalization_type == options.get("norm", "no_norm")
    assert mobile.config.hidden_act == options.get("act", "relu")
    result = evaluate_mapping(source.model, mobile, held_out)["converted"]
    assert result["agreement"] >= 0.8 and result["layer_cosine"][-1] > 0.7


def test_any_bert_shape_converts_with_derived_defaults():
    """A MiniLM-shaped student (hidden 384, 12 heads, intermediate 1536): nothing assumes 512/8/2048."""
    student = helpers.random_student(hidden=384, layers=2, heads=12, intermediate=1536)
    mobile, report = MobileBERTAdapter(ConvertConfig()).convert(student)
    c = mobile.config
    assert (c.hidden_size, c.intra_bottleneck_size, c.num_attention_heads, c.intermediate_size) == (384, 128, 4, 512)
    assert report["target"]["num_attention_heads"] == 4 and report["target"]["intermediate_size"] == 512
    tiny = helpers.random_student(hidden=128, layers=1, heads=2, intermediate=256)
    mobile, _ = MobileBERTAdapter(ConvertConfig(bottleneck=64, embedding_size=64)).convert(tiny)
    assert mobile.config.num_attention_heads == 2  # never more heads than the student has


def test_impossible_shapes_are_config_errors():
    student = helpers.random_student(hidden=128, layers=1, heads=2, intermediate=256)
    for bad in (dict(bottleneck=128), dict(bottleneck=64, heads_out=4), dict(bottleneck=60, heads_out=8),
                dict(bottleneck=64, embedding_size=1000)):
        with pytest.raises(ConfigError):
            MobileBERTAdapter(ConvertConfig(**bad)).convert(student)


def test_cli_with_calibration_reports_agreement_before_training(trained_student, task_data, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([str(trained_student), "--bottleneck", "64", "--calib", str(task_data["train"]),
                 "--calib-samples", "96", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "conversion.json").read_text())
    ev = report["evaluation"]
    assert ev["texts"] > 0
    assert ev["converted"]["agreement"] > ev["random_init"]["agreement"]
    assert ev["converted"]["layer_cosine"][-1] > ev["random_init"]["layer_cosine"][-1] + 0.5
    assert report["calibration"]["texts"] == 96


@pytest.fixture(scope="module")
def small_calib(tokenizer, task_data):
    """32 calibration texts for the random students below (their vocabulary is the test tokenizer's)."""
    label2id = {name: i for i, name in enumerate(helpers.LABELS)}
    return encode(read_examples(task_data["train"], label2id=label2id).subset(32, seed=0), tokenizer)


@pytest.mark.parametrize("hidden, heads, bottleneck, intermediate",
                         [(120, 5, 60, None), (128, 16, 64, None), (96, 3, 48, None), (128, 2, 64, 32)])
@pytest.mark.parametrize("with_data", [False, True], ids=["weights only", "calibrated"])
def test_small_heads_give_a_well_defined_bottleneck(hidden, heads, bottleneck, intermediate, with_data, small_calib):
    """Odd legal geometries, some with kept heads spanning fewer than b directions (2 × head size × kept heads < b):
    the shared q/k bottleneck is still b independent directions (all of the kept heads' q/k when they span fewer),
    the result is deterministic and its outputs finite. The last student's FFN (32) is narrower than b."""
    student = helpers.random_student(hidden=hidden, layers=2, heads=heads, intermediate=intermediate)
    calib = small_calib if with_data else None
    config = ConvertConfig(bottleneck=bottleneck, embedding_size=64, ffn=2)
    mobile, report = MobileBERTAdapter(config).convert(student, calib)
    again, _ = MobileBERTAdapter(config).convert(student, calib)
    spanned = 2 * (hidden // heads) * mobile.config.num_attention_heads
    for layer, layer_report in zip(mobile.mobilebert.encoder.layer, report["layers"]):
        reduce = layer.bottleneck.attention.dense.weight.double()
        assert torch.linalg.matrix_rank(reduce) == bottleneck
        if spanned <= bottleneck:
            assert layer_report["attention"]["qk_bottleneck_energy"] == pytest.approx(1.0, abs=1e-9)
    for (name, a), b in zip(mobile.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    batch = small_calib.batch(slice(0, 8))
    with torch.no_grad():
        logits = mobile(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (8, len(helpers.LABELS)) and torch.isfinite(logits).all()
