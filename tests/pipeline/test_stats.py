"""`sa1b-decode stats`: distributions of an index against pandas on the same parts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.stats import BINS, index_stats


@pytest.fixture
def index_dir(tmp_path):
    """Three indexed shards with 3, 6 and 9 masks per image, one of them damaged."""
    from pipeline.synthetic import write_synthetic_shard

    shards = []
    for s, masks in enumerate((3, 6, 9)):
        p = tmp_path / "in" / f"sa_00000{s}.tar"
        write_synthetic_shard(str(p), 5, first_id=1 + 10 * s, seed=s, h=60, w=80, masks=masks)
        shards.append(p)
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[: len(data) * 2 // 3])  # readable in part
    out = tmp_path / "idx"
    assert main(["index", *map(str, shards), "--out", str(out), "--workers", "1"]) == 1
    return out


def _oracle(root):
    images = pd.read_parquet(root / "images")
    anns = pd.read_parquet(root / "annotations").merge(images, on="image_id")
    size = np.sqrt(anns.area / (anns.width * anns.height))
    return images, anns, size


def test_stats_match_pandas_on_the_same_parts(index_dir):
    st = index_stats(str(index_dir))
    images, anns, size = _oracle(index_dir)
    assert (st.shards, st.images, st.annotations) == (3, len(images), len(anns))
    assert st.damaged_shards == ["sa_000002"]
    counts = images.num_annotations.value_counts()
    assert {k: int(v) for k, v in enumerate(st.masks_per_image) if v} == counts.to_dict()
    d = st.as_dict()
    assert d["masks_per_image"]["mean"] == pytest.approx(images.num_annotations.mean())
    assert d["masks_per_image"]["max"] == images.num_annotations.max()
    assert d["masks_per_image"]["median"] == int(np.quantile(images.num_annotations, 0.5, method="inverted_cdf"))
    for key, values, width in (
        ("relative_size", size, 1.0 / BINS),
        ("predicted_iou", anns.predicted_iou, 1.2 / BINS),
        ("stability_score", anns.stability_score, 1.0 / BINS),
    ):
        assert d[key]["mean"] == pytest.approx(values.mean())
        for q, name in ((0.05, "p05"), (0.5, "median"), (0.95, "p95")):
            exact = float(np.quantile(values, q, method="inverted_cdf"))
            assert exact <= d[key][name] + 1e-12 <= exact + width + 1e-9, (key, name)
    assert d["relative_size"]["share_below_0.1"] == pytest.approx((size < 0.1).mean())


def test_stats_of_a_generation_output_count_committed_shards_only(index_dir, tmp_path):
    """In a generation output, parts of a shard without a commit marker (a killed attempt)
    are left out."""
    import shutil

    out = tmp_path / "gen"
    shutil.copytree(index_dir / "images", out / "index" / "images")
    shutil.copytree(index_dir / "annotations", out / "index" / "annotations")
    (out / "_run").mkdir()
    (out / "_run" / "manifest.json").write_text(json.dumps({"version": 1, "run_id": "x"}))
    (out / "_commits").mkdir()
    (out / "_commits" / "sa_000001.json").write_text('{"run_id": "x"}')
    st = index_stats(str(out))
    images = pd.read_parquet(index_dir / "images" / "sa_000001.parquet")
    assert (st.layout, st.shards, st.images) == ("generation output", 1, len(images))
    assert st.annotations == int(images.num_annotations.sum()) == 30
    assert st.damaged_shards == []
    # another run's marker (its _run folder removed since) is not this run's result; a
    # re-annotated input shard found damaged is listed
    (out / "_commits" / "sa_000000.json").write_text('{"run_id": "y"}')
    (out / "_commits" / "sa_000002.json").write_text('{"run_id": "x", "input_error": "truncated"}')
    st = index_stats(str(out))
    more = pd.read_parquet(index_dir / "images" / "sa_000002.parquet")
    assert (st.shards, st.images) == (2, len(images) + len(more))
    assert st.damaged_shards == ["sa_000002"]


def test_stats_cli_prints_writes_a_picture_and_refuses_a_non_index(index_dir, tmp_path, capsys, caplog):
    from PIL import Image

    png = tmp_path / "stats.png"
    assert main(["stats", str(index_dir), "--picture", str(png)]) == 1  # a damaged shard
    out = capsys.readouterr().out
    assert "3 shards" in out and "masks per image:" in out and "damaged shards" in out
    im = np.asarray(Image.open(png).convert("L"))
    assert im.shape == (750, 1100) and im.std() > 10  # four panels drawn, not blank
    assert main(["stats", str(index_dir), "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["images"] == len(pd.read_parquet(index_dir / "images"))
    assert main(["stats", str(tmp_path / "in")]) == 2
    assert "not an index" in caplog.text and "sa1b-decode index" in caplog.text


def test_a_picture_without_matplotlib_is_refused_before_the_index_is_read(
    index_dir, tmp_path, monkeypatch, caplog
):
    import pipeline.stats

    def no_matplotlib():
        raise ImportError("the picture needs matplotlib: pip install 'sa1b-engine[plot]'")

    def must_not_read(*a, **k):
        raise AssertionError("the index was read")

    monkeypatch.setattr(pipeline.stats, "pyplot", no_matplotlib)
    monkeypatch.setattr(pipeline.stats, "index_stats", must_not_read)
    assert main(["stats", str(index_dir), "--picture", str(tmp_path / "p.png")]) == 2
    assert "sa1b-engine[plot]" in caplog.text and not (tmp_path / "p.png").exists()


def test_pictures_of_an_empty_index_and_of_values_over_the_whole_range(tmp_path):
    from PIL import Image

    from pipeline.stats import _RANGES, IndexStats, _Hist, draw_stats

    empty = IndexStats("out", "generation output", 0, 0, 0, np.zeros(1, np.int64),
                       {k: _Hist(*r) for k, (_, r) in _RANGES.items()})  # fmt: skip
    assert empty.as_dict()["masks_per_image"]["mean"] is None
    draw_stats(empty, str(tmp_path / "empty.png"))
    full = IndexStats("out", "generation output", 1, 3, 3003, np.array([0, 0, 1, 2]),
                      {k: _Hist(*r) for k, (_, r) in _RANGES.items()})  # fmt: skip
    for h in full.hists.values():
        h.add(np.linspace(h.lo - 1, h.hi + 1, 3003))  # every bin, and clipped ends
        assert h.counts.sum() == 3003 and h.counts[0] > h.counts[1]
    draw_stats(full, str(tmp_path / "full.png"))
    for name in ("empty.png", "full.png"):
        assert Image.open(tmp_path / name).size == (1100, 750)


def test_stats_of_an_index_on_s3(index_dir, s3_bucket):
    bucket, fs = s3_bucket
    fs.put(str(index_dir), f"{bucket}/idx", recursive=True)
    st = index_stats(f"s3://{bucket}/idx")
    local = index_stats(str(index_dir))
    assert (st.shards, st.images, st.annotations) == (local.shards, local.images, local.annotations)
    assert st.as_dict()["relative_size"] == local.as_dict()["relative_size"]


def test_a_missing_or_damaged_part_is_named(index_dir, caplog):
    part = index_dir / "annotations" / "sa_000001.parquet"
    part.write_bytes(part.read_bytes()[:100])
    assert main(["stats", str(index_dir)]) == 1
    assert "annotations/sa_000001.parquet: not a readable Parquet file" in caplog.text
    part.unlink()
    assert main(["stats", str(index_dir)]) == 1
    assert "annotations/sa_000001.parquet: missing" in caplog.text
