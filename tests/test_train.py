"""Training: a tiny run checkpoints atomically and resumes exactly where it stopped."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model.train import TrainConfig, load_checkpoint, lr_factor, parse_args, train

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
    cfg, resume = parse_args(["--config", str(path), "--lr", "0.5", "--lr-steps", "7", "8"])
    assert (cfg.arch, cfg.synthetic, cfg.model) == ("r18_fpn", 10, {"norm": "bn"})
    assert (cfg.lr, cfg.lr_steps) == (0.5, [7, 8])  # flags override the file
    assert resume is None
    path.write_text(json.dumps({"typo_key": 1}))
    with pytest.raises(ValueError, match="typo_key"):
        parse_args(["--config", str(path)])


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
    cfg, resume = parse_args(["--resume", "--out-dir", str(tmp_path / "split"), "--max-steps", "2"])
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
    from model.train import load_initial_weights

    torch.manual_seed(0)
    source = build_model("r18_fpn", num_classes=3, norm="bn")
    torch.save({"model": source.state_dict()}, tmp_path / "pretrained.pt")
    target = build_model("r18_fpn", num_classes=5, norm="bn")
    skipped, fresh = load_initial_weights(target, tmp_path / "pretrained.pt")
    assert skipped == fresh and skipped  # exactly the class-dependent tensors, nothing else
    assert len(skipped) == 6 and all("predictor" in k for k in skipped), skipped  # cls, box, mask logits
    src, dst = source.state_dict(), target.state_dict()
    for k, v in dst.items():
        if k not in skipped:
            torch.testing.assert_close(v, src[k], msg=k)
