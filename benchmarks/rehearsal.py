"""Real-size dress rehearsal on the CPU: the vit-g-7b preset end to end with random weights, no downloads.

    python benchmarks/rehearsal.py                 # 7B LLM: needs ~20 GB of free RAM and ~30 min
    python benchmarks/rehearsal.py --llm 1b        # the same with a 1B-shaped LLM (~6 GB)
    make rehearsal                                 # = the first line, under flock on a shared machine

Writes, once (``--cache``, default .cache/rehearsal): a LLaMA folder of the chosen shape in bf16 with a
32,000-token tokenizer and a BLIP-2 folder with the real ViT-g + Q-Former shapes (standins.synthetic:
std 0.02, not transformers' 1e-10 default that is 0 in fp16), and 2 H.264 clips. Then runs the commands
a user runs, each as its own process, and prints seconds and peak RSS (the whole process tree) per phase:

  startup-before  the frozen encoder as it was built before: random init of the 1B ViT, then the load
  startup-after   built on the meta device and materialised once from the files
  preprocess      ``cli.py preprocess --cache-features`` over the 2 clips at 224 px (fp16 ViT on CPU)
  train           ``cli.py train`` (stage1_vit-g_7b.yaml), 4 ZeRO-2 steps from the features with the LLM
                  in bf16 and fp32 trainables, checkpoints at steps 3 and 4
  resume          the step-4 checkpoint removed, the same command resumes at step 3: step 4's loss must
                  equal the uninterrupted run's
  export          ``cli.py convert`` of the run's trainable export to the original's .pth layout
  caption         ``cli.py caption RUN --greedy`` on one clip (ViT-g fp16 + the LLM on the CPU)

and checks every seam it can see: the placeholder id is 32,000 beyond a 32,000-row embedding, the
cached features are fp16 [8, 32, 768], finite and not zero, every loss is finite, the export is fp32 with
22,104,064 parameters, the checkpoint is at most 1.1 x 12 B per trainable parameter, and the weights,
optimizer state and checkpoint agree with ``cli.py plan`` within 10 %. Any failure exits non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLM_SHAPES = {  # llm_* keys of ModelConfig
    "7b": {},  # the preset's own sizes
    "1b": {"llm_hidden_size": 2048, "llm_layers": 16, "llm_heads": 16, "llm_intermediate_size": 5504},
}
CLIPS = 2


class Seam(AssertionError):
    """A dtype/shape seam or a broken promise the rehearsal exists to catch."""


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Seam(what)
    print(f"  ok: {what}", flush=True)


def model_config(args):
    """The vit-g-7b preset with the chosen LLM shape and, when asked, fewer ViT / LLM blocks."""
    from pipeline.model import preset

    cfg = dataclasses.replace(preset("vit-g-7b"), **LLM_SHAPES[args.llm])
    return dataclasses.replace(
        cfg,
        vision_layers=args.vision_layers or cfg.vision_layers,
        llm_layers=args.llm_layers or cfg.llm_layers,
    )


class TreeRSS:
    """Peak of the summed RSS of a process and all its descendants, sampled every 0.2 s."""

    def __init__(self, pid: int):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            with contextlib.suppress(psutil.Error):
                for p in [self.proc, *self.proc.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_phase(name: str, argv: list[str], results: list, log_dir: Path) -> str:
    """Run one phase as a process, tee its output to a log; record seconds and peak tree RSS."""
    print(f"\n== {name}: {' '.join(argv)}", flush=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    log = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        rss = TreeRSS(proc.pid)
        rc = proc.wait()
        peak = rss.stop()
    seconds = time.perf_counter() - t0
    text = log.read_text()
    tail = "\n".join(ln for ln in text.splitlines()[-12:] if "WARNING" not in ln)
    print(tail, flush=True)
    results.append((name, seconds, peak))
    print(f"-- {name}: {seconds:.1f} s, peak RSS {peak / 2**30:.2f} GiB", flush=True)
    if rc != 0:
        raise Seam(f"phase {name} exited {rc}; see {log}")
    return text


# ---- phases run in their own process (python benchmarks/rehearsal.py --phase ...) ------------------


def phase_assets(args) -> None:
    from standins.sample_data import make_webvid_sample
    from standins.synthetic import write_blip2, write_llama

    cfg = model_config(args)
    cache = Path(args.cache)
    for folder, write in ((llm_dir(args), write_llama), (cache / "blip2-vit-g", write_blip2)):
        if not (folder / "DONE").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            t0 = time.perf_counter()
            write(folder, cfg)
            (folder / "DONE").write_text("")
            print(f"wrote {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
    clips = Path(args.work) / "webvid"
    if not clips.is_dir():
        make_webvid_sample(clips, CLIPS, seed=0, seconds=(5.0, 8.0))


def phase_startup(args, before: bool) -> None:
    """Build the frozen encoder and load its weights; ``before``: random init first (the old way)."""
    import torch

    from pipeline.model import FrozenEncoder, preset
    from pipeline.weights import load_frozen_encoder

    full_depth = dataclasses.replace(model_config(args), vision_layers=preset("vit-g-7b").vision_layers)
    cfg = dataclasses.replace(full_depth, blip2_path=str(Path(args.cache) / "blip2-vit-g"))
    t0 = time.perf_counter()
    if before:
        encoder = FrozenEncoder(dataclasses.replace(cfg, blip2_path=None))  # random init of ~1.1B params
        t_init = time.perf_counter() - t0
        encoder.cfg = cfg
    else:
        encoder = FrozenEncoder(cfg)  # meta device
        t_init = time.perf_counter() - t0
    load_frozen_encoder(encoder)
    t_load = time.perf_counter() - t0
    # the content hash reads every byte (the feature cache computes it at start-up anyway): after it,
    # a lazily mapped file has really been read, so both ways are compared with the weights in memory
    encoder.weights_fingerprint()
    total = time.perf_counter() - t0
    dtypes = sorted({str(p.dtype) for p in encoder.parameters()})
    meta = sum(p.is_meta for p in encoder.parameters())
    rss = psutil.Process().memory_info().rss
    print(
        json.dumps(
            {
                "construct_s": t_init,
                "load_s": t_load,
                "total_s": total,
                "rss_gib": rss / 2**30,
                "dtypes": dtypes,
                "meta_params": meta,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )
    if meta:
        raise SystemExit(f"{meta} parameters still on the meta device")


# ---- the orchestrating process ----------------------------------------------------------------------


def llm_dir(args, full: bool = False) -> Path:
    layers = "" if full or not args.llm_layers else f"-L{args.llm_layers}"
    return Path(args.cache) / f"llama-{args.llm}{layers}-bf16"


def phase_llm_load(args) -> None:
    """The full-depth LLM folder through ``build_llm`` (from_pretrained, bf16): start-up time and RSS."""
    from pipeline.model import build_llm, preset

    full = dataclasses.replace(preset("vit-g-7b"), **LLM_SHAPES[args.llm])
    cfg = dataclasses.replace(full, llm_path=str(llm_dir(args, full=True)))
    t0 = time.perf_counter()
    llm = build_llm(cfg)
    seconds = time.perf_counter() - t0
    rss_lazy = psutil.Process().memory_info().rss  # transformers maps the files: nothing read yet
    for p in llm.parameters():  # one element per 4 KB page: every byte of the weights in memory
        float(p.detach().reshape(-1)[:: 4096 // p.element_size()].float().sum())
    n = sum(p.numel() for p in llm.parameters())
    dtypes = sorted({str(p.dtype) for p in llm.parameters()})
    rss = psutil.Process().memory_info().rss
    report = {"load_s": seconds, "touched_s": time.perf_counter() - t0, "params": n, "dtypes": dtypes}
    print(json.dumps({**report, "rss_lazy_gib": rss_lazy / 2**30, "rss_gib": rss / 2**30}))


def train_argv(args, run_dir: Path, shards: Path) -> list[str]:
    cfg = model_config(args)
    keys = [*LLM_SHAPES[args.llm], "llm_layers", "vision_layers"]
    sizes = [f"model.{k}={getattr(cfg, k)}" for k in keys]
    return [
        sys.executable,
        "cli.py",
        "train",
        "--config",
        "configs/stage1_vit-g_7b.yaml",
        "data.datasets=[]",  # the recipe lists its datasets; this run has one shard folder
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        f"model.llm_path={llm_dir(args)}",
        f"model.blip2_path={Path(args.cache) / 'blip2-vit-g'}",
        "model.eva_vit_path=null",
        "model.qformer_lavis_path=null",
        *sizes,
        f"data.num_frames={args.frames}",
        f"micro_batch={CLIPS}",
        "max_steps=4",
        "save_every=3",
        "data.workers=0",
        "optim.warmup_steps=0",  # a real lr from step 1, so the steps move the loss
        "tracking=false",
    ]


def check_features(shards: Path, frames: int) -> None:
    from pipeline.shards import read_shard

    samples = [s for tar in sorted(shards.glob("shard-*.tar")) for s in read_shard(tar)]
    check(len(samples) == CLIPS, f"{CLIPS} samples in the feature cache")
    for s in samples:
        f = s["features"]
        check(
            f.dtype == np.float16 and f.shape == (frames, 32, 768),
            f"features fp16 [{frames}, 32, 768]: {f.dtype} {f.shape}",
        )
        x = f.astype(np.float32)
        check(bool(np.isfinite(x).all()) and float(x.std()) > 1e-3, f"features finite, std {x.std():.3f}")


def check_tokenizer(args) -> None:
    from transformers import AutoConfig

    from pipeline.prompts import image_token_id, load_tokenizer

    tok = load_tokenizer(str(llm_dir(args)))
    rows = AutoConfig.from_pretrained(llm_dir(args)).vocab_size
    image_id = image_token_id(tok)
    check(image_id == rows == 32000, f"image placeholder id {image_id} beyond the {rows}-row embedding")


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {(r := json.loads(ln))["step"]: r["loss"] for ln in lines if ln}


def check_plan(args, run_dir: Path, ckpt: Path, ckpt_bytes: int) -> list[str]:
    """The parts of ``cli.py plan`` the CPU measures: frozen weights, optimizer state, checkpoint."""
    from pipeline.config import load_config
    from train.config import TrainConfig
    from train.memory import plan_for_config

    cfg = load_config(TrainConfig, run_dir / "config.yaml")
    plan = plan_for_config(cfg, gpus=1, on_gpu=False)
    index = json.loads((llm_dir(args) / "model.safetensors.index.json").read_text())
    optim = (ckpt / "trainable_state.pt").stat().st_size
    rows = []
    for what, measured, planned in (
        ("frozen weights (LLM, bf16)", index["metadata"]["total_size"], plan.frozen_weights),
        ("optimizer state (fp32 master + Adam)", optim, plan.optimizer_states),
        ("checkpoint", ckpt_bytes, plan.checkpoint_bytes),
    ):
        rows.append(
            f"| {what} | {measured / 1e9:.3f} GB | {planned / 1e9:.3f} GB | {measured / planned:.3f} |"
        )
        check(abs(measured / planned - 1) <= 0.10, f"{what}: measured / plan = {measured / planned:.3f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", choices=sorted(LLM_SHAPES), default="7b", help="LLM shape [7b]")
    ap.add_argument("--cache", default=str(REPO / ".cache/rehearsal"), help="random-weight folders, reused")
    ap.add_argument("--work", default=None, help="run folder [CACHE/run-LLM], emptied first")
    ap.add_argument("--vision-layers", type=int, help="ViT blocks [39]; fewer: same seams, less compute")
    ap.add_argument(
        "--llm-layers", type=int, help="LLM blocks [the shape's]; fewer: same seams, less compute"
    )
    ap.add_argument("--llm-load", action="store_true", help="also load the full-depth LLM folder (RAM!)")
    ap.add_argument("--frames", type=int, default=8, help="frames per clip [8]")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up before/after phases")
    ap.add_argument(
        "--reuse-shards", action="store_true", help="keep a finished feature cache from a run before"
    )
    ap.add_argument(
        "--phase", choices=["assets", "startup-before", "startup-after", "llm-load"], help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    args.work = args.work or str(Path(args.cache) / f"run-{args.llm}")
    if args.phase == "assets":
        return phase_assets(args)
    if args.phase == "llm-load":
        return phase_llm_load(args)
    if args.phase:
        return phase_startup(args, before=args.phase == "startup-before")

    import torch

    from pipeline.weights import load_trainable
    from train.checkpoint import checkpoint_bytes, latest
    from train.memory import param_counts

    work = Path(args.work)
    reuse = args.reuse_shards and (work / "shards" / "summary.json").is_file()
    for old in ("run", "logs") if reuse else ("",):
        shutil.rmtree(work / old, ignore_errors=True)
    logs, results = work / "logs", []
    logs.mkdir(parents=True)
    me = [sys.executable, str(Path(__file__).resolve()), "--llm", args.llm, "--cache", args.cache]
    me += ["--work", str(work), "--frames", str(args.frames)]
    me += [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("vision_layers", "llm_layers")
        if getattr(args, k)
    ]
    run_phase("assets", [*me, "--phase", "assets"], results, logs)
    check_tokenizer(args)
    startup = {}
    startup_phases = [] if args.no_startup else ["startup-before", "startup-after"]
    for name in (*startup_phases, *(["llm-load"] if args.llm_load else [])):
        out = run_phase(name, [*me, "--phase", name], results, logs)
        startup[name] = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])

    shards = work / "shards"
    videos = work / "webvid"
    if reuse:
        print(f"\n== preprocess: reusing the feature cache in {shards}", flush=True)
    else:
        run_phase(
            "preprocess",
            [
                sys.executable,
                "cli.py",
                "preprocess",
                "--annotations",
                str(videos / "annotations"),
                "--videos",
                str(videos / "videos"),
                "--output",
                str(shards),
                "--size",
                "224",
                "--workers",
                "1",
                "--cache-features",
                "--encoder",
                "vit-g-7b",
                f"features.blip2_path={Path(args.cache) / 'blip2-vit-g'}",
                "--num-frames",
                str(args.frames),
                f"features.batch_size={CLIPS}",
                "features.keep_frames=false",
                f"features.vision_layers={model_config(args).vision_layers}",
            ],
            results,
            logs,
        )
    check_features(shards, args.frames)

    run_dir = work / "run"
    argv = train_argv(args, run_dir, shards)
    run_phase("train", argv, results, logs)
    uninterrupted = losses(run_dir)
    check(sorted(uninterrupted) == [1, 2, 3, 4], f"4 steps logged: {uninterrupted}")
    check(all(np.isfinite(v) for v in uninterrupted.values()), "every loss finite")
    ckpt = run_dir / "checkpoints" / "step_00000003"
    ckpt_bytes = checkpoint_bytes(ckpt)
    psi = param_counts(model_config(args)).trainable  # 22,104,064 with a 4096-wide LLM
    sd, _ = load_trainable(run_dir / "export")
    n_params = sum(v.numel() for v in sd.values())
    check(all(v.dtype == torch.float32 for v in sd.values()), "export tensors fp32")
    check(n_params == psi, f"export holds {n_params:,} trainable parameters")
    ratio = ckpt_bytes / (12 * n_params)
    check(ratio <= 1.1, f"checkpoint {ckpt_bytes / 1e6:.1f} MB = {ratio:.3f} x 12 B x trainable params")
    plan_rows = check_plan(args, run_dir, ckpt, ckpt_bytes)

    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    shutil.rmtree(run_dir / "export")
    check(latest(run_dir) == ckpt, "newest complete checkpoint is step 3")
    run_phase("resume", argv, results, logs)
    resumed = losses(run_dir)
    diff = abs(resumed[4] - uninterrupted[4])
    check(diff <= 1e-6, f"step 4 after resume {resumed[4]:.6f} vs uninterrupted {uninterrupted[4]:.6f}")

    run_phase(
        "export",
        [sys.executable, "cli.py", "convert", str(run_dir / "export"), str(work / "videollama.pth")],
        results,
        logs,
    )
    clip = sorted((videos / "videos").rglob("*.mp4"))[0]
    out = run_phase(
        "caption",
        [sys.executable, "cli.py", "caption", str(run_dir), "--greedy", "--max-new-tokens", "8", str(clip)],
        results,
        logs,
    )

    cfg = model_config(args)
    print(
        f"\n## Rehearsal: ViT-g {cfg.vision_layers} blocks, LLM {args.llm} shape with {cfg.llm_layers} blocks "
        f"({llm_dir(args)}), {args.frames} frames, {os.cpu_count()} CPUs\n"
    )
    print("| phase | seconds | peak RSS (process tree) |\n|---|---|---|")
    for name, seconds, peak in results:
        print(f"| {name} | {seconds:.1f} | {peak / 2**30:.2f} GiB |")
    b, a = startup.get("startup-before"), startup.get("startup-after")
    if b and a:
        print(
            f"\nfrozen encoder start-up (build + load + content hash): before {b['total_s']:.1f} s (random "
            f"init {b['construct_s']:.1f} s), after {a['total_s']:.1f} s (meta {a['construct_s']:.2f} s): "
            f"{b['total_s'] / a['total_s']:.1f}x; RSS after {b['rss_gib']:.2f} vs {a['rss_gib']:.2f} GiB"
        )
    if "llm-load" in startup:
        x = startup["llm-load"]
        print(
            f"full-depth LLM from_pretrained: {x['load_s']:.1f} s ({x['touched_s']:.1f} s with every page read), "
            f"{x['params']:,} params {x['dtypes']}, RSS {x['rss_gib']:.2f} GiB"
        )
    print(f"losses {uninterrupted}; step 4 resumed {resumed[4]} (|diff| {diff:.2e})")
    print(f"checkpoint step 3: {ckpt_bytes:,} B = {ratio:.3f} x 12 B x {n_params:,} trainable params")
    print("\n| part | measured | plan | ratio |\n|---|---|---|---|")
    print("\n".join(plan_rows))
    caption = [ln for ln in out.splitlines() if ln.strip() and "WARNING" not in ln][-1:]
    print(f"\ncaption: {caption}")


if __name__ == "__main__":
    main()
