"""int8 against float32 on the CPU, side by side: every recipe of ``python -m export.quantize``.

1. R-50-FPN: benchmarks/export_speed's random-weight graph (batch norms calibrated, score threshold 0, so
   100 detections per image), quantized by each recipe, calibrated on shapes images (seed
   CALIBRATION_SEED) resized by the file's own policy (800/1333). Random weights score every class about
   1/91, so int8 rounding reorders the detections and nothing can be verified: these files are for speed.
   torchvision eager, the float32 graph and each int8 graph take turns at 800x1333, batch 1, one forward
   pass each per round, each engine in its own long-lived child (export_speed.alternate).
2. The bundled demo model quantized by each recipe (verified on held-out shapes images), COCO box and mask
   AP on the first ``--eval-images`` validation images (seed VALIDATION_SEED) next to float32's.
3. HTTP (benchmarks/serve_load's server and load generator): the demo model float32 and int8
   (models/demo/model.int8.onnx) each behind its own server, taking turns, round after round:
   throughput at concurrency 16, p50 latency at concurrency 1.

    python -m benchmarks.int8_speed [--rounds 7] [--recipes NAME ...] [--eval-images 100] [--http-rounds 3]

Writes its tables to benchmarks/RESULTS.md between the ``int8_speed`` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import machine, table, write_section
from benchmarks.export_speed import THREADS, _in_child, alternate, export_graph, ratio_stats
from benchmarks.serve_load import free_port, images, jpeg, load, percentile, server_env, start_server
from export.quantize.calibration import DEFAULT_CALIBRATION_IMAGES
from export.quantize.checking import Agreement, VerificationBar
from export.quantize.quantizer import quantize_model
from export.quantize.recipes import DEFAULT_RECIPE, GEOMETRY, RECIPES, Recipe
from model.data.shapes import CALIBRATION_SEED, VALIDATION_SEED, write_coco
from service.core.settings import DEFAULT_MODEL_PATH

CASE = ("800x1333, batch 1", 800, 1333, 1)
DEMO_INT8 = DEFAULT_MODEL_PATH.with_name("model.int8.onnx")
R50_CALIBRATION = 4  # the speed of a recipe does not depend on its ranges
DEMO_VERIFICATION = 32
HTTP_THRESHOLD = 0.5  # the server's default


def quantize_r50(graph: Path, calibration: Path, out: Path, recipe: str, queue) -> None:
    """In a child process: R-50's calibration holds every activation of an 800x1333 pass."""
    bar = VerificationBar(0.0, 0.0, 0.0)
    quantize_model(graph, calibration, out, RECIPES[recipe], R50_CALIBRATION, 1, bar, log=print)
    queue.put(out.stat().st_size / 2**20)


def demo_rows(recipes: list[str], calibration: Path, validation: Path, tmp: Path, limit: int) -> dict[str, dict]:
    """Each recipe on the demo model: held-out agreement with float32 and COCO AP; float32's AP too."""
    from evaluation.evaluate import evaluate_checkpoint

    def ap(path: Path) -> dict[str, float]:
        metrics = evaluate_checkpoint(path, validation, batch_size=4, limit=limit)["metrics"]
        return {"mask": 100 * metrics["segm"]["AP"], "box": 100 * metrics["bbox"]["AP"]}

    rows: dict[str, dict[str, object]] = {"float32": {"ap": ap(DEFAULT_MODEL_PATH), "agreement": None}}
    for recipe in recipes:
        out = tmp / f"demo.{recipe}.onnx"
        # A bar of 0: every recipe gets a file to evaluate; whether it meets the real bar is reported.
        agreement = quantize_model(DEFAULT_MODEL_PATH, calibration, out, RECIPES[recipe], DEFAULT_CALIBRATION_IMAGES,
                                   DEMO_VERIFICATION, VerificationBar(0.0, 0.0), log=lambda _: None)
        rows[recipe] = {"ap": ap(out), "agreement": agreement}
        print(f"demo {recipe}: {rows[recipe]['ap']} | {agreement}", flush=True)
    return rows


def http_rounds(models: dict[str, Path], rounds: int, requests: int) -> dict[str, dict[str, list[float]]]:
    """Both servers up, loaded in turn: per round and model, img/s at concurrency 16 and p50 s at 1."""
    bodies = [jpeg(im) for im in images(16, (480, 640))]
    params = {"score_threshold": str(HTTP_THRESHOLD)}
    servers = {}
    try:
        for name, path in models.items():
            port = free_port()
            servers[name] = (start_server(path, port, server_env(8, 5.0, 16)), f"http://127.0.0.1:{port}")
            asyncio.run(load(servers[name][1], bodies[:2], 1, 2, params))  # warm the server's paths
        out: dict[str, dict[str, list[float]]] = {name: {"throughput": [], "p50": []} for name in models}
        for _ in range(rounds):
            for name, (_, url) in servers.items():
                wall, _, _ = asyncio.run(load(url, bodies, 16, requests, params))
                _, latencies, _ = asyncio.run(load(url, bodies, 1, requests // 2, params))
                out[name]["throughput"].append(requests / wall)
                out[name]["p50"].append(percentile(latencies, 50))
            print({name: {k: f"{v[-1]:.3f}" for k, v in row.items()} for name, row in out.items()}, flush=True)
        return out
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(60)


def int8_nodes_cell(recipe: Recipe) -> str:
    ops = "/".join(recipe.op_types)
    if GEOMETRY in recipe.families:
        return f"{ops} of every family, the padding masks' own included"
    between = "ReLUs, sums, masks, pools too" if recipe.int8_masks else "masks and what they touch float"
    return f"{ops} of {', '.join(recipe.families)}; {between}"


def agreement_cell(agreement: Agreement | None) -> str:
    if agreement is None:
        return "(reference)"
    verdict = "passes" if agreement.ok() else "**refused**"
    return (f"{agreement.matched}/{agreement.reference} matched, mask IoU {agreement.mask_iou:.3f}, "
            f"score error {agreement.mean_score_error:.4f}: {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="R-50 forward passes per engine")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    parser.add_argument("--eval-images", type=int, default=100, help="demo validation images for AP")
    parser.add_argument("--http-rounds", type=int, default=3)
    parser.add_argument("--http-requests", type=int, default=48, help="per round at concurrency 16 (half at 1)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        calibration = write_coco(tmp / "calibration", DEFAULT_CALIBRATION_IMAGES + DEMO_VERIFICATION,
                                 CALIBRATION_SEED).parent
        validation = write_coco(tmp / "validation", args.eval_images, VALIDATION_SEED).parent
        demo = demo_rows(args.recipes, calibration, validation, tmp, args.eval_images)
        graph = tmp / "r50.onnx"
        _in_child(export_graph, graph, "r50_fpn")
        engines: dict[str, Path | None] = {"torchvision": None, "float32": graph}
        sizes = {"float32": graph.stat().st_size / 2**20}
        for recipe in args.recipes:
            engines[recipe] = tmp / f"r50.{recipe}.onnx"
            sizes[recipe] = _in_child(quantize_r50, graph, calibration, engines[recipe], recipe)
        times, peak_mb = alternate(engines, CASE, args.rounds)
        http = http_rounds({"float32": DEFAULT_MODEL_PATH, "int8": DEMO_INT8}, args.http_rounds, args.http_requests)
    write_section("int8_speed", report(args, argv, demo, times, peak_mb, sizes, http))


def report(
    args: argparse.Namespace,
    argv: list[str] | None,
    demo: dict[str, dict],
    times: dict[str, list[float]],
    peak_mb: dict[str, float],
    sizes: dict[str, float],
    http: dict[str, dict[str, list[float]]],
) -> str:
    """The section: R-50 engines, the recipes table, HTTP."""
    ms = {engine: statistics.median(t) * 1000 for engine, t in times.items()}
    def speedup(base: str, engine: str) -> str:
        if engine == base:
            return "-"
        median, low, high = ratio_stats(times[base], times[engine])
        return f"{median:.2f}x ({low:.2f}-{high:.2f}x)"

    r50_rows = [
        [engine if engine in ("torchvision", "float32") else f"int8, {engine}", f"{ms[engine]:.0f}",
         speedup("float32", engine), speedup("torchvision", engine), f"{peak_mb[engine]:.0f}",
         f"{sizes[engine]:.0f}" if engine in sizes else "-"]
        for engine in times
    ]
    recipe_rows = []
    for recipe, row in demo.items():
        families = "-" if recipe == "float32" else int8_nodes_cell(RECIPES[recipe])
        speed = ratio_stats(times["float32"], times[recipe])[0] if recipe in times else 1.0
        name = f"**{recipe}** (default)" if recipe == DEFAULT_RECIPE else recipe
        recipe_rows.append([name, families, f"{speed:.2f}x", f"{row['ap']['mask']:.1f}", f"{row['ap']['box']:.1f}",
                            agreement_cell(row["agreement"])])
    http_rows = []
    for model, row in http.items():
        thr = [a / b for a, b in zip(row["throughput"], http["float32"]["throughput"], strict=True)]
        lat = [b / a for a, b in zip(row["p50"], http["float32"]["p50"], strict=True)]
        http_rows.append([model, f"{statistics.median(row['throughput']):.2f}", f"{statistics.median(thr):.2f}x",
                          f"{statistics.median(row['p50']) * 1000:.0f}", f"{statistics.median(lat):.2f}x"])
    command = "python -m benchmarks.int8_speed " + shlex.join(argv if argv is not None else sys.argv[1:])
    return "\n".join([
        "## int8: our quantized graphs (python -m export.quantize) vs our float32 graph vs torchvision eager",
        "",
        f"Command: `{command.strip()}` ({THREADS} threads; {machine()}).",
        "",
        f"### R-50-FPN, {CASE[0]}, 100 detections per image",
        "",
        f"Random weights (benchmarks/export_speed's graph); each recipe calibrated on {R50_CALIBRATION} shapes "
        f"images at 800/1333 (seed {CALIBRATION_SEED}). All engines take turns, one forward pass each per round, "
        f"{args.rounds} rounds; ms are medians, speed-ups the median of the rounds' ratios with their range.",
        "",
        table(["engine", "ms", "speed-up vs our float32 graph", "vs torchvision eager", "peak RSS MiB", "file MiB"],
              r50_rows),
        "",
        "### Recipes: R-50 speed against demo-model accuracy",
        "",
        f"Demo model (models/demo, shapes-demo) quantized by each recipe on {DEFAULT_CALIBRATION_IMAGES} shapes "
        f"images (seed {CALIBRATION_SEED}), verified against float32 on the next {DEMO_VERIFICATION} (detections "
        "scoring >= 0.5 matched by label and box IoU >= 0.9; the bar: 90% matched, mask IoU 0.9); COCO AP on "
        f"the first {args.eval_images} validation images (seed {VALIDATION_SEED}). R-50 speed-up from the table "
        "above.",
        "",
        table(["recipe", "int8 nodes", "R-50 speed-up", "demo mask AP", "demo box AP",
               "held-out agreement with float32"], recipe_rows),
        "",
        "### The demo model through the HTTP service, float32 vs int8",
        "",
        f"models/demo/model.onnx and model.int8.onnx, each behind its own `python -m service` (max batch 8, max "
        f"wait 5 ms), loaded in turn for {args.http_rounds} rounds: {args.http_requests} requests at concurrency "
        f"16, then {args.http_requests // 2} at concurrency 1, on 16 distinct 480x640 JPEGs, score threshold "
        f"{HTTP_THRESHOLD:g}. Medians over the rounds; ratios per round against float32.",
        "",
        table(["model", "img/s at concurrency 16", "throughput vs float32", "p50 ms at concurrency 1",
               "p50 speed-up vs float32"], http_rows),
    ])


if __name__ == "__main__":
    main()
