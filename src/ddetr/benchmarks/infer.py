"""Benchmarks: ``python -m ddetr.bench infer`` times batch-1 inference of every deployment path.

Models (random weights, nothing downloaded; latency does not depend on the weights):

- ``small``: the default run's small model (``conf/model/small.yaml``: ResNet-18 through layer3, 3
  levels, hidden 64, two-stage with box refinement, 50 queries) on a 96x96 image, its evaluation size;
- ``r50``: the official R50 Deformable DETR (multi-scale, 300 queries, 6 + 6 layers, 91 classes) on
  one 800x1333 image.

Paths on the CPU (``--threads`` for every runtime): ``transformers`` (its eager fp32
``DeformableDetrForObjectDetection`` of the same configuration, R50 only: the reference),
``eager`` (ddetr in PyTorch with the compiled attention op), ``compiled`` (``torch.compile`` of
that), ``ort-grid_sample`` / ``ort-gather`` / ``ort-int8`` (onnxruntime on the ONNX exports of
``python -m ddetr.export``, int8 = ``quantize=int8`` of the gather graph), ``ov-fp32`` / ``ov-int8``
(OpenVINO's CPU runtime, f32 inference precision; int8 by NNCF). With a GPU also ``cuda-fp32``,
``cuda-bf16``, ``cuda-compiled`` and ``ort-cuda``. The int8 paths are calibrated on
``--calibration`` random images here: their speed does not depend on the calibration, their accuracy
does (docs/deploy.md measures that on real images).

Every path runs once per round and the rounds alternate the paths, so a load change on a shared
machine touches all of them alike; the table gives the median and the quartiles over ``--repeat``
rounds after ``--warmup`` rounds, and the speed-up of each median over the reference's (or, without
the reference, over ``eager``). A path that fails prints its error and the others go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ddetr.benchmarks.table import text_table

CPU_PATHS = ("transformers", "eager", "compiled", "ort-grid_sample", "ort-gather", "ort-int8", "ov-fp32", "ov-int8")
GPU_PATHS = ("cuda-fp32", "cuda-bf16", "cuda-compiled", "ort-cuda")
SETUPS = {"small": (96, 96), "r50": (800, 1333)}


@dataclasses.dataclass
class Row:
    """One path's latencies (ms, one per timed round) or its error."""

    setup: str
    path: str
    times: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None


def build_model(setup: str) -> torch.nn.Module:
    """ddetr's detector of ``setup`` in eval mode, random weights."""
    from ddetr.benchmarks.model import Setup, ddetr_config
    from ddetr.models.build import build_deformable_detr

    if setup == "r50":
        return build_deformable_detr(ddetr_config(Setup(), "multi_scale")).eval()
    from hydra.utils import instantiate

    from ddetr.app import compose

    model_cfg = compose(["model=small"], config_name="train").model
    return instantiate(model_cfg, num_classes=6, _convert_="all").model.eval()


def export_forms(
    model: torch.nn.Module, setup: str, folder: Path, calibration: int, paths: list[str]
) -> dict[str, Path]:
    """The ONNX (grid_sample, gather, int8) and OpenVINO (fp32, int8) files the ``paths`` need, written into
    ``folder`` as ``python -m ddetr.export`` writes them (dynamic sizes, no mask input)."""
    from ddetr.inference.export import ExportableDetector, example_inputs, export_onnx
    from ddetr.inference.quantize import quantize_onnx, quantize_openvino
    from ddetr.models.ms_deform_attn import set_attention_backend

    height, width = SETUPS[setup]
    trace_size = (max(height, 128), max(width, 128))  # every level at least 2x2 while tracing
    generator = torch.Generator().manual_seed(1)
    batches = [{"images": torch.randn(1, 3, height, width, generator=generator).numpy()} for _ in range(calibration)]
    files: dict[str, Path] = {}
    for backend, name in (("pytorch", "ort-grid_sample"), ("gather", "ort-gather")):
        needed = name in paths or (backend == "gather" and any(p in paths for p in ("ort-int8", "ov-fp32", "ov-int8")))
        if not needed:
            continue
        set_attention_backend(model, backend)
        files[name] = folder / f"{setup}_{backend}.onnx"
        print(f"[{setup}] exporting {files[name].name} ...", flush=True)
        export_onnx(ExportableDetector(model), example_inputs(2, *trace_size, with_mask=False), files[name])
    if "ort-int8" in paths:
        files["ort-int8"] = folder / f"{setup}_int8.onnx"
        print(f"[{setup}] quantizing {files['ort-int8'].name} on {calibration} random images ...", flush=True)
        quantize_onnx(files["ort-gather"], files["ort-int8"], batches)
    if "ov-fp32" in paths or "ov-int8" in paths:
        import openvino

        ov_model = openvino.convert_model(str(files["ort-gather"]))
        files["ov-fp32"] = folder / f"{setup}_fp32.xml"
        openvino.save_model(ov_model, str(files["ov-fp32"]), compress_to_fp16=False)
        if "ov-int8" in paths:
            print(f"[{setup}] quantizing with NNCF on {calibration} random images ...", flush=True)
            files["ov-int8"] = folder / f"{setup}_int8.xml"
            openvino.save_model(quantize_openvino(ov_model, batches), str(files["ov-int8"]), compress_to_fp16=False)
    set_attention_backend(model, "auto")
    return files


def onnxruntime_runner(
    path: Path, threads: int, provider: str = "CPUExecutionProvider"
) -> Callable[[np.ndarray], object]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=[provider])
    return lambda images: session.run(None, {"images": images})


def openvino_runner(path: Path, threads: int) -> Callable[[np.ndarray], object]:
    import openvino

    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    request = core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request()
    return lambda images: request.infer({"images": images})


def torch_runner(model: torch.nn.Module, device: str, bf16: bool = False) -> Callable[[np.ndarray], object]:
    def run(images: np.ndarray) -> object:
        batch = torch.from_numpy(images).to(device)
        mask = torch.zeros(batch.shape[0], *batch.shape[2:], dtype=torch.bool, device=device)
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=bf16):
            outputs = model((batch, mask))
        if device == "cuda":
            torch.cuda.synchronize()
        return outputs

    return run


def transformers_runner(setup: str) -> Callable[[np.ndarray], object]:
    from ddetr.benchmarks.model import Setup, transformers_model

    model = transformers_model(Setup(), "multi_scale").eval()

    def run(images: np.ndarray) -> object:
        batch = torch.from_numpy(images)
        with torch.inference_mode():
            return model(pixel_values=batch, pixel_mask=torch.ones(batch.shape[0], *batch.shape[2:], dtype=torch.long))

    return run


def make_runners(setup: str, paths: list[str], threads: int, folder: Path, calibration: int) -> dict[str, Callable]:
    """The runner of every path of ``paths`` (a path whose set-up fails gets a runner that raises its error)."""
    model = build_model(setup)
    files = {}
    try:
        files = export_forms(model, setup, folder, calibration, paths)
    except Exception as error:  # noqa: BLE001 - the PyTorch paths still run
        print(f"[{setup}] export failed: {type(error).__name__}: {error}", flush=True)
    runners: dict[str, Callable] = {}
    for path in paths:
        try:
            if path == "transformers":
                if setup != "r50":
                    continue  # transformers has no model of the small architecture (layer3 backbone)
                runners[path] = transformers_runner(setup)
            elif path == "eager":
                runners[path] = torch_runner(model, "cpu")
            elif path == "compiled":
                runners[path] = torch_runner(torch.compile(model), "cpu")
            elif path.startswith("ort-") and path != "ort-cuda":
                runners[path] = onnxruntime_runner(files[path], threads)
            elif path.startswith("ov-"):
                runners[path] = openvino_runner(files[path], threads)
            elif path == "ort-cuda":
                runners[path] = onnxruntime_runner(files["ort-gather"], threads, "CUDAExecutionProvider")
            elif path.startswith("cuda-"):
                gpu_model = build_model(setup).cuda()
                gpu_model = torch.compile(gpu_model) if path == "cuda-compiled" else gpu_model
                runners[path] = torch_runner(gpu_model, "cuda", bf16=path == "cuda-bf16")
        except Exception as error:  # noqa: BLE001 - reported in its row
            message = f"{type(error).__name__}: {error}".splitlines()[0][:200]

            def failed(_: np.ndarray, message: str = message) -> object:
                raise RuntimeError(message)

            runners[path] = failed
    return runners


def measure(setup: str, runners: dict[str, Callable], warmup: int, repeat: int) -> list[Row]:
    """Alternated rounds: every path once per round, ``warmup`` rounds untimed, then ``repeat`` timed."""
    height, width = SETUPS[setup]
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0)).numpy()
    rows = {name: Row(setup, name) for name in runners}
    for round_index in range(warmup + repeat):
        for name, run in runners.items():
            row = rows[name]
            if row.error is not None:
                continue
            try:
                start = time.perf_counter()
                run(images)
                elapsed = (time.perf_counter() - start) * 1e3
            except Exception as error:  # noqa: BLE001 - reported in its row
                row.error = f"{type(error).__name__}: {error}".splitlines()[0][:160]
                print(f"[{setup}] {name} failed: {row.error}", flush=True)
                if not isinstance(error, RuntimeError):
                    traceback.print_exc()
                continue
            if round_index >= warmup:
                row.times.append(elapsed)
            print(f"[{setup}] round {round_index + 1} {name}: {elapsed:.1f} ms", flush=True)
    return list(rows.values())


def quartiles(times: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``times``."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    first, median, third = statistics.quantiles(times, n=4, method="inclusive")
    return first, median, third


def format_table(rows: list[Row]) -> str:
    """Setup, path, median, quartiles (ms) and the speed-up over the setup's reference."""
    table = []
    for setup in dict.fromkeys(row.setup for row in rows):
        ours = [row for row in rows if row.setup == setup]
        medians = {row.path: quartiles(row.times)[1] for row in ours if row.times}
        reference = "transformers" if "transformers" in medians else "eager"
        for row in ours:
            height, width = SETUPS[setup]
            if not row.times:
                table.append([setup, f"{height}x{width}", row.path, "-", "-", f"failed: {row.error}"])
                continue
            first, median, third = quartiles(row.times)
            speedup = f"{medians[reference] / median:.2f}x vs {reference}" if reference in medians else "-"
            table.append([setup, f"{height}x{width}", row.path, f"{median:.1f}", f"{first:.1f} - {third:.1f}", speedup])
    return text_table(["model", "image", "path", "median ms", "quartiles ms", "speed-up"], table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddetr.bench infer", description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="small,r50", help="comma list of small, r50")
    parser.add_argument("--paths", default=",".join(CPU_PATHS), help=f"comma list of {CPU_PATHS + GPU_PATHS}")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every runtime")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=8, help="random calibration images of the int8 paths")
    parser.add_argument("--out-dir", default=None, help="keep the exported files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = [p for p in args.paths.split(",") if p]
    if torch.cuda.is_available() and args.paths == parser.get_default("paths"):
        paths += list(GPU_PATHS)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.out_dir or temporary)
        folder.mkdir(parents=True, exist_ok=True)
        for setup in args.setups.split(","):
            runners = make_runners(setup, paths, args.threads, folder, args.calibration)
            rows += measure(setup, runners, args.warmup, args.repeat)
            print(format_table([row for row in rows if row.setup == setup]), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(
        f"\nbatch 1, {args.threads} threads, median and quartiles of {args.repeat} alternated rounds after "
        f"{args.warmup} ({device}; torch {torch.__version__})\n{format_table(rows)}"
    )
    return 0 if all(row.times for row in rows) else 1
