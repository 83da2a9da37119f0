"""A run report a person would rather look at than read: one self-contained HTML page and one PNG.

    python cli.py report runs/stage1 HELDOUT_SHARDS --captions captions.jsonl [--accuracy tables.json ...]

What it shows, from files the other commands already write:

* a contact sheet: for each held-out clip (up to ``max_clips``), its sampled frames from the shards
  beside the reference caption and the generated one (``caption-shards`` JSONL ``{key, caption}`` or
  ``evaluate --predictions`` JSONL ``{key, prediction}``), marked when they are equal;
* accuracy tables (``{"table name": {"row": {"column": fraction}}}``, e.g. accuracy per factor and
  its ablations), shown as percentages;
* the training loss curve from ``RUN/metrics.jsonl``.

Both files land in ``RUN/report/`` (``report.html`` with every image inlined as base64, so it can be
mailed or opened anywhere; ``report.png`` for a terminal user's image viewer) and are logged as
artifacts of the run's MLflow run. :func:`build_report` is the reusable part: shard folder + captions
+ metrics in, files out.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.config import ConfigError
from pipeline.rundir import METRICS, REPORT
from pipeline.shards import list_shards, read_shard

HTML_FILE = "report.html"
PNG_FILE = "report.png"
Tables = dict[str, dict[str, dict[str, float]]]  # table -> row -> column -> fraction


@dataclass
class ReportConfig:
    run: str = ""  # training run directory: metrics.jsonl in, report/ out, its MLflow run
    shards: str = ""  # the (held-out) shard set the captions were made from
    captions: str = ""  # JSONL with key + caption (caption-shards) or prediction (evaluate)
    accuracy: list[str] = field(
        default_factory=list
    )  # JSON files of tables {"table": {"row": {"column": x}}}
    output: str | None = None  # default: RUN/report
    title: str = "Video-LLaMA run report"
    max_clips: int = 16
    frames_per_clip: int = 8
    track: bool = True  # log the files as artifacts of the run's MLflow run
    tracking_uri: str | None = None

    def validate(self) -> None:
        if not (self.run and self.shards and self.captions):
            raise ConfigError("report: a run directory, a shard folder and a captions JSONL are required")
        if self.max_clips < 1 or self.frames_per_clip < 1:
            raise ConfigError("max_clips and frames_per_clip must be >= 1")


@dataclass
class ClipRow:
    key: str
    videoid: str
    reference: str
    prediction: str
    strip: Image.Image | None  # the sampled frames side by side (None: the shards hold features only)

    @property
    def match(self) -> bool:
        return self.prediction.strip() == self.reference.strip()


@dataclass
class Report:
    title: str
    clips: list[ClipRow]
    tables: Tables = field(default_factory=dict)
    losses: list[tuple[int, float]] = field(default_factory=list)


# ---- inputs -------------------------------------------------------------------------------------


def _text(path: str | Path, what: str) -> str:
    """The file's text, or one ConfigError line (not UTF-8, unreadable)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {str(path)!r}: {e.strerror or e}") from None


def read_jsonl(path: str | Path, what: str = "jsonl") -> list[dict[str, Any]]:
    """Every complete JSON line (a half-written last line of a killed writer is skipped); a line that
    is JSON but not an object, or a file that is not UTF-8, is one ConfigError line."""
    rows = []
    for n, line in enumerate(_text(path, what).splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            raise ConfigError(
                f"{what}: line {n} of {str(path)!r} is a JSON {type(row).__name__}, not an object {{...}}"
            )
        rows.append(row)
    return rows


def generated_captions(path: str | Path) -> dict[str, str]:
    """key -> generated caption, from caption-shards (``caption``) or evaluate (``prediction``) JSONL."""
    if not Path(path).is_file():
        raise ConfigError(f"captions: {str(path)!r} does not exist")
    out = {}
    for r in read_jsonl(path, "captions"):
        text = r.get("prediction", r.get("caption"))
        if "key" in r and isinstance(text, str):
            out[str(r["key"])] = text
    return out


def loss_points(path: str | Path) -> list[tuple[int, float]]:
    """(step, loss) from a run's metrics.jsonl; the last line of a step wins (a resumed run rewrites)."""
    if not Path(path).is_file():
        return []
    rows = [r for r in read_jsonl(path, "metrics") if "step" in r and "loss" in r]
    if bad := [r for r in rows if not all(_is_number(r[k]) for k in ("step", "loss"))]:
        raise ConfigError(f"metrics: {str(path)!r} has a step or loss that is not a number: {bad[0]}")
    return sorted({int(r["step"]): float(r["loss"]) for r in rows}.items())


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def frame_strip(frames: np.ndarray, count: int, height: int = 96) -> Image.Image:
    """``count`` evenly spaced frames of ``[T,H,W,3]`` side by side, scaled (nearest) to ``height`` px."""
    picks = np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int)
    row = np.concatenate([frames[i] for i in picks], axis=1)
    scale = height / row.shape[0]
    img = Image.fromarray(row)
    return img.resize((round(img.width * scale), height), Image.NEAREST)


def clip_rows(shards: str | Path, captions: dict[str, str], max_clips: int, frames: int) -> list[ClipRow]:
    """The first ``max_clips`` captioned clips of the shard set, in shard order."""
    if not Path(shards).is_dir():
        raise ConfigError(f"shards: folder {str(shards)!r} does not exist")
    rows: list[ClipRow] = []
    for path in list_shards(shards):
        for s in read_shard(path):
            if s["key"] not in captions:
                continue
            f = s.get("frames")
            strip = None if f is None else frame_strip(f if f.ndim == 4 else f[0], frames)
            meta = s.get("meta", {})
            rows.append(
                ClipRow(s["key"], str(meta.get("videoid", s["key"])), s["caption"], captions[s["key"]], strip)
            )
            if len(rows) == max_clips:
                return rows
    return rows


# ---- pictures -----------------------------------------------------------------------------------


def loss_curve_png(losses: list[tuple[int, float]], size: tuple[float, float] = (6.0, 2.6)) -> bytes:
    """The training loss per step as PNG bytes (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    if losses:
        ax.plot([s for s, _ in losses], [v for _, v in losses], color="#1f77b4", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _percent(v: float) -> str:
    return f"{100 * v:.1f} %"


def _columns(rows: dict[str, dict[str, float]]) -> list[str]:
    cols: list[str] = []
    for r in rows.values():
        cols += [c for c in r if c not in cols]
    return cols


# ---- HTML ---------------------------------------------------------------------------------------

_CSS = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th:first-child,td:first-child{text-align:left}
.clip td{text-align:left;vertical-align:middle}.ok{color:#1a7f37}.bad{color:#c62828}.cap{font-family:monospace}"""


def _html_table(name: str, rows: dict[str, dict[str, float]]) -> str:
    cols = _columns(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        f"<tr><td>{html.escape(r)}</td>"
        + "".join(f"<td>{_percent(v[c]) if c in v else ''}</td>" for c in cols)
        + "</tr>"
        for r, v in rows.items()
    )
    return f"<h2>{html.escape(name)}</h2><table><tr><th></th>{head}</tr>{body}</table>"


def _html_clip(c: ClipRow) -> str:
    img = "<i>features only</i>" if c.strip is None else f'<img src="{_data_uri(_png_bytes(c.strip))}">'
    mark = '<span class="ok">&#10003;</span>' if c.match else '<span class="bad">&#10007;</span>'
    return (
        f'<tr class="clip"><td>{html.escape(c.videoid)}</td><td>{img}</td>'
        f'<td class="cap">reference: {html.escape(c.reference)}<br>generated: {html.escape(c.prediction)} '
        f"{mark}</td></tr>"
    )


def render_html(report: Report) -> str:
    """One self-contained page: every image is an inline data URI."""
    matched = sum(c.match for c in report.clips)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(report.title)}</h1>",
        *(_html_table(name, rows) for name, rows in report.tables.items()),
        f'<h2>Training loss</h2><img src="{_data_uri(loss_curve_png(report.losses))}">',
        f"<h2>Held-out clips: {matched}/{len(report.clips)} generated captions equal the reference</h2>",
        '<table class="clips">',
        *(_html_clip(c) for c in report.clips),
        "</table></body></html>",
    ]
    return "\n".join(parts)


# ---- PNG ----------------------------------------------------------------------------------------


def _table_cells(tables: Tables) -> list[list[str]]:
    """Rows of cells: per table a header row (its name, then the columns), then one row per entry."""
    cells = []
    for name, rows in tables.items():
        cols = _columns(rows)
        cells.append([name, *cols])
        cells += [[f"  {r}", *(_percent(v[c]) if c in v else "" for c in cols)] for r, v in rows.items()]
    return cells


def render_png(report: Report, width: int = 1200) -> Image.Image:
    """The same content as one picture: tables and loss curve on top (the curve under the tables when
    they are too wide to share the row), then one line per clip."""
    font = ImageFont.load_default(size=14)
    curve = Image.open(io.BytesIO(loss_curve_png(report.losses)))
    lines = [[report.title], *_table_cells(report.tables)]
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # one column width for every table: its widest header or value, at least 90 px
    col_w = max([90.0] + [scratch.textlength(t, font=font) + 14 for cells in lines for t in cells[1:]])
    table_w = 200 + col_w * max(len(cells) - 1 for cells in lines) + 10
    text_h = 20 * len(lines) + 20
    beside = table_w <= width - curve.width
    top = max(curve.height, text_h) if beside else text_h + curve.height
    strip_h = max((c.strip.height for c in report.clips if c.strip is not None), default=0)
    row_h = max(strip_h, 40) + 10
    canvas = Image.new("RGB", (max(width, int(table_w)), top + row_h * len(report.clips) + 10), "white")
    draw = ImageDraw.Draw(canvas)
    for i, cells in enumerate(lines):
        for j, text in enumerate(cells):  # fixed columns, right-aligned: the font is proportional
            x = 10 if j == 0 else 200 + col_w * j - draw.textlength(text, font=font)
            draw.text((x, 10 + 20 * i), text, fill="black", font=font)
    canvas.paste(curve, (width - curve.width, 0) if beside else (10, text_h))
    for i, c in enumerate(report.clips):
        y = top + row_h * i
        x = 10
        if c.strip is not None:
            canvas.paste(c.strip, (x, y))
            x += c.strip.width + 10
        colour = "#1a7f37" if c.match else "#c62828"
        draw.text((x, y + 2), f"{c.videoid}  reference: {c.reference}", fill="black", font=font)
        draw.text((x, y + 20), f"{' ' * len(c.videoid)}  generated: {c.prediction}", fill=colour, font=font)
    return canvas


# ---- text -------------------------------------------------------------------------------------


def render_text(report: Report, clips: int = 4) -> str:
    """The report for a terminal: the tables, then the first ``clips`` clips' reference vs generated."""
    lines = []
    for name, rows in report.tables.items():
        cols = _columns(rows)
        width, cw = max(len(r) for r in rows) + 2, max(10, *(len(c) + 2 for c in cols))
        lines.append(f"{name}:")
        lines.append(" " * width + "".join(f"{c:>{cw}}" for c in cols))
        lines += [
            f"  {r:<{width - 2}}" + "".join(f"{_percent(v[c]) if c in v else '':>{cw}}" for c in cols)
            for r, v in rows.items()
        ]
    if report.losses:
        (s0, l0), (s1, l1) = report.losses[0], report.losses[-1]
        lines.append(f"training loss: {l0:.3f} at step {s0} -> {l1:.3f} at step {s1}")
    matched = sum(c.match for c in report.clips)
    lines.append(
        f"clips: {matched}/{len(report.clips)} generated captions equal the reference; the first {clips}:"
    )
    for c in report.clips[:clips]:
        lines.append(f"  {c.videoid}: reference {c.reference!r}")
        lines.append(
            f"  {' ' * len(c.videoid)}  generated {c.prediction!r}{'' if c.match else '  (differs)'}"
        )
    return "\n".join(lines)


# ---- entry points -------------------------------------------------------------------------------


def build_report(
    out_dir: str | Path,
    shards: str | Path,
    captions: str | Path,
    metrics: str | Path | None = None,
    tables: Tables | None = None,
    *,
    title: str = "Video-LLaMA run report",
    max_clips: int = 16,
    frames_per_clip: int = 8,
) -> dict[str, str]:
    """Write ``report.html`` and ``report.png`` into ``out_dir``; returns their paths and the clip count."""
    rows = clip_rows(shards, generated_captions(captions), max_clips, frames_per_clip)
    if not rows:
        raise ConfigError(f"report: no clip of {str(shards)!r} has a caption in {str(captions)!r}")
    report = Report(title, rows, tables or {}, loss_points(metrics) if metrics else [])
    page, picture, text = render_html(report), render_png(report), render_text(report)  # all, then write
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / HTML_FILE).write_text(page)
    picture.save(out / PNG_FILE)
    return {"html": str(out / HTML_FILE), "png": str(out / PNG_FILE), "clips": str(len(rows)), "text": text}


def read_tables(paths: list[str]) -> Tables:
    """The tables of every file, in order (``grounded-eval --output DIR`` writes ``DIR/tables.json``)."""
    out: Tables = {}
    for path in paths:
        text = _text(path, "accuracy")
        try:
            tables = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"accuracy: {path!r} is not valid JSON: {e}") from None
        if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
            raise ConfigError(f"accuracy: {path!r} must hold {{table: {{row: {{column: fraction}}}}}}")
        for name, rows in tables.items():
            if not rows or not all(isinstance(r, dict) and r for r in rows.values()):
                raise ConfigError(f"accuracy: table {name!r} of {path!r} is empty or has an empty row")
            for row, cols in rows.items():
                if bad := [c for c, v in cols.items() if not _is_number(v)]:
                    raise ConfigError(
                        f"accuracy: {path!r} table {name!r} row {row!r} column {bad[0]!r} is "
                        f"{json.dumps(cols[bad[0]])}, not a number"
                    )
        out.update(tables)
    return out


def run(cfg: ReportConfig) -> dict[str, str]:
    """Build the report of ``cfg.run`` and log both files into its MLflow run (``report/``)."""
    from pipeline.tracking import attached

    run_dir = Path(cfg.run)
    if not run_dir.is_dir():
        raise ConfigError(f"run: directory {cfg.run!r} does not exist")
    paths = build_report(
        cfg.output or run_dir / REPORT,
        cfg.shards,
        cfg.captions,
        run_dir / METRICS,
        read_tables(cfg.accuracy),
        title=cfg.title,
        max_clips=cfg.max_clips,
        frames_per_clip=cfg.frames_per_clip,
    )
    if cfg.track:
        with attached(run_dir, "videollama-report", cfg.tracking_uri) as tracker:
            for key in ("html", "png"):
                tracker.log_artifact(paths[key], REPORT)
        paths["mlflow_run_id"] = tracker.run_id
    return paths
