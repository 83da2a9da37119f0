"""serve: the local web demo. What it asks is what ``chat`` asks (same prompts, same answers); its page
works in a real headless Chromium; its ``/answer`` API works through gradio_client.

The browser and API tests with the *trained* model need the demo's stage-2 run: they train it (the
grounded corpus -> tiny LLM + encoder -> feature cache -> stage 1 -> stage 2, about 7 minutes on a quiet
2-core machine), or take an existing one: ``SERVE_TEST_DEMO=demo_out`` (a ``make demo`` output folder
holding run_stage2/ and grounded/).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from infer.caption import VideoError
from infer.chat import ChatConfig
from infer.chat import run as chat
from infer.load import ModelSource
from infer.serve import Demo, ServeConfig
from pipeline.generate import GenerationConfig

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ("What colour is the shape?", "What shape is it?", "Which way does it move?")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium + chromium-driver (make browser) are not installed",
)


# ---- a random tiny model: the mechanics ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> dict:
    from pipeline.model import VideoLLaMA, tiny
    from pipeline.weights import export_trainable
    from standins.sample_data import write_clip

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    cfg = tiny()
    export_trainable(VideoLLaMA(cfg), cfg, root / "export")
    write_clip(root / "clip.mp4", 2.0, width=96, height=64, fps=8, seed=1)
    (root / "notes.mp4").write_text("these are notes, not a video\n" * 40)  # a text file renamed .mp4
    return {"export": root / "export", "clip": root / "clip.mp4", "text": root / "notes.mp4"}


def test_the_demo_asks_what_chat_asks(tiny_export):
    """Two turns about a clip, greedy: the demo's answers are chat's (same template, frame times and
    history), and the answer streams in more than one piece."""
    gen = GenerationConfig(template="vicuna", do_sample=False, max_new_tokens=6)
    source = ModelSource(checkpoint=str(tiny_export["export"]), device="cpu")
    demo = Demo(ServeConfig(model=source, generation=gen))
    clip = demo.read(tiny_export["clip"])
    assert clip.features.shape[:2] == (1, 8) and len(clip.timestamps) == 8
    history, streams = [], []
    for q in QUESTIONS[:2]:
        pieces = list(demo.stream(clip, history, q, gen))
        streams.append(pieces)
        history.append((q, pieces[-1]))
    want = chat(ChatConfig(model=source, generation=gen, video=str(tiny_export["clip"])), io.StringIO(
        "\n".join(QUESTIONS[:2]) + "\n"), io.StringIO())  # fmt: skip
    assert history == want
    for pieces in streams:  # streamed: growing prefixes of the answer, then the answer
        assert len(pieces) >= 2 and all(pieces[-1].startswith(p) for p in pieces[:-1]), pieces
    assert demo.answer(clip, QUESTIONS[0]) == want[0][1]  # /answer: a fresh conversation, greedy
    with pytest.raises(VideoError, match="cannot be decoded"):
        demo.read(tiny_export["text"])


def test_an_image_is_a_one_frame_clip(tiny_export, tmp_path):
    """An uploaded image: one frame at the model's size, no frame times, answered like a video; a text
    file named .png gets the message."""
    from PIL import Image

    gen = GenerationConfig(template="vicuna", do_sample=False, max_new_tokens=4)
    demo = Demo(
        ServeConfig(model=ModelSource(checkpoint=str(tiny_export["export"]), device="cpu"), generation=gen)
    )
    Image.fromarray(np.full((40, 70, 3), (200, 30, 30), np.uint8)).save(tmp_path / "red.png")
    clip = demo.read(tmp_path / "red.png")
    size = demo.loaded.model.cfg.image_size
    assert clip.frames.shape == (1, size, size, 3) and clip.timestamps is None
    assert clip.features.shape[:2] == (1, 1)
    assert list(demo.stream(clip, [], QUESTIONS[0], gen))[-1] == demo.answer(clip, QUESTIONS[0])
    (tmp_path / "notes.png").write_text("not an image\n")
    with pytest.raises(VideoError, match="image 'notes.png' cannot be read"):
        demo.read(tmp_path / "notes.png")


def test_listening_beyond_localhost_warns(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "serve", str(tmp_path / "missing"), "--host", "0.0.0.0"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 1
    assert "[serve] WARNING: listening on 0.0.0.0, not 127.0.0.1" in r.stderr
    assert (
        r.stderr.strip().splitlines()[-1] == f"Error: checkpoint {str(tmp_path / 'missing')!r} does not exist"
    )


def test_serve_config_refuses_a_caption_template_and_missing_examples(tmp_path):
    from pipeline.config import ConfigError, load_config

    cfg = load_config(ServeConfig, values={"model.checkpoint": "x", "generation.max_new_tokens": 5})
    assert cfg.generation.template == "vicuna" and cfg.host == "127.0.0.1" and not cfg.exposed
    with pytest.raises(ConfigError, match="needs a conversation template"):
        load_config(ServeConfig, values={"generation.template": "caption"})
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(ServeConfig, values={"examples": [str(tmp_path / "none.mp4")]})


# ---- a served page --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(request, tmp_path):
    """``serve(checkpoint, *flags)`` starts ``cli.py serve`` on a free port; returns its URL."""
    procs = []

    def start(checkpoint: Path, *flags: str) -> str:
        port = _free_port()
        log = open(tmp_path / f"serve-{port}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "cli.py"), "serve", str(checkpoint), "--port", str(port), *flags],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
        )  # fmt: skip
        procs.append((proc, log))
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / f"serve-{port}.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=5)
                return url
            except OSError:
                time.sleep(2)
        raise AssertionError(
            f"the server did not answer in 600 s:\n{(tmp_path / f'serve-{port}.log').read_text()}"
        )

    yield start
    for proc, log in procs:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


class Page:
    """The demo page as a user drives it (element ids set in infer/serve_page.py)."""

    def __init__(self, driver, url: str, timeout: float = 600):
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        self.d = driver  # an element re-rendered between finding and using it: try again at the next poll
        self.wait = WebDriverWait(driver, timeout, 0.5, ignored_exceptions=(StaleElementReferenceException,))
        driver.get(url)
        self.wait.until(lambda d: self._file_input())

    def _find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.d.find_elements(By.CSS_SELECTOR, css)

    def _file_input(self):
        found = self._find("#upload input[type=file]")
        return found[0] if found else None

    def _texts(self, css: str) -> list[str]:
        """The visible text of each element matching ``css``, read in one script: Gradio re-renders
        while it streams, and an element found first and read after would be gone (stale)."""
        script = "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText.trim());"
        return self.d.execute_script(script, css)

    def status(self) -> str:
        found = self._texts("#status")
        return found[0] if found else ""

    def upload(self, path: Path, expect: str) -> str:
        self.wait.until(lambda d: self._file_input())  # after a bad file the box is empty again
        self._file_input().send_keys(str(path))
        self.wait.until(lambda d: expect in self.status())
        return self.status()

    def answers(self) -> list[str]:
        return self._texts("#chat [data-testid=bot]")

    def ask(self, question: str, done) -> str:
        """Type and send ``question``; wait until the newest answer satisfies ``done``, or has not changed
        for 30 s (a wrong answer, returned for the caller's assertion instead of a 10-minute time-out)."""
        n = len(self.answers())
        self._find("#question textarea")[0].send_keys(question)
        self._find("#send")[0].click()
        last = {"text": None, "since": time.monotonic()}

        def answered(_) -> bool:
            found = self.answers()
            if len(found) != n + 1:
                return False
            if done(found[-1]):
                return True
            if found[-1] != last["text"]:
                last.update(text=found[-1], since=time.monotonic())
            return found[-1] != "" and time.monotonic() - last["since"] > 30

        self.wait.until(answered)
        return self.answers()[-1]


@pytest.mark.slow
@needs_browser
def test_the_page_in_a_browser(tiny_export, server, browser):
    """A random model: a bad upload gets the message and the next upload works, the frames and their
    times are shown, an answer appears in the chat, start over empties it (answers: the trained test)."""
    page = Page(browser, server(tiny_export["export"], "--greedy", "--max-new-tokens", "4"))
    message = page.upload(tiny_export["text"], "Error")
    assert message.startswith("Error: cannot use notes.mp4: video 'notes.mp4' cannot be decoded"), message
    assert "/tmp" not in message  # the server's temporary path is not shown
    status = page.upload(tiny_export["clip"], "frames sampled")
    assert status == "clip.mp4: 8 frames sampled at 0.0, 0.2, 0.5, 0.8, 1.0, 1.2, 1.5, 1.8 s. Ask a question."
    assert len(page._find("#frames img")) == 8
    page.ask(QUESTIONS[0], lambda a: a.strip() != "")
    page._find("#clear")[0].click()
    page.wait.until(lambda d: page.answers() == [] and page.status().startswith("Upload a video"))


@pytest.mark.slow
def test_the_answer_api_on_a_random_model(tiny_export, server):
    """gradio_client's /answer is a fresh greedy conversation: chat's first answer, whatever the page's
    settings; an unreadable file is one line of error for the caller."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url = server(
        tiny_export["export"], "--max-new-tokens", "6", "--temperature", "1.5"
    )  # sampling on the page
    gen = GenerationConfig(template="vicuna", do_sample=False, max_new_tokens=6)
    source = ModelSource(checkpoint=str(tiny_export["export"]), device="cpu")
    cfg = ChatConfig(model=source, generation=gen, video=str(tiny_export["clip"]))
    want = chat(cfg, io.StringIO(QUESTIONS[0] + "\n"), io.StringIO())[0][1]
    client = Client(url, verbose=False)
    assert client.predict(handle_file(str(tiny_export["clip"])), QUESTIONS[0], api_name="/answer") == want
    with pytest.raises(AppError, match="cannot use notes.mp4: video 'notes.mp4' cannot be decoded"):
        client.predict(handle_file(str(tiny_export["text"])), QUESTIONS[0], api_name="/answer")


# ---- the trained model: the answers -----------------------------------------------------------------


def _cli(*args: str) -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, f"cli.py {' '.join(args)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def train_demo_stage2(root: Path) -> Path:
    """The demo's chain (scripts/demo.sh without its evaluations): returns the stage-2 run folder."""
    from standins.sample_data import make_grounded_sample

    corpus = make_grounded_sample(root / "grounded", faults=False, workers=2)
    _cli("tiny-llm", "--annotations", corpus["train"], "--output", str(root / "tiny_llm"))
    _cli("tiny-encoder", "--output", str(root / "tiny_encoder"))
    enc = ("--cache-features", "--encoder", "tiny", f"features.blip2_path={root / 'tiny_encoder'}")
    _cli("preprocess", "--annotations", corpus["train"], "--videos", corpus["videos"],
         "--output", str(root / "train_shards"), "--samples-per-shard", "64", *enc)  # fmt: skip
    _cli("preprocess", "--dataset", "videochat", "--annotations", corpus["train_videochat"],
         "--videos", corpus["videos"], "--output", str(root / "videochat_shards"), "--samples-per-shard", "64",
         *enc)  # fmt: skip
    _cli("train", "--config", str(REPO / "configs" / "stage1_tiny.yaml"), f"data.shards={root / 'train_shards'}",
         f"run_dir={root / 'run'}", f"model.llm_path={root / 'tiny_llm'}")  # fmt: skip
    _cli("train", "--config", str(REPO / "configs" / "stage2_tiny.yaml"), f"init_from={root / 'run' / 'export'}",
         f"run_dir={root / 'run_stage2'}", f"model.llm_path={root / 'tiny_llm'}",
         f"data.datasets=[{{shards: {root / 'videochat_shards'}}}]")  # fmt: skip
    return root / "run_stage2"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The stage-2 run and a held-out yellow triangle (a fresh render, never trained on) with its truth."""
    root = Path(os.environ["SERVE_TEST_DEMO"]) if os.environ.get("SERVE_TEST_DEMO") else None
    if root is None:
        root = tmp_path_factory.mktemp("serve_trained")
        train_demo_stage2(root)
    rows = list(csv.DictReader((root / "grounded" / "heldout" / "annotations" / "0.csv").open()))
    row = next(r for r in rows if (r["colour"], r["shape"]) == ("yellow", "triangle"))
    clip = root / "grounded" / "videos" / row["page_dir"] / f"{row['videoid']}.mp4"
    return {
        "run": root / "run_stage2",
        "clip": clip,
        "truth": (row["colour"], row["shape"], row["direction"]),
    }


def _words(answer: str) -> set[str]:
    return set(answer.lower().replace(".", " ").replace(",", " ").split())


@pytest.mark.slow
@needs_browser
def test_the_trained_model_answers_in_the_browser(trained, tiny_export, server, browser, tmp_path):
    """The held-out yellow triangle: uploaded, asked the three questions in one conversation, answered
    right on the page; the renamed text file before it gets the message and the next upload works."""
    page = Page(browser, server(trained["run"], "--greedy", "--max-new-tokens", "12"))
    assert page.upload(tiny_export["text"], "Error").startswith("Error: cannot use notes.mp4")
    shown = shutil.copy(trained["clip"], tmp_path / "heldout.mp4")
    assert "8 frames sampled at" in page.upload(Path(shown), "frames sampled")
    for question, truth in zip(QUESTIONS, trained["truth"], strict=True):
        answer = page.ask(question, lambda a, t=truth: t in _words(a))
        assert truth in _words(answer), (question, answer)
    assert len(page.answers()) == 3


@pytest.mark.slow
def test_the_answer_api_through_gradio_client(trained, tiny_export, server):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server(trained["run"]), verbose=False)
    for question, truth in zip(QUESTIONS, trained["truth"], strict=True):
        answer = client.predict(handle_file(str(trained["clip"])), question, api_name="/answer")
        assert truth in _words(answer), (question, answer)
    with pytest.raises(AppError, match="cannot use notes.mp4: video 'notes.mp4' cannot be decoded"):
        client.predict(handle_file(str(tiny_export["text"])), QUESTIONS[0], api_name="/answer")
