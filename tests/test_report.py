"""The run report: a shard set, captions and metrics made in the test -> HTML + PNG, read back."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cli
from infer.report import ReportConfig, build_report, loss_points, run
from pipeline.config import ConfigError
from pipeline.shards import ShardWriter, shard_name

# one solid colour per clip, so the contact sheet can be checked pixel by pixel
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
REFERENCES = ["a red square moves left", "a green circle moves up", "a blue triangle moves right"]
REFERENCES += ["a yellow square moves down", "a cyan circle moves left"]


@pytest.fixture
def inputs(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):  # clips 0-2 in the first shard, 3-4 in the second
        w = ShardWriter(shards / shard_name(s, "webdataset"), "webdataset")
        for i in range(3 * s, min(3 * s + 3, 5)):
            frames = np.empty((8, 16, 16, 3), dtype=np.uint8)
            frames[:] = COLOURS[i]
            w.write(
                {"key": f"{i:09d}", "caption": REFERENCES[i], "meta": {"videoid": f"v{i}"}, "frames": frames}
            )
        w.commit()
    preds = [
        REFERENCES[0],
        "a red circle moves up",
        REFERENCES[2],
        "a <b>bold</b> & wrong caption",
        REFERENCES[4],
    ]
    captions = tmp_path / "captions.jsonl"
    rows = [{"key": f"{i:09d}", "caption": p} for i, p in enumerate(preds)] + [
        {"key": "elsewhere", "caption": "x"}
    ]
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"key": "half-writ')
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    losses = [{"step": s, "loss": 5.0 / s} for s in range(1, 21)] + [{"step": 20, "loss": 0.2}]  # resumed
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in losses))
    tables = {"held-out accuracy": {"captions": {"colour": 0.98, "shape": 0.8}, "shuffled": {"colour": 0.2}}}
    (tmp_path / "acc.json").write_text(json.dumps(tables))
    (tmp_path / "more.json").write_text(json.dumps({"stage 2": {"What colour?": {"held-out": 0.875}}}))
    return {
        "shards": shards,
        "captions": captions,
        "run": run_dir,
        "accuracy": tmp_path / "acc.json",
        "more": tmp_path / "more.json",
    }


def _images(page: str) -> list[Image.Image]:
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(u))) for u in uris]


def test_report_html_and_png_hold_every_clip_table_and_the_loss_curve(inputs):
    from mlflow.tracking import MlflowClient

    cfg = ReportConfig(
        run=str(inputs["run"]),
        shards=str(inputs["shards"]),
        captions=str(inputs["captions"]),
        accuracy=[str(inputs["accuracy"]), str(inputs["more"])],
        frames_per_clip=4,
    )
    paths = run(cfg)
    page = Path(paths["html"]).read_text()
    assert paths["clips"] == "5" and page.count('<tr class="clip">') == 5
    assert 'src="http' not in page and "<link" not in page  # self-contained
    images = _images(page)
    assert len(images) == 6  # the loss curve + one strip per clip
    strips = images[1:]
    for colour, strip in zip(COLOURS, strips, strict=True):
        assert strip.size == (4 * 96, 96)  # 4 frames of 16 px scaled to 96 px
        assert set(strip.getdata()) == {colour}
    assert "3/5 generated captions equal the reference" in page
    assert page.count("&#10003;") == 3 and page.count("&#10007;") == 2
    assert "a &lt;b&gt;bold&lt;/b&gt; &amp; wrong caption" in page and "<b>bold" not in page
    assert "98.0 %" in page and "80.0 %" in page and "20.0 %" in page and "shuffled" in page
    assert "<h2>stage 2</h2>" in page and "87.5 %" in page  # the second tables file

    text = paths["text"].splitlines()
    assert text[0] == "held-out accuracy:" and "98.0 %" in text[2] and "87.5 %" in text[6]
    assert "training loss: 5.000 at step 1 -> 0.200 at step 20" in text
    assert "clips: 3/5 generated captions equal the reference; the first 4:" in text
    assert text[-1].strip() == "generated 'a <b>bold</b> & wrong caption'  (differs)"

    png = np.asarray(Image.open(paths["png"]).convert("RGB"))
    for colour in COLOURS:
        assert np.all(png == colour, axis=-1).sum() >= 4 * 96 * 96  # each clip's strip is on the sheet

    client = MlflowClient(f"sqlite:///{inputs['run'] / 'mlflow.db'}")
    names = {a.path for a in client.list_artifacts(paths["mlflow_run_id"], "report")}
    assert names == {"report/report.html", "report/report.png"}
    assert client.get_run(paths["mlflow_run_id"]).info.status == "FINISHED"


def test_loss_curve_takes_the_last_line_of_each_step(inputs):
    points = loss_points(inputs["run"] / "metrics.jsonl")
    assert [s for s, _ in points] == list(range(1, 21))
    assert points[0] == (1, 5.0) and points[-1] == (20, 0.2)


def test_max_clips_and_missing_inputs(inputs, tmp_path):
    out = build_report(tmp_path / "r", inputs["shards"], inputs["captions"], max_clips=2)
    assert out["clips"] == "2" and Path(out["html"]).read_text().count('<tr class="clip">') == 2
    with pytest.raises(ConfigError, match="does not exist"):
        build_report(tmp_path / "r", inputs["shards"], tmp_path / "none.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"key": "nothing", "caption": "x"}\n')
    with pytest.raises(ConfigError, match="no clip"):
        build_report(tmp_path / "r", inputs["shards"], empty)


def test_cli_report_prints_both_paths(inputs):
    args = ["report", str(inputs["run"]), str(inputs["shards"]), "--captions", str(inputs["captions"])]
    result = CliRunner().invoke(cli.main, [*args, "--no-track"])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output and "report.png" in result.output and "(5 clips)" in result.output
    assert "clips: 3/5 generated captions equal the reference" in result.output
    assert not (inputs["run"] / "mlflow.db").exists()
    bad = CliRunner().invoke(cli.main, [*args[:3], "--captions", "nope.jsonl"])
    assert bad.exit_code == 1 and "captions: 'nope.jsonl' does not exist" in bad.output


def test_png_keeps_wide_tables_readable():
    """A 7-column table (the ablations) is too wide to share the top row with the loss curve: the curve
    goes under the tables instead of being pasted over their last columns, and long headers widen the
    columns instead of overprinting each other."""
    from PIL import ImageDraw, ImageFont

    from infer.report import Report, loss_curve_png, render_png

    losses = [(s, 5.0 / s) for s in range(1, 21)]
    narrow = {"held-out": {"all clips": {"colour": 1.0, "shape": 0.9}}}
    wide = {"ablations": {"frames reversed": {f"long column name {k}": 0.5 + k / 100 for k in range(7)}}}
    curve = Image.open(io.BytesIO(loss_curve_png(losses)))
    small = render_png(Report("t", [], narrow, losses))
    big = render_png(Report("t", [], wide, losses))
    assert small.height == curve.height + 10  # beside the two-column table, as before
    assert big.height >= 20 * 3 + 20 + curve.height  # under the three text lines
    font = ImageFont.load_default(size=14)
    header = ImageDraw.Draw(big).textlength("long column name 6", font=font)
    assert big.width >= 200 + 7 * (header + 14)  # every column as wide as its header
    top = np.asarray(big.convert("L"))[: 20 * 3 + 20, big.width - curve.width :]
    assert (top < 128).any()  # the last columns' text is there, not covered by the curve


@pytest.mark.parametrize(
    "name, content, flag, says",
    [
        ("empty.json", {"held-out accuracy": {}}, "--accuracy", "table 'held-out accuracy' of"),
        ("null.json", {"t": {"r": {"colour": None}}}, "--accuracy", "column 'colour' is null, not a number"),
        ("list.jsonl", '{"key": "000000000", "caption": "a"}\n["000000001", "b"]\n', "--captions", "line 2"),
        ("latin1.jsonl", '{"key": "000000000", "caption": "caf\xe9"}\n', "--captions", "is not UTF-8 text"),
        ("latin1.json", '{"t": {"caf\xe9": {"c": 0.5}}}', "--accuracy", "is not UTF-8 text (byte 11)"),
    ],
)
def test_report_refuses_bad_inputs_in_one_line_before_writing(inputs, tmp_path, name, content, flag, says):
    """Each used to end in a traceback, some after report.html was written."""
    path = tmp_path / name
    if isinstance(content, dict):
        path.write_text(json.dumps(content))
    else:
        path.write_bytes(content.encode("latin-1"))
    args = ["report", str(inputs["run"]), str(inputs["shards"]), "--captions", str(inputs["captions"])]
    r = CliRunner().invoke(cli.main, [*args, flag, str(path), "--no-track"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert says in r.output and str(path) in r.output
    assert not (inputs["run"] / "report").exists()


def test_report_refuses_a_metrics_file_it_cannot_read(inputs):
    metrics = inputs["run"] / "metrics.jsonl"
    for text, says in (('{"step": 1, "loss": null}\n', "not a number"), ("[1, 2]\n", "JSON list")):
        metrics.write_text(text)
        args = ["report", str(inputs["run"]), str(inputs["shards"]), "--captions", str(inputs["captions"])]
        r = CliRunner().invoke(cli.main, [*args, "--no-track"])
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and says in r.output, r.output
        assert not (inputs["run"] / "report").exists()
