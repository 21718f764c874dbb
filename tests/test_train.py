"""Training: a tiny run checkpoints atomically and resumes exactly where it stopped."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from commandline import UsageError
from model.train import TrainConfig, build, load_checkpoint, lr_factor, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {
    "norm": "bn",
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 32,
    "detections_per_img": 10,
}


def _tiny(out_dir: Path, max_steps: int) -> TrainConfig:
    """r18_fpn on two 64-pixel synthetic images; lr steps inside the run so resuming must restore them."""
    return TrainConfig(
        arch="r18_fpn",
        synthetic=3,
        synthetic_seed=1,
        min_size=48,
        max_size=64,
        batch_size=2,
        lr=0.01,
        max_steps=max_steps,
        warmup_steps=1,
        lr_steps=[1],
        checkpoint_every=10,
        keep_checkpoints=0,
        log_every=1,
        out_dir=str(out_dir),
        device="cpu",
        model=TINY_MODEL,
    )


def test_lr_schedule() -> None:
    cfg = TrainConfig(warmup_steps=10, warmup_factor=0.1, lr_steps=[20, 30], gamma=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(5, cfg) == pytest.approx(0.55)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(20, cfg) == pytest.approx(0.1)
    assert lr_factor(35, cfg) == pytest.approx(0.01)


def test_config_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "cfg.json"
    values = {"arch": "r18_fpn", "synthetic": 10, "lr_steps": [5], "model": {"norm": "bn"}}
    path.write_text(json.dumps(values))
    cfg, resume, _ = parse_args(["--config", str(path), "--lr", "0.5", "--lr-steps", "7", "8"])
    assert (cfg.arch, cfg.synthetic, cfg.model) == ("r18_fpn", 10, {"norm": "bn"})
    assert (cfg.lr, cfg.lr_steps) == (0.5, [7, 8])  # flags override the file
    assert resume is None
    path.write_text(json.dumps({"typo_key": 1}))
    with pytest.raises(UsageError, match="typo_key"):
        parse_args(["--config", str(path)])


def test_channels_last_flag_sets_the_models_layout() -> None:
    """On by default: the run's convolutions (and so its activations) are NHWC; --no-channels-last keeps NCHW."""
    layouts = (torch.channels_last, torch.contiguous_format)
    for flags, layout, other in (([], *layouts), (["--no-channels-last"], *reversed(layouts))):
        cfg, _, _ = parse_args(["--synthetic", "4", "--model", json.dumps(TINY_MODEL), *flags])
        model, _, _ = build(cfg, 3, torch.device("cpu"), verbose=False)
        weight = model.backbone.body.conv1.weight  # [64, 3, 7, 7]: the two layouts' strides differ
        assert weight.is_contiguous(memory_format=layout) and not weight.is_contiguous(memory_format=other)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path: Path) -> None:
    """Two steps straight through == one step, stop, resume, one more step: same step count, optimizer
    state, scheduler and weights."""
    torch.set_num_threads(1)  # shared CPU; also keeps float reductions in one order
    straight = train(_tiny(tmp_path / "straight", 2), progress=False)
    first = train(_tiny(tmp_path / "split", 1), progress=False)
    ckpt1 = load_checkpoint(first)
    assert ckpt1["step"] == 1 and ckpt1["class_names"][0] == "__background__"
    assert {"arch", "num_classes", "min_size", "max_size"} <= set(ckpt1["config"])
    assert ckpt1["config"]["num_classes"] == 5
    cfg, resume, _ = parse_args(["--resume", "--out-dir", str(tmp_path / "split"), "--max-steps", "2"])
    assert resume == str(tmp_path / "split" / "last.pt")
    assert cfg == dataclasses.replace(_tiny(tmp_path / "split", 2), num_classes=5)  # config from checkpoint
    resumed = train(cfg, resume=resume, progress=False)

    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a["step"] == b["step"] == 2
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 2
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(b["optimizer"]["param_groups"][0]["lr"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys() and a["optimizer"]["state"]
    for k, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], msg=name)

    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    terms = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert terms <= set(log[0])
    files = sorted(p.name for p in (tmp_path / "split").iterdir())
    assert not [f for f in files if f.endswith(".tmp")], files  # nothing half-written left behind
    assert {"checkpoint_0000001.pt", "checkpoint_0000002.pt", "last.pt", "config.json"} <= set(files)


def test_failed_save_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    """A save that fails half way (here: an unpicklable object) must leave the previous file intact and
    no temporary file behind."""
    from model.train import atomic_save

    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises
        atomic_save({"step": 2, "bad": lambda: None}, path)
    assert load_checkpoint(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_trains_on_a_coco_folder_with_an_empty_image(tmp_path: Path) -> None:
    """The COCO path of training, including an image without annotations (kept as a negative)."""
    import shutil

    from model.data.shapes import write_coco

    torch.set_num_threads(1)
    data = tmp_path / "data"
    ann = write_coco(data, num=2, seed=3)
    coco = json.loads(ann.read_text())
    shutil.copy(data / "images" / coco["images"][0]["file_name"], data / "images" / "empty.png")
    coco["images"].append({**coco["images"][0], "id": 99, "file_name": "empty.png"})
    ann.write_text(json.dumps(coco))
    cfg = dataclasses.replace(_tiny(tmp_path / "run", 1), synthetic=None, data=str(data), batch_size=3)
    ckpt = load_checkpoint(train(cfg, progress=False))
    assert ckpt["step"] == 1
    assert ckpt["class_names"] == ["__background__", "circle", "square", "triangle", "star"]


def test_init_weights_skips_class_specific_layers(tmp_path: Path) -> None:
    """Fine-tuning start: a 3-class model's weights initialize a 5-class model, except the layers whose
    shape depends on the number of classes."""
    from model import build_model
    from model.fine_tune import load_initial_weights, resolve_initial_weights

    torch.manual_seed(0)
    source = build_model("r18_fpn", num_classes=3, norm="bn")
    torch.save({"model": source.state_dict()}, tmp_path / "pretrained.pt")
    target = build_model("r18_fpn", num_classes=5, norm="bn")
    report = load_initial_weights(target, resolve_initial_weights(tmp_path / "pretrained.pt"))
    skipped = report.fresh
    assert report.unused == skipped and skipped  # exactly the class-dependent tensors, nothing else
    assert len(skipped) == 6 and all("predictor" in k for k in skipped), skipped  # cls, box, mask logits
    src, dst = source.state_dict(), target.state_dict()
    for k, v in dst.items():
        if k not in skipped:
            torch.testing.assert_close(v, src[k], msg=k)


def _quick(out_dir: Path, max_steps: int, **changes) -> TrainConfig:
    """_tiny with 64-pixel images only and a slim network: a step well under a second."""
    model = {**TINY_MODEL, "width": 16, "fpn_channels": 32, "representation_size": 32, "mask_channels": 16}
    return dataclasses.replace(_tiny(out_dir, max_steps), model=model, lr_steps=[100], **changes)


def test_validation_during_training_keeps_the_best(tmp_path: Path) -> None:
    """val_data + eval_every: COCO AP in log.jsonl and TensorBoard, best.pt the checkpoint of the best
    evaluation."""
    from model.data.shapes import write_coco

    torch.set_num_threads(1)
    write_coco(tmp_path / "val", num=2, seed=1000)
    cfg = _quick(tmp_path / "run", 2, val_data=str(tmp_path / "val"), eval_every=1, eval_metric="bbox/AP50")
    train(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert {"AP", "AP50", "AP75"} <= set(evals[0]["eval"]["segm"]) and "bbox" in evals[0]["eval"]
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    values = [r["eval"]["bbox"]["AP50"] for r in evals]
    assert best["run"]["best_step"] == best["step"] == 1 + values.index(max(values))
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))


def test_resume_applies_changed_optimizer_settings_and_refuses_a_changed_batch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    train(_quick(tmp_path / "run", 1), progress=False)
    resume = str(tmp_path / "run" / "last.pt")
    cfg, _, _ = parse_args(["--resume", resume, "--max-steps", "2", "--lr", "0.5", "--momentum", "0.5"])
    ckpt = load_checkpoint(train(cfg, resume=resume, progress=False))
    assert ckpt["config"]["lr"] == 0.5
    decay, no_decay = ckpt["optimizer"]["param_groups"]
    assert decay["lr"] == pytest.approx(0.5 * lr_factor(2, cfg)) and decay["momentum"] == 0.5
    assert no_decay["weight_decay"] == 0.0
    cfg, _, _ = parse_args(["--resume", resume, "--max-steps", "3", "--batch-size", "3"])
    with pytest.raises(UsageError, match="batch_size 2 -> 3"):
        train(cfg, resume=resume, progress=False)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    train(_quick(tmp_path / "run", 1), progress=False)
    with pytest.raises(UsageError, match="already holds a run.*--resume"):
        train(_quick(tmp_path / "run", 1), progress=False)
    train(_quick(tmp_path / "run", 1), progress=False, overwrite=True)
    assert [r["step"] for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())] == [1]


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_leaves_a_checkpoint_to_resume(tmp_path: Path, signum: int, status: int) -> None:
    """SIGTERM (schedulers) or SIGINT (Ctrl-C, to the process group) after a completed step: the step in
    progress finishes, a
    checkpoint of it is written, the exit status says which signal; --resume reads the very batch the
    uninterrupted run would have read next."""
    from model.data.sampler import ResumableSampler, aspect_ratio_groups
    from model.data.shapes import ShapesDataset

    cfg = _quick(tmp_path / "run", 200, checkpoint_every=1000, num_workers=1)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(dataclasses.asdict(cfg)))
    command = [sys.executable, "-m", "model.train", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.exists() and len(log.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signum)  # the whole group, as Ctrl-C does: the DataLoader's worker gets it too
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == status, stderr
    assert "Traceback" not in stderr and "--resume --out-dir" in stderr.strip().splitlines()[-1]
    step = load_checkpoint(tmp_path / "run" / "last.pt")["step"]
    logged = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert 2 <= step == logged[-1] < 200
    done = subprocess.run([*command, "--resume", "--max-steps", str(step + 1)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    record = json.loads(log.read_text().splitlines()[-1])
    source = ShapesDataset(cfg.synthetic, cfg.synthetic_seed)
    groups = aspect_ratio_groups([source.image_size(i) for i in range(len(source))], cfg.aspect_ratio_group_factor)
    expected = next(iter(ResumableSampler(groups, cfg.batch_size, cfg.seed, start_step=step)))
    assert record["step"] == step + 1 and record["image_ids"] == [i % len(source) + 1 for i in expected]
