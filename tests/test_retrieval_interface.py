"""Heads define retrieval: feature sets and a re-ranker from heads that only the test suite knows
(``custom_heads.py``) change the reported rankings exactly as computed here by hand; the blocks,
``select_metric``, ``--save_features`` and ``--visualize`` follow them."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import test as test_entry
import train as train_entry
from conftest import demo_config
from custom_heads import RerankHead, caption_mean, combine, pair_score, patch_mean
from datasets import build_dataset
from datasets.build import build_eval_loaders, read_image
from datasets.transforms import build_transforms
from model.build import build_model
from model.heads import GLOBAL, Head
from model.retrieval import RetrievalDefinition
from processor.evaluation import Evaluator
from processor.processor import metric_blocks
from test_end_to_end import REPO, TINY
from test_retrieval_engine import assert_metrics_equal, reference, reference_from_orders, stable_orders
from utils.errors import ConfigError
from utils.options import check_select_metric
from utils.simple_tokenizer import SimpleTokenizer, tokenize

HEADS = "sdm+test_mean+test_rerank"
WEIGHTS = ["--test_mean_weight", "2.0", "--test_global_weight", "0.5", "--rerank_k", "5"]


def _by_hand(model, dataset, cfg, first_weight=0.5):
    """Everything the evaluation should report, computed from one encoder pass over the test split."""
    tokenizer, transform = SimpleTokenizer(), build_transforms(cfg.img_size, is_train=False)
    split = dataset.test
    ids = torch.stack([tokenize(c, tokenizer, cfg.text_length) for c in split.captions])
    images = torch.stack([transform(read_image(p)) for p in split.img_paths])
    qp, gp = torch.tensor(split.caption_pids), torch.tensor(split.image_pids)
    with torch.no_grad():
        text, image = model.encoder.text_output(ids), model.encoder.image_output(images)
    g_t, g_i = F.normalize(text.global_feature, dim=1), F.normalize(image.global_feature, dim=1)
    m_t, m_i = F.normalize(caption_mean(text.tokens, ids), dim=1), F.normalize(patch_mean(image.tokens), dim=1)
    similarity = cfg.test_global_weight * g_t @ g_i.t() + cfg.test_mean_weight * m_t @ m_i.t()
    orders = stable_orders(similarity)
    k = cfg.rerank_k
    top = torch.stack([order[:k] for order in orders])
    q_tokens, g_tokens = text.tokens.half(), image.tokens.half()  # the caches are half precision
    second = torch.stack([pair_score(q_tokens[i].expand(k, -1, -1), ids[i].expand(k, -1), g_tokens[top[i]])
                          for i in range(len(ids))])
    first = similarity.gather(1, top)
    stats = type("Stats", (), dict(first_min=float(similarity.min()), first_max=float(similarity.max()),
                                   second_min=float(second.min()), second_max=float(second.max())))
    final = combine(second, first, stats, first_weight)
    reranked = [torch.cat([top[i][torch.sort(final[i], descending=True, stable=True).indices], orders[i][k:]])
                for i in range(len(ids))]
    return {
        "t2i": reference_from_orders(orders, qp, gp)[0],
        "t2i_global": reference(g_t, g_i, qp, gp)[0],
        "t2i_mean": reference(m_t, m_i, qp, gp)[0],
        "t2i_rerank": reference_from_orders(reranked, qp, gp)[0],
        "i2t": reference_from_orders(stable_orders(similarity.t()), gp, qp)[0],
    }, reranked


def test_a_feature_set_and_a_reranker_change_the_rankings_as_computed_by_hand(toy_root, custom):
    cfg = demo_config(toy_root, "--loss_names", HEADS, *WEIGHTS)
    dataset = build_dataset(cfg.dataset_name, cfg.root_dir)
    torch.manual_seed(0)
    model = build_model(cfg, dataset.num_classes)
    img_loader, txt_loader = build_eval_loaders(cfg, dataset, SimpleTokenizer())
    evaluation = Evaluator(img_loader, txt_loader, pair_batch=11).eval(model, torch.device("cpu"))
    expected, reranked = _by_hand(model, dataset, cfg)
    assert list(evaluation.results) == ["t2i", "t2i_global", "t2i_mean", "t2i_rerank", "i2t"]
    for block, metrics in expected.items():
        assert_metrics_equal(evaluation.results[block], metrics)
    # each stage really changes the ranking
    assert expected["t2i"] != expected["t2i_global"] and expected["t2i_rerank"] != expected["t2i"]
    for query in range(len(dataset.test.captions)):  # the final order, as visualised
        assert evaluation.ranking(query, 10) == reranked[query][:10].tolist()
    # 11 pairs per call of the head: two queries of 5 candidates; every query re-scored once
    assert model.heads["test_rerank"].calls == math.ceil(32 / 2)


def test_own_features_alone(toy_root, custom):
    """Global weight 0: the first stage is the head's feature set alone."""
    cfg = demo_config(toy_root, "--loss_names", "sdm+test_mean", "--test_global_weight", "0")
    dataset = build_dataset(cfg.dataset_name, cfg.root_dir)
    torch.manual_seed(0)
    model = build_model(cfg, dataset.num_classes)
    assert model.retrieval.blocks() == ["t2i", "t2i_global", "t2i_mean", "i2t"]
    evaluation = Evaluator(*build_eval_loaders(cfg, dataset, SimpleTokenizer())).eval(model, torch.device("cpu"))
    assert evaluation.results["t2i"] == evaluation.results["t2i_mean"]
    assert evaluation.results["t2i"] != evaluation.results["t2i_global"]
    assert evaluation.text.combined.shape[1] == evaluation.text.sets["mean"].shape[1]  # global left out


def test_heads_without_retrieval_rank_by_the_global_cosine(toy_root):
    cfg = demo_config(toy_root, "--loss_names", "sdm+id+mlm+cmt+tir")
    dataset = build_dataset(cfg.dataset_name, cfg.root_dir)
    model = build_model(cfg, dataset.num_classes)
    assert model.retrieval.weights == {GLOBAL: 1.0} and model.retrieval.reranker is None
    assert model.retrieval.blocks() == ["t2i", "i2t"]
    evaluation = Evaluator(*build_eval_loaders(cfg, dataset, SimpleTokenizer())).eval(model, torch.device("cpu"))
    expected, _ = _by_hand_global(model, dataset, cfg)
    assert_metrics_equal(evaluation.results["t2i"], expected)


def _by_hand_global(model, dataset, cfg):
    tokenizer, transform = SimpleTokenizer(), build_transforms(cfg.img_size, is_train=False)
    ids = torch.stack([tokenize(c, tokenizer, cfg.text_length) for c in dataset.test.captions])
    images = torch.stack([transform(read_image(p)) for p in dataset.test.img_paths])
    with torch.no_grad():
        t, i = model.encode_text(ids), model.encode_image(images)
    return reference(F.normalize(t, dim=1), F.normalize(i, dim=1), torch.tensor(dataset.test.caption_pids),
                     torch.tensor(dataset.test.image_pids))


class _Fixed(Head):
    name = "fixed"

    def __init__(self, weights=None, rerank_k=0):
        super().__init__()
        self.weights, self.rerank_k = weights or {}, rerank_k

    def retrieval_weights(self):
        return self.weights


@pytest.mark.parametrize("heads, message", [
    ({"a": _Fixed(rerank_k=3), "b": _Fixed(rerank_k=4)}, "heads a, b all re-rank; at most one head may"),
    ({"a": _Fixed({"x": 1.0}), "b": _Fixed({"x": 2.0})}, "heads 'a' and 'b' both set the retrieval weight of feature set 'x'"),
    ({"a": _Fixed({GLOBAL: 0.5}), "b": _Fixed({GLOBAL: 1.0})}, "heads 'a' and 'b' both set the retrieval weight of feature set 'global'"),
    ({"a": _Fixed({"x": -1.0})}, "head 'a' gives feature set 'x' the weight -1.0"),
    ({"a": _Fixed({GLOBAL: 0.0})}, "every retrieval feature set has weight 0"),
])
def test_conflicting_retrieval_definitions_are_config_errors(heads, message):
    with pytest.raises(ConfigError, match=message):
        RetrievalDefinition(heads)


def test_two_heads_may_agree_on_the_global_weight():
    definition = RetrievalDefinition({"a": _Fixed({GLOBAL: 0.5, "x": 1.0}), "b": _Fixed({GLOBAL: 0.5, "y": 2.0})})
    assert definition.weights == {GLOBAL: 0.5, "x": 1.0, "y": 2.0}
    parts = {name: F.normalize(torch.randn(3, 4), dim=1) for name in definition.weights}
    combined = definition.combine(parts)
    expected = sum(w * parts[s] @ parts[s].t() for s, w in definition.weights.items())
    torch.testing.assert_close(combined @ combined.t(), expected)


@pytest.mark.parametrize("value, blocks, message", [
    ("t2i_rerank.R1", ["t2i", "i2t"], "this model's evaluation reports the blocks t2i, i2t, not 't2i_rerank'"),
    ("t2i.R2", ["t2i", "i2t"], "must be <block>.<metric>"),
    ("R1", ["t2i", "i2t"], "must be <block>.<metric>"),
])
def test_select_metric_must_name_a_reported_block_and_metric(value, blocks, message):
    with pytest.raises(ConfigError, match=message):
        check_select_metric(value, blocks)


def _scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_training_selects_on_the_named_block_and_test_py_follows_the_final_ranking(toy_root, custom, tmp_path,
                                                                                   monkeypatch):
    run = tmp_path / "run"
    args = ["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(toy_root),
            "--output_dir", str(run), "--loss_names", HEADS, *WEIGHTS, "--num_epoch", "3",
            "--select_metric", "t2i_rerank.mAP", "--eval_period", "1"]
    best = train_entry.main(args)
    maps = _scalars(run, "test/t2i_rerank_mAP")
    assert set(maps) == {1, 2, 3} and len(set(maps.values())) > 1
    assert best["epoch"] == max(maps, key=lambda e: (maps[e], -e))  # the first epoch with the best value
    saved = json.loads((run / "results.json").read_text())
    assert list(metric_blocks(saved)) == ["t2i", "t2i_global", "t2i_mean", "t2i_rerank", "i2t"]
    assert "t2i_rerank" in (run / "train_log.txt").read_text()

    pictures = []
    monkeypatch.setattr(test_entry, "retrieval_grid", lambda *a: pictures.append(a) or _Picture())
    out = tmp_path / "eval"
    results = test_entry.main(["--config_file", str(run / "configs.yaml"), "--output_dir", str(out),
                               "--save_features", "--visualize", "3"])
    assert metric_blocks(results) == metric_blocks(saved) and results["epoch"] == saved["epoch"]  # best.pth again
    features = torch.load(out / "features.pt")
    assert features["rerank_order"].shape == (32, 5)
    assert features["text_feats_mean"].shape == (32, 64) and features["image_feats_global"].shape == (16, 64)
    # the picture shows each query's final ranking: the re-ranked top 5, then the first stage
    captions, query_pids, paths, pids, top = pictures[0]
    dataset = build_dataset("CUHK-PEDES", toy_root)
    first = features["text_feats"] @ features["image_feats"].t()
    for row, query in enumerate(torch.linspace(0, 31, 3).long().tolist()):
        head = features["rerank_order"][query].tolist()
        rest = [g for g in torch.sort(first[query], descending=True, stable=True).indices.tolist() if g not in head]
        assert paths[row] == [dataset.test.img_paths[g] for g in (head + rest)[:10]]
        assert captions[row] == dataset.test.captions[query]


class _Picture:
    def save(self, path):
        pass


def test_rerank_head_is_not_run_for_training_only_heads(toy_root, custom):
    """Only the re-ranking head's re-scoring runs in the second stage; no re-ranking without one."""
    cfg = demo_config(toy_root, "--loss_names", "sdm+test_mean")
    model = build_model(cfg, 16)
    assert model.retrieval.reranker is None
    cfg = demo_config(toy_root, "--loss_names", "sdm+test_rerank", "--rerank_k", "3")
    model = build_model(cfg, 16)
    assert isinstance(model.retrieval.reranker, RerankHead) and model.retrieval.reranker.rerank_k == 3
