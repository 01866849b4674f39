"""The mag240m source on a tiny directory laid out like the OGB-LSC release (no network)."""
from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
import torch

from bgrl_dgl.cli import main
from bgrl_dgl.errors import InputError
from bgrl_dgl.sources.mag240m import (
    BLOCK_CHUNK_SHARES,
    LocalMAG240MDataset,
    paper_features,
    typed_feature_chunks,
)
from bgrl_dgl.store.reader import GraphStore

from helpers import assert_input_error
from ogb_fixtures import MAG_RELATIONS, TinyMag, mag240m_dataset, undirected_csc


@pytest.fixture(autouse=True)
def no_prompt(monkeypatch):
    """ogb asks on stdin in some states; the source must never let it get there."""
    def refuse(*args):
        raise AssertionError("input() was called")
    monkeypatch.setattr(builtins, "input", refuse)


def prepare(mag: TinyMag, out, *flags: str) -> GraphStore:
    assert main(["prepare", "mag240m", "--root", str(mag.directory.parent), "--out", str(out),
                 *flags]) == 0
    return GraphStore.open(out)


def expected_features(mag: TinyMag) -> np.ndarray:
    """[P + A + I, F] float32: papers, author means of papers, institution means of authors."""
    papers = mag.paper_features.astype(np.float32)
    authors = np.zeros((mag.num_authors, papers.shape[1]), np.float32)
    for author in range(mag.num_authors):
        written = mag.writes[1][mag.writes[0] == author]
        if len(written):
            authors[author] = papers[written].mean(axis=0)
    institutions = np.zeros((mag.num_institutions, papers.shape[1]), np.float32)
    for institution in range(mag.num_institutions):
        members = mag.affiliations[0][mag.affiliations[1] == institution]
        if len(members):
            institutions[institution] = authors[members].mean(axis=0)
    return np.concatenate([papers, authors, institutions])


def assert_split_test_halves(store: GraphStore, mag: TinyMag) -> None:
    """ogb's split_test: test positions i % 5 < 3 are test-dev, the rest test-challenge."""
    test = mag.splits["test"]
    dev = np.arange(len(test)) % 5 < 3
    assert sorted(store.split_names) == ["test-challenge", "test-dev", "train", "valid"]
    assert np.array_equal(store.split("test-dev"), test[dev])
    assert np.array_equal(store.split("test-challenge"), test[~dev])
    for name in ("train", "valid"):
        assert np.array_equal(store.split(name), mag.splits[name])


def test_paper_citation_graph_round_trip(tmp_path):
    mag = mag240m_dataset(tmp_path / "mag")
    store = prepare(mag, tmp_path / "out")
    assert store.num_nodes == mag.num_papers and store.num_classes == mag.num_classes
    assert store.node_types == {"paper": (0, mag.num_papers)}
    indptr, indices = undirected_csc(mag.num_papers, mag.cites[0], mag.cites[1])
    assert np.array_equal(np.asarray(store.indptr, dtype=np.int64), indptr)
    assert np.array_equal(np.asarray(store.indices, dtype=np.int64), indices)
    assert store.feat_dtype == np.float16
    assert np.array_equal(np.asarray(store.features), mag.paper_features)
    expected_labels = np.where(np.isnan(mag.paper_labels), -1, mag.paper_labels)
    assert np.array_equal(np.asarray(store.labels), expected_labels.astype(np.int64))
    assert_split_test_halves(store, mag)


def test_with_authors_builds_one_typed_graph(tmp_path):
    mag = mag240m_dataset(tmp_path / "mag")
    store = prepare(mag, tmp_path / "out", "--with-authors")
    papers, authors = mag.num_papers, mag.num_authors
    total = papers + authors + mag.num_institutions
    assert store.num_nodes == total
    assert store.node_types == {"paper": (0, papers), "author": (papers, papers + authors),
                                "institution": (papers + authors, total)}
    src = np.concatenate([mag.cites[0], mag.writes[0] + papers,
                          mag.affiliations[0] + papers])
    dst = np.concatenate([mag.cites[1], mag.writes[1],
                          mag.affiliations[1] + papers + authors])
    indptr, indices = undirected_csc(total, src, dst)
    assert np.array_equal(np.asarray(store.indptr, dtype=np.int64), indptr)
    assert np.array_equal(np.asarray(store.indices, dtype=np.int64), indices)
    features = np.asarray(store.features).astype(np.float32)
    np.testing.assert_allclose(features, expected_features(mag), rtol=2e-3, atol=2e-3)
    assert not features[papers + authors - 1].any()      # the paperless author
    assert not features[papers + authors].any()          # the institution with no authors
    labels = np.asarray(store.labels)
    assert (labels[papers:] == -1).all() and (labels[:papers // 2] >= 0).all()
    assert_split_test_halves(store, mag)


class SmallChunks:
    """Stands in for a writer with a tiny memory budget: at most ``rows`` rows per chunk."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def rows_per_chunk(self, row_bytes: int) -> int:
        return self.rows


@pytest.mark.parametrize("sorted_writes", [True, False])
def test_author_means_accumulate_block_by_block(tmp_path, sorted_writes):
    mag = mag240m_dataset(tmp_path, sorted_writes=sorted_writes, seed=3)
    dataset = LocalMAG240MDataset(tmp_path, with_authors=True)
    chunks = list(typed_feature_chunks(dataset, paper_features(dataset), SmallChunks(1)))
    author_blocks = math.ceil(mag.num_authors / BLOCK_CHUNK_SHARES)
    assert author_blocks > 1
    assert len(chunks) == mag.num_papers + author_blocks + 1
    assert all(chunk.dtype == np.float16 for chunk in chunks)
    np.testing.assert_allclose(np.concatenate(chunks).astype(np.float32),
                               expected_features(mag), rtol=2e-3, atol=2e-3)


def test_release_with_test_dev_and_challenge_splits(tmp_path):
    mag = mag240m_dataset(tmp_path, whole_test_layout=True)
    splits = LocalMAG240MDataset(tmp_path, with_authors=False).get_idx_split()
    assert set(splits) == {"train", "valid", "test-whole", "test-dev", "test-challenge"}
    assert np.array_equal(splits["test-dev"], mag.splits["test"][:6])
    assert np.array_equal(splits["test-challenge"], mag.splits["test"][6:])


def test_missing_meta_fails_without_prompting(cli, tmp_path):
    mag = mag240m_dataset(tmp_path / "mag")
    (mag.directory / "meta.pt").unlink()
    result = cli("prepare", "mag240m", "--root", tmp_path / "mag", "--out", tmp_path / "out",
                 timeout=120)
    assert_input_error(result, str(mag.directory / "meta.pt"), "not found", "MAG240MDataset")
    assert "y/N" not in result.stdout + result.stderr
    assert not list(tmp_path.glob("out*"))   # no store, no temp directory left


@pytest.mark.parametrize("missing", ["RELEASE_v1.txt",
                                     "processed/author___writes___paper/edge_index.npy"])
def test_missing_files_are_named(tmp_path, capsys, missing):
    mag = mag240m_dataset(tmp_path / "mag")
    (mag.directory / missing).unlink()
    assert main(["prepare", "mag240m", "--root", str(tmp_path / "mag"), "--with-authors",
                 "--out", str(tmp_path / "out")]) == 2
    assert f"{mag.directory / missing}: not found" in capsys.readouterr().err


@pytest.mark.parametrize("relation", ["cites", "writes"])
def test_edge_ids_out_of_range_name_the_file(tmp_path, capsys, relation):
    mag = mag240m_dataset(tmp_path / "mag")
    edges = getattr(mag, relation).copy()
    edges[1, 4] = mag.num_papers          # a paper id one past the end
    path = mag.edge_file(MAG_RELATIONS[relation])
    np.save(path, edges)
    assert main(["prepare", "mag240m", "--root", str(tmp_path / "mag"), "--with-authors",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: paper id {mag.num_papers} out of range [0, {mag.num_papers})" in err
    assert not list(tmp_path.glob("out*"))   # no store, no temp directory left


def test_meta_must_hold_counts(tmp_path):
    mag = mag240m_dataset(tmp_path)
    torch.save({"paper": mag.num_papers, "author": "many"}, mag.directory / "meta.pt")
    with pytest.raises(InputError, match="meta.pt: expected a dict with keys"):
        LocalMAG240MDataset(tmp_path, with_authors=False)
