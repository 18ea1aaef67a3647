#!/usr/bin/env python3
"""Bring your own model (issue 17): what the node adds around a MONAI bundle and a command model.

    .venv/bin/python benchmarks/bundles.py [--shape 512x512x300] [--network zoo|small]
                                           [--roi 96x96x96] [--runs 1] [--command-runs 5]
                                           [--sleep-ms 0 1000] [--skip-bundle] [--skip-command]

1. Bundle overhead. A segmentation bundle in the Model Zoo's layout (``write_zoo_bundle`` of the
   bundle-model tests: spleen_ct_segmentation's inference.json - Orientation, Spacing 1.5x1.5x2
   mm, intensity window, sliding window, softmax, Invertd, argmax - with seeded weights), its
   network the zoo's spleen UNet (``--network zoo``: channels 16-256, 2 residual units, batch
   norm; ``small``: 8-64, 1 unit) and roi ``--roi`` (the zoo's 96^3, sw_batch_size 4, overlap
   0.5 by default). A chest CT phantom of ``--shape`` (columns x rows x slices, 0.7x0.7x1.0 mm)
   is written once (setup) and stored into an in-process node by storescu (setup). Then, in a
   child process of its own: the bundle's own forward, the inferer alone on the preprocessed
   tensor (after one untimed call, as in a worker that has run a job before), and the node's
   whole job as the worker runs it (``job_models`` -> ``ModelPipeline.run``: find the series in
   the index, load it from the DICOM files, the bundle's preprocessing, inferer and
   postprocessing, the label map and findings, mask file, SEG and SR written) with the shares of
   the preprocessing, inferer and postprocessing (timed around the calls) and the process's
   peak RSS during it (sampled every 20 ms). Ratio whole job / forward, the issue's target
   being under 1.3, and whole job / the bundle's own pipeline (what the node adds).
2. Command model overhead. A trivial program (python: sleep ``--sleep-ms``, copy a one-frame SEG
   of the input's study made at setup into out/) through the node's job path
   (``CommandModel.run``: series found in the index, 300 inputs copied into in/, job.json, the
   program in its own process group, out/ checked and the SEG moved to results/) against the
   same program run bare (``subprocess.run`` on the series' folder, no copy), median of
   ``--command-runs``; overhead in seconds and the ratio.

Prints a markdown report (machine, date).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: the zoo's spleen_ct_segmentation network (configs/inference.json)
ZOO_UNET: dict[str, Any] = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
    "norm": "batch",
}
SMALL_UNET: dict[str, Any] = {
    **ZOO_UNET,
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2],
    "num_res_units": 1,
}
NETWORKS = {"zoo": ZOO_UNET, "small": SMALL_UNET}

#: the command model: argv in/ out/ milliseconds; $BENCH_SEG is copied into out/
PROGRAM = """\
import os, shutil, sys, time
time.sleep(int(sys.argv[3]) / 1000)
shutil.copyfile(os.environ["BENCH_SEG"], os.path.join(sys.argv[2], "seg.dcm"))
"""


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected AxBxC (e.g. 512x512x300), not {text!r}")
    return parts  # type: ignore[return-value]


def rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


class RssSampler:
    """The highest RSS of this process while in the ``with`` block, sampled every 20 ms."""

    def __init__(self) -> None:
        import threading

        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def node_for(root: Path) -> Any:
    """An in-process node receiving only (no routes, no worker threads)."""
    from dicomnode.app import build_node
    from dicomnode.config import Settings

    settings = Settings(
        node={"host": "127.0.0.1", "port": 0, "storage_dir": root, "min_free_disk_mb": 1},
        api={"enabled": False},
        routes=[],
        workers=[],
    )
    node = build_node(settings)
    node.start(background=False)
    return node


def store(node: Any, files: list[Path]) -> str:
    from pydicom import dcmread

    from dicomnode.testing.peers import storescu

    sent = storescu(node.receiver.address[1], files)
    if sent.returncode != 0:
        raise RuntimeError(f"storescu failed: {sent.stderr[-300:]}")
    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def claim(node: Any, model: str, series_uid: str, key: str) -> Any:
    from dicomnode.domain import JobState
    from dicomnode.queue.worker import JobContext

    node.jobs.enqueue(
        dedupe_key=key,
        route="bench",
        model=model,
        study_instance_uid="1.2.3",
        series_instance_uid=series_uid,
        inputs=[series_uid],
        state=JobState.QUEUED,
    )
    job = node.jobs.claim("bench-worker", [model])
    assert job is not None
    return JobContext(job, "cpu", "bench-worker", storage_dir=node.spool.root)


# -- 1. the bundle, in a child process -----------------------------------------------------


def write_bundle(root: Path, network: str, roi: tuple[int, int, int]) -> Path:
    from tests.unit.test_bundle_model import write_zoo_bundle

    write_zoo_bundle(root, network_def=NETWORKS[network], name=f"{network}_spleen_ct_bench")
    config = json.loads((root / "configs" / "inference.json").read_text())
    config["inferer"].update({"roi_size": list(roi), "sw_batch_size": 4, "overlap": 0.5})
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    return root


def bundle_child(files_dir: Path, bundle: Path, storage: Path, runs: int) -> dict[str, Any]:
    import torch
    from monai.data import list_data_collate

    from dicomnode.imaging import load_series
    from dicomnode.inference import ModelRegistry
    from dicomnode.inference.bundle_model import IMAGE_KEY, series_image
    from dicomnode.pipeline import job_models

    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    files = sorted(files_dir.glob("*.dcm"))
    node = node_for(storage)
    try:
        series_uid = store(node, files)
        out["rss_node_mb"] = rss_mb()
        pipeline = job_models(
            ModelRegistry([], {"zoo": bundle}), ["zoo"], sessions=node.database.sessions
        )["zoo"]
        t = time.perf_counter()
        pipeline.load("cpu")  # type: ignore[attr-defined]
        out["model_load_s"] = time.perf_counter() - t
        out["rss_loaded_mb"] = rss_mb()
        model = pipeline.model  # type: ignore[attr-defined]
        inferer, pre, post = model.inferer, model.preprocessing, model.postprocessing
        # the bundle's own forward: the inferer alone on the preprocessed tensor, after one
        # untimed call (a worker that has run a job before: torch's first-call set-up done)
        volume = load_series(files)
        batch = list_data_collate([pre({IMAGE_KEY: series_image(volume)})])
        image = batch[IMAGE_KEY].to(model.device.torch)
        del volume, batch
        out["preprocessed_shape"] = tuple(image.shape)
        forwards = []
        for _run in range(runs + 1):
            t = time.perf_counter()
            with torch.no_grad():
                inferer(image, model.network)
            forwards.append(time.perf_counter() - t)
        out["forward_first"], out["forward"] = forwards[0], forwards[1:]
        del image
        out["rss_before_jobs_mb"] = rss_mb()

        # the whole job, with the inferer's, preprocessing's and postprocessing's shares
        spent: dict[str, float] = {}

        def timer(key: str, call: Any) -> Any:
            def timed(*args: Any) -> Any:
                started = time.perf_counter()
                try:
                    return call(*args)
                finally:
                    spent[key] = spent.get(key, 0.0) + time.perf_counter() - started

            return timed

        model.inferer = timer("inferer", inferer)
        model.preprocessing = timer("preprocessing", pre)
        model.postprocessing = timer("postprocessing", post)
        jobs = []
        for run in range(runs):
            spent.clear()
            context = claim(node, "zoo", series_uid, f"bundle/{run}")
            with RssSampler() as sampler:
                t = time.perf_counter()
                result = pipeline.run(context)
                job_s = time.perf_counter() - t
            jobs.append({"job": job_s, **spent, **result["timing_s"], "peak": sampler.peak})
            out["objects"] = sorted(o["kind"] for o in result.get("objects", []))
            out["voxels"] = result["summary"]["voxels"]
        out["jobs"] = jobs
        out["peak_process_mb"] = peak_mb()
    finally:
        node.stop()
    return out


def run_bundle(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from dicomnode.phantoms.chest import chest_ct

    columns, rows, slices = args.shape
    files_dir = root / "ct"
    t = time.perf_counter()
    phantom = chest_ct((slices, rows, columns), (0.7, 0.7, 1.0), nodules=0, seed=1717)
    phantom.write(files_dir)
    del phantom
    print(f"  setup: series written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    bundle = write_bundle(root / "bundle", args.network, args.roi)
    report = root / "bundle.json"
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--child-bundle", str(files_dir), str(bundle),
         str(root / "node-bundle"), str(args.runs), str(report)],
        check=True,
    )  # fmt: skip
    print(f"  bundle child: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    result: dict[str, Any] = json.loads(report.read_text())
    result["files_dir"] = str(files_dir)
    return result


# -- 2. the command model -------------------------------------------------------------------


def run_command(args: argparse.Namespace, root: Path, files_dir: Path | None) -> dict[str, Any]:
    from dicomnode.config import CommandModelSettings
    from dicomnode.inference import ModelRegistry
    from dicomnode.pipeline import job_models
    from dicomnode.testing.result_objects import write_result_objects

    if files_dir is None:
        from dicomnode.phantoms.simple import SeriesSpec, ct_slices
        from dicomnode.phantoms.writer import write_series

        spec = SeriesSpec(slices=args.command_slices, rows=512, columns=512, seed=1718)
        files_dir = root / "ct"
        write_series(list(ct_slices(spec)), files_dir)
    files = sorted(files_dir.glob("*.dcm"))[: args.command_slices]
    (seg,) = write_result_objects(files[:1], root / "seg", 0, kinds=("SEG",))
    seg_path = root / "seg" / seg["path"]
    program = root / "program.py"
    program.write_text(PROGRAM)
    env = {"BENCH_SEG": str(seg_path)}
    node = node_for(root / "node-command")
    rows = {}
    try:
        series_uid = store(node, files)
        for ms in args.sleep_ms:
            name = f"cmd{ms}"
            settings = CommandModelSettings(
                command=[sys.executable, str(program), "{input}", "{output}", str(ms)],
                environment=env,
            )
            (model,) = job_models(
                ModelRegistry([]), [name], sessions=node.database.sessions,
                commands={name: settings},
            ).values()  # fmt: skip
            model.load("cpu")
            node_s, parts, bare_s = [], [], []
            for run in range(args.command_runs):
                context = claim(node, name, series_uid, f"{name}/{run}")
                t = time.perf_counter()
                result = model.run(context)
                node_s.append(time.perf_counter() - t)
                parts.append(result["timing_s"])
                assert [o["kind"] for o in result["objects"]] == ["SEG"], result
                with tempfile.TemporaryDirectory(dir=root) as out:
                    t = time.perf_counter()
                    subprocess.run(
                        [sys.executable, str(program), str(files_dir), out, str(ms)],
                        env={**os.environ, **env}, check=True,
                    )  # fmt: skip
                    bare_s.append(time.perf_counter() - t)
            rows[ms] = {
                "node": statistics.median(node_s),
                "bare": statistics.median(bare_s),
                **{k: statistics.median(p[k] for p in parts) for k in parts[0]},
            }
            print(f"  command {ms} ms: node {rows[ms]['node']:.3f} s, bare "
                  f"{rows[ms]['bare']:.3f} s", file=sys.stderr)  # fmt: skip
        inputs_mb = sum(p.stat().st_size for p in files) / 2**20
    finally:
        node.stop()
    return {"rows": rows, "files": len(files), "inputs_mb": inputs_mb}


# -- the report -----------------------------------------------------------------------------


def report(args: argparse.Namespace, bundle: dict[str, Any] | None, command: Any) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"# Bundles and command models, {date.today()}, {cpu}, {os.cpu_count()} CPUs, no GPU",
        "",
    ]
    if bundle:
        jobs, fwd = bundle["jobs"], bundle["forward"]
        med = {k: statistics.median(j[k] for j in jobs) for k in jobs[0]}
        forward = statistics.median(fwd)
        shape = "x".join(map(str, args.shape))
        roi = "x".join(map(str, args.roi))
        pre = "x".join(map(str, bundle["preprocessed_shape"][2:]))
        lines += [
            f"## Bundle: {args.network} UNet, roi {roi} (sw_batch_size 4, overlap 0.5), "
            f"{shape} CT (preprocessed to {pre}), {bundle['threads']} torch threads, "
            f"median of {args.runs}",
            "",
            "| step | seconds |",
            "|---|---:|",
            f"| find + load the series from DICOM files | {med['load_inputs']:.2f} |",
            f"| predict | {med['predict']:.2f} |",
            f"| - the bundle's preprocessing (Orientation, Spacing, intensity) | "
            f"{med['preprocessing']:.2f} |",
            f"| - the inferer (sliding window, network) | {med['inferer']:.2f} |",
            f"| - the bundle's postprocessing (softmax, Invertd, argmax) | "
            f"{med['postprocessing']:.2f} |",
            f"| - the node's around them (MetaTensor in, label map out, findings) | "
            f"{med['predict'] - med['preprocessing'] - med['inferer'] - med['postprocessing']:.2f}"
            " |",
            f"| mask file, SEG and SR ({', '.join(bundle['objects'])}) | {med['results']:.2f} |",
            f"| **whole job** | **{med['job']:.2f}** |",
            f"| the bundle's own forward (inferer alone on the preprocessed tensor, warm) | "
            f"{forward:.2f} |",
            "",
            f"Whole job / forward: **{med['job'] / forward:.2f}** (target < 1.3: "
            f"{'met' if med['job'] / forward < 1.3 else 'not met'}); the inferer inside the "
            f"job / alone: {med['inferer'] / forward:.2f}; the bundle's own pipeline "
            f"(pre + inferer + post) / forward: "
            f"{(med['preprocessing'] + med['inferer'] + med['postprocessing']) / forward:.2f}; "
            "whole job / the bundle's own pipeline (what the node adds to what MONAI runs): "
            f"{med['job'] / (med['preprocessing'] + med['inferer'] + med['postprocessing']):.2f}. "
            f"First (cold) forward {bundle['forward_first']:.2f} s; model load "
            f"{bundle['model_load_s']:.1f} s (neither in the job). RSS: node after receiving "
            f"{bundle['rss_node_mb']:.0f} MB, bundle loaded {bundle['rss_loaded_mb']:.0f} MB, "
            f"before the jobs {bundle['rss_before_jobs_mb']:.0f} MB, **peak during the job "
            f"{med['peak']:.0f} MB** (sampled every 20 ms; the process's maxrss "
            f"{bundle['peak_process_mb']:.0f} MB). Labelled voxels {bundle['voxels']} "
            "(seeded, untrained weights).",
            "",
        ]
    if command:
        lines += [
            f"## Command model: {command['files']}-slice series ({command['inputs_mb']:.0f} MB),"
            f" median of {args.command_runs}",
            "",
            "| program | bare s | through the node s | overhead s | node / bare | of it: copy "
            "inputs + job.json | program | check + move out/ |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for ms, row in command["rows"].items():
            lines.append(
                f"| python, sleep {ms} ms, copy a SEG | {row['bare']:.3f} | {row['node']:.3f} | "
                f"{row['node'] - row['bare']:.3f} | {row['node'] / row['bare']:.2f} | "
                f"{row['inputs']:.3f} | {row['command']:.3f} | {row['outputs']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-bundle":
        files_dir, bundle, storage, runs, out = argv[1:6]
        result = bundle_child(Path(files_dir), Path(bundle), Path(storage), int(runs))
        Path(out).write_text(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=parse_shape, default=(512, 512, 300))
    parser.add_argument("--network", choices=sorted(NETWORKS), default="zoo")
    parser.add_argument("--roi", type=parse_shape, default=(96, 96, 96))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--command-runs", type=int, default=5)
    parser.add_argument("--command-slices", type=int, default=300)
    parser.add_argument("--sleep-ms", type=int, nargs="+", default=[0, 1000])
    parser.add_argument("--skip-bundle", action="store_true")
    parser.add_argument("--skip-command", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        bundle = None if args.skip_bundle else run_bundle(args, root)
        files_dir = Path(bundle["files_dir"]) if bundle and args.shape[2] >= args.command_slices \
            else None  # fmt: skip
        command = None if args.skip_command else run_command(args, root, files_dir)
    print(report(args, bundle, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
