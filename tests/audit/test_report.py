"""The report as typed data: its JSON, its JSON Schema, reading it back, old files."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

import advx
from advx.audit import Finding, Report
from advx.audit._codec import encode, png_decode, png_encode
from advx.audit.report import (
    EpsCurve,
    Example,
    Gate,
    Provenance,
    Stage,
    image_uri,
    json_schema,
)
from advx.errors import InputError

from .test_audit import Quantized

EPS = 0.1
OLD = Path(__file__).parent / "data" / "report-v1-untyped.json"  # written by advx before typing
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def report(trained_mlp, mnist_test):
    x, y = mnist_test
    suite = [advx.FGSM(advx.Linf(EPS)), {"name": "pgd", "steps": 5, "closest": 0.5}]
    meta = {"model": "mlp", "data": "mnist-demo[:40]", "weights": "w.pt", "note": "kept"}
    return advx.audit(
        trained_mlp, x[:40], y[:40], advx.Linf(EPS), suite=suite, eps_curve=[0.05], meta=meta
    )


@pytest.fixture(scope="module")
def masked(trained_mlp, mnist_test):
    x, y = mnist_test
    suite = [advx.PGD(advx.Linf(0.3), steps=5)]
    return advx.audit(Quantized(trained_mlp), x[:30], y[:30], advx.Linf(0.3), suite=suite)


def test_the_report_is_typed_all_the_way_down(report, masked):
    assert isinstance(report.cascade[0], Stage) and report.cascade[0].gate is None
    assert isinstance(report.cascade[1].gate, Gate) and report.cascade[1].gate.closest == 0.5
    assert isinstance(report.eps_curve, EpsCurve) and report.eps_curve.eps == [0.05]
    assert masked.findings and all(isinstance(f, Finding) for f in masked.findings)
    assert "masked-gradients" in {f.code for f in masked.findings} and not masked.reliable
    assert masked.to_dict()["findings"] == [dataclasses.asdict(f) for f in masked.findings]


def test_meta_names_the_model_and_the_rest_goes_to_provenance(report):
    assert (report.model.name_given, report.model.weights) == ("mlp", "w.pt")
    assert report.data.name == "mnist-demo[:40]"
    assert isinstance(report.provenance, Provenance) and report.provenance.extra == {"note": "kept"}
    doc = report.to_dict()
    assert doc["provenance"]["note"] == "kept" and "extra" not in doc["provenance"]
    assert ("note", "kept") in report.provenance.rows()


def test_load_gives_back_what_save_wrote(report, masked, tmp_path):
    for r in (report, masked):
        path = r.save(tmp_path / "r.json")
        back = Report.load(path)
        assert back == r and back.to_dict() == r.to_dict()
        assert json.loads(path.read_text()) == r.to_dict()
    assert all(
        isinstance(f, Finding) for f in Report.load(masked.save(tmp_path / "m.json")).findings
    )


def _contains(old, new, where="report"):
    """Every value of ``old`` is in ``new``, at the same place (``new`` may have more fields)."""
    if isinstance(old, dict):
        for k, v in old.items():
            assert k in new, f"{where}.{k} is gone"
            _contains(v, new[k], f"{where}.{k}")
    elif isinstance(old, list):
        assert len(old) == len(new), where
        for i, (a, b) in enumerate(zip(old, new)):
            _contains(a, b, f"{where}[{i}]")
    else:
        assert old == new and type(old) is type(new), f"{where}: {old!r} != {new!r}"


def test_a_report_written_before_the_typed_report_still_loads():
    old = json.loads(OLD.read_text())
    assert old["schema"] == "advx-report/1"
    r = Report.load(OLD)
    doc = r.to_dict()
    assert doc["schema"] == "advx-report/2"  # read as the current version, written as it
    # nothing lost, nothing changed, but the images: nested lists then, PNGs now, same pixels
    rest = ("schema", "examples")
    _contains({k: v for k, v in old.items() if k not in rest}, doc)
    assert len(r.examples) == len(old["examples"]) == 1
    for e, was in zip(r.examples, old["examples"]):
        _contains({k: v for k, v in was.items() if k not in ("clean", "adversarial")}, encode(e))
        clean, adv = e.pixels()
        assert clean.dtype == torch.uint8 and clean.tolist() == was["clean"]
        assert adv.tolist() == was["adversarial"]
    assert "gate" not in old["cascade"][0] and r.cascade[0].gate is None  # new fields: defaults
    assert r.cascade[1].gate == Gate(**old["cascade"][1]["gate"])
    assert r.eps_curve is not None and r.eps_curve.check is True
    assert r.model.weights == "mlp.pt" and r.robust_accuracy == old["robust_accuracy"]


def test_an_old_example_of_inputs_that_are_not_images_is_left_out(tmp_path):
    old = json.loads(OLD.read_text())
    ex = old["examples"][0]
    row = {**ex, "clean": [0, 12, 255], "adversarial": [3, 12, 250]}  # a row of features
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**old, "examples": [row, ex]}))
    r = Report.load(path)
    assert [e.index for e in r.examples] == [ex["index"]]
    assert r.examples[0].pixels()[0].tolist() == ex["clean"]


def test_what_is_not_a_report_is_refused_with_a_message_that_says_what(tmp_path):
    old = json.loads(OLD.read_text())
    cases = [
        ({**old, "schema": "advx-report/0"}, r"not an advx-report/2 document.*reads .*/1"),
        (
            {**old, "examples": [{**old["examples"][0], "clean": [[[256]]]}]},
            r"examples\[0\]\.clean: expected 8-bit pixel values",
        ),
        (
            {**old, "examples": [{**old["examples"][0], "adversarial": [[1, 2], [3]]}]},
            r"examples\[0\]\.adversarial: expected 8-bit",
        ),
        (
            {**old, "examples": [{**old["examples"][0], "clean": []}]},
            r"examples\[0\]\.clean: expected 8-bit",
        ),
        ({**old, "robustness": 1.0}, r"unknown field\(s\) 'robustness'.*newer advx"),
        ({k: v for k, v in old.items() if k != "samples"}, "required field 'samples' is missing"),
        ({**old, "cascade": {}}, r"\.cascade: expected a list"),
        ({**old, "cascade": [{**old["cascade"][0], "brok": 1}]}, r"\.cascade\[0\]: unknown"),
    ]
    for doc, message in cases:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(InputError, match=message):
            Report.load(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="cannot read .* as JSON"):
        Report.load(path)


# ---- the published schema ------------------------------------------------------------------
def _resolve(schema: dict, node: dict) -> dict:
    """Follow $ref, and oneOf [X, null], to the object schema of a field."""
    for option in node.get("oneOf", []):
        if option.get("type") != "null":
            return _resolve(schema, option)
    if "$ref" in node:
        return _resolve(schema, schema["$defs"][node["$ref"].rsplit("/", 1)[1]])
    if node.get("type") == "array" and "items" in node:
        return _resolve(schema, node["items"])
    return node


def _dataclass_of(tp):
    """The dataclass inside X, X | None or list[X], if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        found = _dataclass_of(arg)
        if found is not None:
            return found
    return None


def test_the_schema_names_every_field_the_dataclasses_write_and_no_other():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    seen = []

    def walk(cls, node, where):
        seen.append(cls.__name__)
        hints = typing.get_type_hints(cls)
        keys = {
            f.metadata.get("json", f.name): f
            for f in dataclasses.fields(cls)
            if not f.metadata.get("rest") and not f.metadata.get("memory")
        }
        assert set(keys) == set(node["properties"]), where
        rest = any(f.metadata.get("rest") for f in dataclasses.fields(cls))
        assert node.get("additionalProperties", True) is rest, where  # closed unless a rest field
        must = {
            k
            for k, f in keys.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        assert must <= set(node["required"]) <= set(keys), where
        for key, f in keys.items():
            inner = _dataclass_of(hints[f.name])
            if inner is not None:
                walk(inner, _resolve(schema, node["properties"][key]), f"{where}.{key}")

    walk(Report, schema, "report")
    assert {"Stage", "Gate", "EpsCurve", "Finding", "Provenance", "Seconds"} <= set(seen)


def test_the_schema_refuses_what_the_code_would_not_write(report):
    validator = jsonschema.Draft202012Validator(json_schema())
    doc = report.to_dict()
    validator.validate(doc)
    broken = [
        {**doc, "robust_acuracy": 0.5},
        {**doc, "robust_accuracy": 1.5},
        {**doc, "cascade": [{**doc["cascade"][0], "broke": -1}]},
        {**doc, "findings": [{"code": "x", "severity": "fatal", "message": "", "advice": ""}]},
        {**doc, "examples": [{**doc["examples"][0], "clean": [[[255]]]}]},  # the /1 form
        {**doc, "examples": [{**doc["examples"][0], "clean": "data:image/jpeg;base64,AAAA"}]},
    ]
    for bad in broken:
        assert not validator.is_valid(bad)


def test_the_readme_documents_every_field_of_the_report():
    text = README.read_text()
    section = text[text.index("## Audit") :]
    section = section[: section.index("\n## ", 1)]
    schema = json_schema()
    names = set(schema["properties"])
    for node in schema["$defs"].values():
        names |= set(node.get("properties", {}))
    missing = sorted(n for n in names if not re.search(rf"`{re.escape(n)}(\[\])?`", section))
    assert not missing, f"the README's Audit section does not name {missing}"


# ---- example images: PNG data URIs ---------------------------------------------------------
def _photo(seed: int = 0) -> torch.Tensor:
    """A 3x224x224 uint8 image shaped like a photo: smooth shading, edges and a little noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2]) * 180 + 30
    base[:, 60:140, 80:170] += 40  # an object
    noise = torch.randint(-3, 4, (3, 224, 224), generator=g)
    return (base + noise).round().clamp(0, 255).to(torch.uint8)


def _with_examples(report: Report, clean: torch.Tensor, adv: torch.Tensor) -> Report:
    e = Example(
        index=3,
        label=1,
        adversarial_label=7,
        attack="pgd",
        distance=0.03,
        clean=image_uri(clean),
        adversarial=image_uri(adv),
    )
    return dataclasses.replace(report, examples=[e])


@pytest.mark.parametrize("channels", [1, 3])
def test_example_images_come_back_pixel_for_pixel(report, tmp_path, channels):
    g = torch.Generator().manual_seed(channels)
    clean = torch.randint(0, 256, (channels, 17, 23), generator=g, dtype=torch.uint8)
    clean[:, 0] = 0  # the extremes survive
    clean[:, 1] = 255
    adv = (clean.int() + torch.randint(-8, 9, clean.shape, generator=g)).clamp(0, 255)
    r = _with_examples(report, clean, adv.to(torch.uint8))
    back = Report.load(r.save(tmp_path / "r.json"))  # the schema validates it (conftest)
    c, a = back.examples[0].pixels()
    assert c.dtype == torch.uint8 and torch.equal(c, clean) and torch.equal(a, adv.to(torch.uint8))


def test_a_photo_sized_example_is_a_small_fraction_of_its_nested_lists(report):
    clean = _photo(0)
    noise = torch.randint(-8, 9, clean.shape, generator=torch.Generator().manual_seed(0))
    adv = (clean.int() + noise).clamp(0, 255).to(torch.uint8)
    bare = dataclasses.replace(report, examples=[])
    png = len(_with_examples(report, clean, adv).to_json()) - len(bare.to_json())
    doc = bare.to_dict()
    doc["examples"] = [{"clean": clean.tolist(), "adversarial": adv.tolist()}]
    nested = len(json.dumps(doc, indent=2)) - len(bare.to_json())  # as advx-report/1 saved it
    # measured: 0.24 MB against 5.7 MB (the adversarial noise is what PNG compresses least)
    assert png * 15 < nested, (png, nested)
    compact = len(json.dumps([clean.tolist(), adv.tolist()]))  # even without the indentation
    assert png * 4 < compact, (png, compact)


def test_the_png_is_a_standard_one():
    pil = pytest.importorskip("PIL.Image")
    import base64
    import io

    rgb = _photo(1)[:, :40, :50]
    opened = pil.open(io.BytesIO(base64.b64decode(image_uri(rgb).split(",", 1)[1])))
    assert opened.mode == "RGB" and np.array_equal(np.asarray(opened), rgb.permute(1, 2, 0))
    grey = pil.open(io.BytesIO(base64.b64decode(image_uri(rgb[:1]).split(",", 1)[1])))
    assert grey.mode == "L" and np.array_equal(np.asarray(grey), rgb[0])
    # and what another writer filters differently (Average, Paeth) reads back too
    for img in (rgb, rgb[:1]):
        a = img.permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        pil.fromarray(a if a.shape[2] == 3 else a[:, :, 0]).save(buf, "PNG", optimize=True)
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        assert np.array_equal(png_decode(uri, "x"), img.numpy())


def test_what_is_not_a_png_image_is_refused_by_name():
    good = png_encode(np.zeros((1, 2, 2), dtype=np.uint8))
    for bad, why in [
        ("data:image/jpeg;base64,AAAA", "starting"),
        ("data:image/png;base64,@@", "base64"),
        ("data:image/png;base64,AAAA", "signature"),
        (good[:-8], "truncated"),
        (good[:40] + "A" + good[41:], "corrupt"),
    ]:
        with pytest.raises(InputError, match=rf"^ex\.clean: .*({why})"):
            png_decode(bad, "ex.clean")
    with pytest.raises(ValueError, match="pixels"):
        png_encode(np.zeros((2, 4, 4), dtype=np.uint8))
