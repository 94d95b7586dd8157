"""search.py: indexing a folder (incremental, resumable, foreign indexes refused), queries from the
command line, and the web page / JSON API over HTTP. Rankings are checked against the run's own
evaluation of the same images."""
from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
from PIL import Image

import search as search_entry
import train as train_entry
from conftest import demo_config
from datasets import build_dataset
from datasets.build import build_eval_loaders
from gallery.files import scan_images
from gallery.index import SearchIndex, SearchIndexError, update_index
from gallery.searcher import QueryError, Searcher, top_k
from gallery.server import SearchServer
from model.run import load_trained_run
from processor.evaluation import Evaluator
from test_end_to_end import REPO, TINY
from utils.errors import UserError, run_cli
from utils.simple_tokenizer import SimpleTokenizer, tokenize
from utils.visualize import grid_size

CPU = torch.device("cpu")


def _train(toy_root: Path, out: Path, *flags: str) -> Path:
    train_entry.main(["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(toy_root),
                      "--output_dir", str(out), "--num_epoch", "2", *flags])
    return out / "configs.yaml"


@pytest.fixture(scope="module")
def run_config(toy_root, tmp_path_factory) -> Path:
    return _train(toy_root, tmp_path_factory.mktemp("run"), "--loss_names", "sdm+id")


@pytest.fixture()
def gallery(toy_root, tmp_path) -> Path:
    """A folder holding copies of the toy test images (in a sub-folder, to exercise recursion)."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for i, path in enumerate(build_dataset("CUHK-PEDES", toy_root).test.img_paths):
        shutil.copy(path, folder / ("more" if i % 2 else "") / Path(path).name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def _evaluation(config: Path, toy_root: Path):
    run = load_trained_run(config)
    dataset = build_dataset("CUHK-PEDES", toy_root)
    loaders = build_eval_loaders(demo_config(toy_root, *TINY), dataset, SimpleTokenizer())
    return dataset, Evaluator(*loaders).eval(run.model, CPU)


# ---------------------------------------------------------------- index + query = the evaluation
def test_search_ranks_a_folder_as_the_evaluation_ranks_the_test_gallery(run_config, toy_root, gallery, tmp_path):
    report = update_index(load_trained_run(run_config), gallery, tmp_path / "idx", CPU, batch_size=5, num_workers=0)
    dataset, evaluation = _evaluation(run_config, toy_root)
    images = len(dataset.test.img_paths)
    assert (report.files, report.embedded, report.kept, report.removed, report.unreadable) == (images, images, 0, 0, [])
    searcher = Searcher(load_trained_run(run_config), SearchIndex.load(tmp_path / "idx"))
    assert searcher.stop_at_eot  # global features only: the text encoder stops at EOT
    queries = list(range(0, len(dataset.test.captions), 3))
    results = searcher.search([dataset.test.captions[q] for q in queries], k=10)
    gallery_row = {Path(p).name: i for i, p in enumerate(dataset.test.img_paths)}
    for query, hits in zip(queries, results):
        expected = [Path(dataset.test.img_paths[g]).name for g in evaluation.ranking(query, 10)]
        assert [Path(h.path).name for h in hits] == expected
        first = evaluation.text.combined[query] @ evaluation.image.combined.t()
        for hit in hits:
            assert hit.score == pytest.approx(float(first[gallery_row[Path(hit.path).name]]), abs=1e-5)
    assert [h.rank for h in results[0]] == list(range(1, 11))


def test_stopping_the_text_encoder_at_eot_changes_nothing(run_config):
    run = load_trained_run(run_config)
    captions = ("a man in a red coat", "a woman with a bag and black shoes walking to the left")
    ids = torch.stack([tokenize(c, SimpleTokenizer(), run.cfg.text_length) for c in captions])
    full = run.model.retrieval.encode_queries(run.model.encoder, ids)[0]["global"]
    cut = run.model.retrieval.encode_queries(run.model.encoder, ids[:, :int(ids.argmax(1).max()) + 1])[0]["global"]
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-5)


def test_top_k_breaks_ties_by_row():
    scores = torch.tensor([[0.5, 0.75, 0.5, 0.75, 0.25, 0.5]])
    rows, values = top_k(scores, 4)
    assert rows.tolist() == [[1, 3, 0, 2]] and values.tolist() == [[0.75, 0.75, 0.5, 0.5]]
    assert top_k(scores, 10)[0].tolist() == [[1, 3, 0, 2, 5, 4]]


def test_a_reranking_run_reranks_each_query(toy_root, tmp_path, custom):
    """With the first stage weighted 0 the test re-ranker orders the top k by its own score, so the
    search must give the evaluation's final order (stats do not matter then)."""
    config = _train(toy_root, tmp_path / "run", "--loss_names", "sdm+test_mean+test_rerank", "--rerank_k", "5",
                    "--test_first_stage_weight", "0")
    update_index(load_trained_run(config), _copy_test_images(toy_root, tmp_path / "g"), tmp_path / "idx", CPU,
                 num_workers=0)
    index = SearchIndex.load(tmp_path / "idx")
    assert set(index.cache) == {"tokens"} and index.cache["tokens"].dtype == torch.float16
    searcher = Searcher(load_trained_run(config), index)
    assert not searcher.stop_at_eot
    dataset, evaluation = _evaluation(config, toy_root)
    for query in (0, 7, 13):
        hits = searcher.search([dataset.test.captions[query]], k=8)[0]
        assert [Path(h.path).name for h in hits] == [Path(dataset.test.img_paths[g]).name
                                                     for g in evaluation.ranking(query, 8)]


def _copy_test_images(toy_root: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for path in build_dataset("CUHK-PEDES", toy_root).test.img_paths:
        shutil.copy(path, folder / Path(path).name)
    return folder


# ---------------------------------------------------------------- incremental, resumable, refusals
def test_reindexing_embeds_only_new_and_changed_files(run_config, gallery, tmp_path, caplog):
    run, index_path = load_trained_run(run_config), tmp_path / "idx"
    update_index(run, gallery, index_path, CPU, num_workers=0)
    before = SearchIndex.load(index_path)
    files = [f.path for f in before.files]
    shutil.copy(gallery / files[0], gallery / "new.jpg")
    with Image.open(gallery / files[1]) as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(gallery / files[1], quality=60)  # changed
    os.utime(gallery / files[1], ns=(time.time_ns(), time.time_ns() + 10**9))
    (gallery / files[2]).unlink()
    (gallery / "broken.png").write_bytes(b"\x89PNG not really")
    (gallery / "empty.webp").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        report = update_index(run, gallery, index_path, CPU, num_workers=0)
    assert (report.kept, report.embedded, report.removed) == (len(files) - 2, 2, 2)
    assert report.unreadable == [str(gallery / "broken.png"), str(gallery / "empty.webp")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken.png" in warnings[0] and "empty.webp" in warnings[0]
    after = SearchIndex.load(index_path)
    assert [f.path for f in after.files] == sorted(set(files) - {files[2]} | {"new.jpg"})
    assert [f.signature for f in after.files] == [f.signature for f in scan_images(gallery)
                                                   if f.path not in ("broken.png", "empty.webp")]
    for row, file in enumerate(after.files):
        if file.path not in (files[1], "new.jpg"):
            assert torch.equal(after.features[row], before.features[files.index(file.path)])
    new = after.features[[f.path for f in after.files].index("new.jpg")]
    assert torch.allclose(new, before.features[0], atol=1e-5)  # the same pixels as files[0]
    changed = after.features[[f.path for f in after.files].index(files[1])]
    assert not torch.allclose(changed, before.features[1], atol=1e-3)
    again = update_index(run, gallery, index_path, CPU, num_workers=0)
    assert (again.embedded, again.removed, again.unreadable) == (0, 0, [])  # unreadable files: not retried


def test_an_interrupted_index_continues_where_it_stopped(run_config, gallery, tmp_path, monkeypatch):
    run = load_trained_run(run_config)
    complete = tmp_path / "complete"
    update_index(run, gallery, complete, CPU, batch_size=3, num_workers=0)
    saves = []
    real_save = SearchIndex.save

    def save_then_die(self, path):
        real_save(self, path)
        saves.append(len(self))
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(SearchIndex, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        update_index(run, gallery, tmp_path / "idx", CPU, batch_size=3, num_workers=0, save_every=0)
    monkeypatch.undo()
    assert saves == [3, 6] and len(SearchIndex.load(tmp_path / "idx")) == 6
    report = update_index(run, gallery, tmp_path / "idx", CPU, batch_size=3, num_workers=0)
    assert report.kept == 6 and report.embedded == report.files - 6
    resumed, straight = SearchIndex.load(tmp_path / "idx"), SearchIndex.load(complete)
    assert [f.path for f in resumed.files] == [f.path for f in straight.files]
    torch.testing.assert_close(resumed.features, straight.features, atol=1e-6, rtol=0)


def test_foreign_indexes_and_folders_are_refused(run_config, gallery, tmp_path):
    update_index(load_trained_run(run_config), gallery, tmp_path / "idx", CPU, num_workers=0)
    other = tmp_path / "other"
    shutil.copytree(run_config.parent, other)
    state = torch.load(other / "best.pth", weights_only=True)
    state["model"]["encoder.ln_final.bias"] += 0.01
    torch.save(state, other / "best.pth")
    for attempt in (lambda: Searcher(load_trained_run(other / "configs.yaml"), SearchIndex.load(tmp_path / "idx")),
                    lambda: update_index(load_trained_run(other / "configs.yaml"), gallery, tmp_path / "idx", CPU)):
        with pytest.raises(SearchIndexError, match="this index was made by run 'demo' .* not by run 'demo' .*other"):
            attempt()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(SearchIndexError, match=f"covers the folder {gallery}, not {elsewhere}"):
        update_index(load_trained_run(run_config), elsewhere, tmp_path / "idx", CPU)
    (tmp_path / "junk").write_bytes(b"junk")
    with pytest.raises(SearchIndexError, match="cannot read index"):
        SearchIndex.load(tmp_path / "junk")
    torch.save({"model": {}}, tmp_path / "checkpoint.pth")
    with pytest.raises(SearchIndexError, match="is not a search index"):
        SearchIndex.load(tmp_path / "checkpoint.pth")
    with pytest.raises(UserError, match="image folder not found"):
        update_index(load_trained_run(run_config), tmp_path / "missing", tmp_path / "idx2", CPU)


# ---------------------------------------------------------------- the command line
def test_query_command_line(run_config, toy_root, gallery, tmp_path, capsys):
    test = build_dataset("CUHK-PEDES", toy_root).test
    report = search_entry.main(["index", "--config_file", str(run_config), "--images", str(gallery), "--index",
                                str(tmp_path / "idx"), "--num_workers", "0"])
    assert report.embedded == len(test.img_paths)
    captions = test.captions
    capsys.readouterr()
    search_entry.main(["query", "--index", str(tmp_path / "idx"), "--json", "--topk", "4", captions[0]])
    rows = json.loads(capsys.readouterr().out)
    expected = Searcher(load_trained_run(run_config), SearchIndex.load(tmp_path / "idx")).search([captions[0]], 4)[0]
    assert rows == [{"rank": h.rank, "score": round(h.score, 6), "path": h.path} for h in expected]
    (tmp_path / "queries.txt").write_text(f"{captions[0]}\n\n{captions[5]}\n")
    search_entry.main(["query", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "queries.txt"),
                       "--topk", "3", "--sheet", str(tmp_path / "sheet.png")])
    out = capsys.readouterr().out.splitlines()
    assert out[1] == captions[0] and out[2].split() == ["rank", "score", "path"] and len(out) == 2 * 6
    assert out[3].split()[0] == "1" and out[3].split()[2] == expected[0].path
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size == grid_size(2, 3, labelled=True)
    moved = tmp_path / "moved"
    shutil.copytree(run_config.parent, moved)
    for config in (moved / "configs.yaml", moved):  # the run's config file, or its directory
        search_entry.main(["query", "--index", str(tmp_path / "idx"), "--config_file", str(config),
                           "--json", captions[0]])
        assert json.loads(capsys.readouterr().out)[0]["path"] == expected[0].path
    for argv, message in ((["query", "--index", str(tmp_path / "idx")], "give sentences to search for"),
                          (["query", "--index", str(tmp_path / "nope"), "x"], "index not found"),
                          (["query", "--index", str(tmp_path / "idx"), "   "], "empty query")):
        assert search_entry.run_cli(search_entry.main, argv) == 1
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------- the web page and API over HTTP
@pytest.fixture()
def server(run_config, gallery, tmp_path):
    update_index(load_trained_run(run_config), gallery, tmp_path / "idx", CPU, num_workers=0)
    searcher = Searcher(load_trained_run(run_config), SearchIndex.load(tmp_path / "idx"))
    server = SearchServer(searcher, ("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _get(server, path: str) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
    connection.request("GET", path)  # sent as given: no client-side normalisation of '..'
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, response.getheader("Content-Type"), body


def test_the_api_answers_the_ranking_and_serves_only_indexed_images(server, toy_root):
    captions = build_dataset("CUHK-PEDES", toy_root).test.captions
    status, kind, body = _get(server, "/api/search?" + urllib.parse.urlencode({"q": captions[2], "k": 5}))
    payload = json.loads(body)
    expected = server.searcher.search([captions[2]], 5)[0]
    assert (status, kind, payload["query"]) == (200, "application/json; charset=utf-8", captions[2])
    assert [(r["rank"], r["path"], r["url"]) for r in payload["results"]] == \
        [(h.rank, h.path, f"/image/{h.row}") for h in expected]
    assert [r["score"] for r in payload["results"]] == pytest.approx([h.score for h in expected], abs=1e-6)
    status, kind, image = _get(server, payload["results"][0]["url"])
    assert (status, kind, image) == (200, "image/jpeg", Path(expected[0].path).read_bytes())
    for path in ("/image/../../etc/passwd", "/image/..%2f..%2fetc%2fpasswd", "/etc/passwd", "/../search.py",
                 f"/image/{len(server.searcher.index)}", "/image/-1", "/image/1/../0", "/image/" + "9" * 40):
        assert _get(server, path)[0] == 404, path


def test_bad_queries_get_400_with_a_message(server):
    bad = [({"q": ""}, "empty query"), ({"q": "   "}, "empty query"), ({}, "empty query"),
           ({"q": "a " * 600}, "at most 1000"), ({"q": "red " * 80}, "query of 80 tokens; the model reads at most 30"),
           ({"q": "a man", "k": "0"}, "k must be"), ({"q": "a man", "k": "x"}, "k must be"),
           ({"q": "a man", "k": "101"}, "k must be")]
    for query, message in bad:
        status, _, body = _get(server, "/api/search?" + urllib.parse.urlencode(query))
        assert status == 400 and message in json.loads(body)["error"], query
    status, _, page = _get(server, "/?q=")
    assert status == 400 and b'class="error"' in page


def test_the_page_shows_results_and_concurrent_queries_get_their_own(server, toy_root):
    captions = build_dataset("CUHK-PEDES", toy_root).test.captions
    status, kind, page = _get(server, "/?" + urllib.parse.urlencode({"q": captions[0], "k": 6}))
    text = page.decode()
    hits = server.searcher.search([captions[0]], 6)[0]
    assert status == 200 and kind.startswith("text/html") and text.count("<figure>") == 6
    assert all(f'src="/image/{h.row}"' in text for h in hits)
    assert _get(server, "/")[0] == 200
    expected = {c: server.searcher.search([c], 5)[0] for c in captions[:4]}
    answers: dict[str, list] = {}

    def ask(caption: str) -> None:
        answers[caption] = json.loads(_get(server, "/api/search?" + urllib.parse.urlencode({"q": caption, "k": 5}))[2])

    threads = [threading.Thread(target=ask, args=(c,)) for c in list(expected) * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for caption, hits in expected.items():
        assert answers[caption]["query"] == caption
        assert [r["path"] for r in answers[caption]["results"]] == [h.path for h in hits]


def test_serve_listens_on_this_machine_only_by_default():
    args = search_entry.build_parser().parse_args(["serve", "--index", "idx"])
    assert (args.host, args.port, args.topk) == ("127.0.0.1", 7860, 10)


def test_long_queries_and_mixed_precision(run_config, gallery, tmp_path):
    run = load_trained_run(run_config)
    update_index(run, gallery, tmp_path / "idx", CPU, num_workers=0)
    searcher = Searcher(run, SearchIndex.load(tmp_path / "idx"))
    with pytest.raises(QueryError, match="query of 80 tokens; the model reads at most 30"):
        searcher.search(["red " * 80], strict=True)
    assert len(searcher.search(["red " * 80], k=3)[0]) == 3  # the command line cuts, as training does
    update_index(run, gallery, tmp_path / "bf16", CPU, num_workers=0, amp="bf16")
    fp32, bf16 = SearchIndex.load(tmp_path / "idx").features, SearchIndex.load(tmp_path / "bf16").features
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert torch.nn.functional.cosine_similarity(bf16, fp32).min() > 0.99


# ---------------------------------------------------------------- tools
def test_split_images_gathers_a_split_into_a_folder(toy_root, tmp_path):
    from tools.split_images import main as split_main
    test = build_dataset("CUHK-PEDES", toy_root).test
    assert split_main(["--root_dir", str(toy_root), "--out", str(tmp_path / "out")]) == len(test.img_paths)
    found = scan_images(tmp_path / "out")
    assert sorted(Path(p).name for p in test.img_paths) == [Path(f.path).name for f in found]
    assert all((tmp_path / "out" / f.path).resolve() == Path(p).resolve()
               for f, p in zip(found, sorted(test.img_paths, key=lambda p: Path(p).name)))
    assert split_main(["--root_dir", str(toy_root), "--out", str(tmp_path / "out")]) == 0  # nothing new


def test_screenshot_tool_names_a_missing_browser(tmp_path, capsys):
    from tools.screenshot_search import main as screenshot_main
    assert run_cli(screenshot_main, ["--index", "idx", "--query", "a man", "--chromium", "no-such-browser"]) == 1
    assert "no-such-browser not found; install Debian's chromium package" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium package is not installed")
def test_screenshot_of_the_page(run_config, gallery, tmp_path):
    from tools.screenshot_search import main as screenshot_main
    update_index(load_trained_run(run_config), gallery, tmp_path / "idx", CPU, num_workers=0)
    out = screenshot_main(["--index", str(tmp_path / "idx"), "--query", "a woman", "--out", str(tmp_path / "p.png"),
                           "--window", "800,600"])
    with Image.open(out) as picture:
        assert picture.size == (800, 600) and len(set(picture.convert("RGB").getdata())) > 50  # not a blank page


def test_benchmark_reports_search_latency_and_indexing_throughput(toy_root):
    from tools.benchmark import main as benchmark_main
    result = benchmark_main(["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(toy_root),
                             "--steps", "1", "--warmup", "0", "--loader_batches", "1", "--search_gallery", "5000",
                             "--search_queries", "4", "--search_index_images", "6"])
    assert result["search_gallery_rows"] == 5000 and result["search_index_images_per_second"] > 0
    assert 0 < result["search_query_ms_p50"] <= result["search_query_ms_p90"]
    assert set(result["search_query_ms_p50_by_stage"]) == {"tokenize", "encode", "score_top_k", "rerank"}


def test_a_run_trained_with_tbps_cleaning_cleans_its_queries():
    """A run whose test captions went through TBPS-CLIP's pre_caption is searched with the same
    cleaning: the query's ids equal those of its cleaned text."""
    from types import SimpleNamespace
    tokenizer = SimpleTokenizer()
    searcher = SimpleNamespace(tokenizer=tokenizer, text_length=32,
                               run=SimpleNamespace(cfg=SimpleNamespace(caption_clean="tbps", caption_max_words=77)))
    ids = Searcher.token_ids(searcher, "A man in a red shirt (and) jeans.")
    assert torch.equal(ids, tokenize("a man in a red shirt and jeans", tokenizer, 32))
    searcher.run.cfg.caption_clean = "none"
    assert 269 in Searcher.token_ids(searcher, "A man in a red shirt.").tolist()  # "." kept without cleaning
    with pytest.raises(QueryError, match="empty query"):
        Searcher.token_ids(SimpleNamespace(**{**vars(searcher), "run": SimpleNamespace(
            cfg=SimpleNamespace(caption_clean="tbps", caption_max_words=77))}), " ... ")
