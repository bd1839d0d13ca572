"""The SA-1B JSON Schema accepts every real sample and rejects malformed records; the
writer re-serialises real records byte-identically."""

from __future__ import annotations

import copy
import json

import pytest

from pipeline.sa1b_writer import write_image_json
from schemas import SA1BSchemaError, sa1b_image_schema, validate_sa1b_image
from tests.sa1b_samples import real_records, sa1b_path


def test_schema_file_is_valid_draft_2020_12():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(sa1b_image_schema())


def test_every_real_sample_validates():
    recs = real_records()
    assert len(recs) == 4
    for rec in recs:
        validate_sa1b_image(rec)
    anns = [a for r in recs for a in r["annotations"]]
    # the quirks the schema must allow
    assert any(a["predicted_iou"] > 1 for a in anns)
    assert any(isinstance(a["bbox"][0], int) for a in anns)
    assert any(isinstance(a["bbox"][0], float) for a in anns)
    assert any(a["id"] > 2**31 - 1 for a in anns) or max(a["id"] for a in anns) > 2**29


def _first_real() -> dict:
    return copy.deepcopy(real_records()[0])


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda r: r.pop("annotations"), "annotations"),
        (lambda r: r["image"].pop("width"), "width"),
        (lambda r: r["image"].__setitem__("image_id", "226381"), "image_id"),
        (lambda r: r["image"].__setitem__("file_name", "../x.jpg"), "file_name"),
        (lambda r: r["annotations"][0].__setitem__("area", 12.5), "area"),
        (lambda r: r["annotations"][0].__setitem__("bbox", [1, 2, 3]), "bbox"),
        (lambda r: r["annotations"][0].__setitem__("bbox", [1, 2, -3, 4]), "bbox"),
        (lambda r: r["annotations"][0]["segmentation"].__setitem__("counts", "ab~"), "counts"),
        (lambda r: r["annotations"][0]["segmentation"].__setitem__("size", [1500]), "size"),
        (lambda r: r["annotations"][0].pop("stability_score"), "stability_score"),
        (lambda r: r["annotations"][0].__setitem__("point_coords", [[1.0]]), "point_coords"),
        (lambda r: r["annotations"][0].__setitem__("id", True), "id"),
        (lambda r: r["annotations"][0].__setitem__("predicted_iou", "0.9"), "predicted_iou"),
    ],
)
def test_malformed_records_are_rejected_with_a_path(mutate, where):
    rec = _first_real()
    mutate(rec)
    with pytest.raises(SA1BSchemaError) as e:
        validate_sa1b_image(rec)
    assert where in str(e.value) or any(where in m for m in e.value.messages)


def test_semantic_checks_size_and_duplicate_ids():
    rec = _first_real()
    rec["annotations"][0]["segmentation"]["size"] = [2000, 1500]
    rec["annotations"][2]["id"] = rec["annotations"][1]["id"]
    with pytest.raises(SA1BSchemaError) as e:
        validate_sa1b_image(rec)
    text = " ".join(e.value.messages)
    assert "[height, width]" in text and "duplicate id" in text


def _sa1b_bytes(rec: dict) -> bytes:
    """Independent expectation: SA-1B files are Python json.dumps with default separators."""
    return json.dumps(rec).encode()


def test_real_records_reserialise_byte_identically():
    for rec in real_records():
        out = write_image_json(rec)
        assert out == _sa1b_bytes(rec)
        assert json.loads(out) == rec
        # int boxes stay ints and float boxes floats, scores keep every digit
        assert write_image_json(json.loads(out)) == out


def test_excerpt_layout_roundtrips_byte_identically():
    """The excerpt's own layout (indent 2, lists of numbers inline) re-serialised from the
    parsed record gives back the file's exact bytes: no number changes type or digits."""
    raw = sa1b_path("sa_226381.excerpt.json").read_text()
    rec = json.loads(raw)
    assert _excerpt_layout(json.loads(write_image_json(rec))) == raw.rstrip("\n")


def _excerpt_layout(obj, ind: int = 0) -> str:
    pad, sub = " " * ind, " " * (ind + 2)
    if isinstance(obj, dict):
        items = [f"{sub}{json.dumps(k)}: {_excerpt_layout(v, ind + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and any(isinstance(x, dict) for x in obj):
        return "[\n" + ",\n".join(sub + _excerpt_layout(x, ind + 2) for x in obj) + f"\n{pad}]"
    return json.dumps(obj)


def test_writer_orders_keys_and_converts_numpy():
    import numpy as np

    rec = _first_real()
    a = rec["annotations"][0]
    scrambled = {
        "annotations": [
            {
                "id": np.int64(a["id"]),
                "stability_score": np.float32(a["stability_score"]),
                "crop_box": np.array(a["crop_box"]),
                "point_coords": [np.array(a["point_coords"][0])],
                "predicted_iou": np.float32(a["predicted_iou"]),
                "segmentation": {
                    "counts": a["segmentation"]["counts"].encode(),
                    "size": [1500, 2000],
                },
                "area": np.int64(a["area"]),
                "bbox": [float(v) for v in a["bbox"]],
            }
        ],
        "image": dict(reversed(list(rec["image"].items()))),
    }
    want = {"image": rec["image"], "annotations": [a]}
    assert write_image_json(scrambled) == _sa1b_bytes(want)


def test_semantic_check_file_name_matches_image_id():
    from schemas import semantic_errors

    for rec in real_records():  # every real record names its file sa_<image_id>.jpg
        assert semantic_errors(rec) == []
    rec = _first_real()
    rec["image"]["file_name"] = "sa_1.jpg"
    with pytest.raises(SA1BSchemaError) as e:
        validate_sa1b_image(rec)
    assert "file_name" in e.value.messages[0] and "226381" in e.value.messages[0]
    rec["image"]["file_name"] = "photo.png"  # the schema allows other images' names
    assert any("file_name" in m for m in semantic_errors(rec))
    validate_sa1b_image(rec, sa1b_file_name=False)
