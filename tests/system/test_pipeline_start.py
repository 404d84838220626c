"""Starting weights in the pipeline: stages that build on earlier stages, the start as the baseline,
the verdict and the exported best backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfsup import SelfsupError
from selfsup.models import BackboneSpec
from selfsup.pipeline import pipeline_main

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--backbone.width",
    "8",
    "--data.batch_size",
    "32",
    "--wandb.enabled",
    "false",
    "--stages.relative_location.max_epochs",
    "1",
    "--stages.simclr.max_epochs",
    "1",
    "--evaluations.linear.max_epochs",
    "2",
    "--stages.relative_location.model",
    '{"per_patch_norm": true, "optimizer": {"lr": 0.002}, "head_hidden": 32}',
]


def run(config: str, images: Path, out: Path, *args: str) -> dict:
    """``selfsup pipeline`` with configs/pipeline/CONFIG on ``images`` into ``out``, tiny, plus ``args``."""
    return pipeline_main(
        [
            "--config",
            str(REPO / f"configs/pipeline/{config}"),
            "--data.root",
            str(images),
            "--out",
            str(out),
            *TINY,
            *args,
        ]
    )


def backbone_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    return {
        k: v for k, v in state.items() if k.startswith("backbone.") and "running" not in k and "num_batches" not in k
    }


def test_chain_starts_simclr_from_relative_location(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = run(
        "chain.yaml",
        image_folder,
        out,
        # A rate of 0 leaves SimCLR's weights where they started: relative location's.
        "--stages.simclr.model",
        '{"optimizer": {"name": "adam", "lr": 0.0, "weight_decay": 0.0}, "proj_hidden": 32}',
    )
    rl, simclr = (backbone_weights(out / n / "checkpoints" / "last.ckpt") for n in ("relative_location", "simclr"))
    assert rl.keys() == simclr.keys() and all(torch.equal(rl[k], simclr[k]) for k in rl)
    # ... and a random initialization it is not.
    fresh = BackboneSpec(width=8).build().state_dict()
    assert not torch.equal(fresh["stem.0.weight"], rl["backbone.stem.0.weight"])
    assert s["starts"] == {"relative_location": None, "simclr": "relative_location"}
    recorded = json.loads((out / "simclr" / "stage.json").read_text())
    assert recorded["hparams"]["backbone"]["weights"] == str(out / "relative_location" / "checkpoints" / "last.ckpt")
    assert "SimCLR started from relative location." in (out / "summary.md").read_text()
    assert "start" not in s["results"] and s["start"] is None  # no starting weights: random init is the reference


def test_the_start_is_the_baseline_with_deltas_a_verdict_and_an_export(image_folder: Path, tmp_path: Path) -> None:
    start = tmp_path / "start.pt"
    source = BackboneSpec(width=8).build()
    with torch.no_grad():  # weights of their own, as a model trained elsewhere has
        for p in source.parameters():
            p.mul_(1.5)
    torch.save(source.state_dict(), start)
    out = tmp_path / "out"
    s = run(
        "quickstart.yaml",
        image_folder,
        out,
        "--backbone.weights",
        str(start),
        "--stages.simclr.model",
        '{"temperature": 0.5, "optimizer": {"name": "adam", "lr": 0.002}, "proj_hidden": 32}',
    )
    r = s["results"]
    assert list(r) == ["random", "start", "relative_location", "simclr"]
    assert s["start"] == str(start) and s["starts"] == {"relative_location": str(start), "simclr": str(start)}
    for entry in ("random", "relative_location", "simclr"):
        d = r[entry]["delta_vs_start"]
        assert set(d) >= {"linear_top1", "knn_top1", "rankme"}
        assert d["linear_top1"] == pytest.approx(r[entry]["linear_top1"] - r["start"]["linear_top1"], abs=1e-6)
    assert "delta_vs_start" not in r["start"]
    for entry in r.values():
        assert 1 <= entry["rankme"] <= 32  # width 8: 32 features
    # The start's figures are those of its weights: a probe of the start is not one of random init.
    assert r["start"]["rankme"] != r["random"]["rankme"]
    v = s["verdict"]
    assert v["best"] in r and v["signal"] == "labels" and v["evaluation"] == "linear" and v["n_images"] == 30
    assert v["text"] and "\n" not in v["text"]
    best = out / "best" / "backbone.pt"
    assert v["exported"] == str(best) and best.is_file()
    card = json.loads((out / "best" / "backbone.pt.json").read_text())
    assert card["entry"] == v["best"] and card["format"] == "plain" and card["verdict"]["best"] == v["best"]
    # The exported backbone starts a new stage with the winner's features.
    x = torch.rand(4, 3, 32, 32)
    exported = BackboneSpec(width=8, weights=str(best)).build().eval()
    if v["best"] == "start":
        expected = BackboneSpec(width=8, weights=str(start)).build().eval()
    elif v["best"] == "random":
        expected = None
    else:
        expected = BackboneSpec(width=8, weights=str(out / v["best"] / "checkpoints" / "last.ckpt")).build().eval()
    if expected is not None:
        with torch.no_grad():
            assert torch.allclose(exported(x), expected(x), atol=1e-6)
    table = (out / "summary.md").read_text()
    assert "the start (your weights)" in table and "**Verdict.**" in table and "RankMe" in table
    assert "(+" in table or "(-" in table  # differences to the start, in points


def test_the_order_of_starts_is_checked_before_anything_trains(image_folder: Path, tmp_path: Path) -> None:
    base = ["--config", str(REPO / "configs/pipeline/chain.yaml"), "--data.root", str(image_folder), *TINY]
    out = tmp_path / "out"
    with pytest.raises(SelfsupError, match="stages.relative_location starts from simclr, which runs after it"):
        pipeline_main([*base, "--out", str(out), "--stages.relative_location.start_from", "simclr"])
    with pytest.raises(SelfsupError, match="stages.simclr starts from itself"):
        pipeline_main([*base, "--out", str(out), "--stages.simclr.start_from", "simclr"])
    with pytest.raises(SelfsupError, match="starts from moco, which is no stage of this pipeline"):
        pipeline_main([*base, "--out", str(out), "--stages.simclr.start_from", "moco"])
    with pytest.raises(SelfsupError, match="which is switched off"):
        pipeline_main([*base, "--out", str(out), "--stages.relative_location.enabled", "false"])
    with pytest.raises(SelfsupError, match="no backbone.weights to start from"):
        pipeline_main([*base, "--out", str(out), "--stages.simclr.start_from", "start"])
    # backbone.weights naming a stage is the same as start_from.
    with pytest.raises(SelfsupError, match="stages.relative_location starts from simclr, which runs after it"):
        pipeline_main(
            [*base, "--out", str(out), "--stages.relative_location.model", '{"backbone": {"weights": "simclr"}}']
        )
    # Another architecture than the stage it starts from: stopped before training, not after the first stage.
    with pytest.raises(SelfsupError, match="starts from relative_location's backbone, but builds another"):
        pipeline_main([*base, "--out", str(out), "--stages.simclr.model", '{"backbone": {"width": 16}}'])
    assert not out.exists() or not any(out.glob("*/checkpoints"))


def test_without_labels_the_verdict_ranks_by_rankme(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = run(
        "quickstart.yaml",
        image_folder,
        out,
        "--data.labels",
        "none",
        "--stages.relative_location.enabled",
        "false",
        "--stages.simclr.model",
        '{"temperature": 0.5, "optimizer": {"name": "adam", "lr": 0.002}, "proj_hidden": 32}',
    )
    r = s["results"]
    assert set(r) == {"random", "simclr"} and all(set(e) == {"rankme", "seconds"} for e in r.values())
    v = s["verdict"]
    assert v["signal"] == "rankme" and v["scores"] == {k: e["rankme"] for k, e in r.items()}
    assert "weaker" in v["text"] and (out / "best" / "backbone.pt").is_file()
    assert s["num_classes"] is None and "RankMe alone" in (out / "summary.md").read_text()


def test_a_teacher_is_an_earlier_stage_or_the_start(image_folder: Path, tmp_path: Path) -> None:
    config = tmp_path / "teacher.yaml"
    stage = {"max_epochs": 1, "warmup": {"warmup_epochs": 0}}
    adam = {"name": "adam", "lr": 0.002}
    stages = {
        "simclr": {**stage, "config": "configs/simclr/cifar10.yaml", "model": {"optimizer": adam, "proj_hidden": 32}},
        "distill": {
            **stage,
            "config": "configs/distill/cifar10.yaml",
            "start_from": "random",
            "model": {"optimizer": adam, "teacher": {"name": "small_cnn", "width": 8, "weights": "simclr"}},
        },
    }
    knn = {"config": "configs/knn/cifar10.yaml", "max_epochs": 0}
    config.write_text(json.dumps({"backbone": {"name": "small_cnn"}, "stages": stages, "evaluations": {"knn": knn}}))
    base = ["--config", str(config), "--data.root", str(image_folder), *TINY[:6]]
    out = tmp_path / "out"
    s = pipeline_main([*base, "--out", str(out)])
    recorded = json.loads((out / "distill" / "stage.json").read_text())["hparams"]["teacher"]
    assert recorded["weights"] == str(out / "simclr" / "checkpoints" / "last.ckpt")
    assert s["starts"]["distill"] is None and set(s["results"]) == {"random", "simclr", "distill"}
    # The teacher must come first and be the stage's backbone; both checked before anything trains.
    later = tmp_path / "later"
    with pytest.raises(SelfsupError, match="stages.simclr learns from distill, which runs after it"):
        pipeline_main([*base, "--out", str(later), "--stages.simclr.model", '{"teacher": {"weights": "distill"}}'])
    with pytest.raises(SelfsupError, match="stages.distill learns from simclr's backbone, but its teacher is another"):
        wider = '{"teacher": {"name": "small_cnn", "width": 16, "weights": "simclr"}}'
        pipeline_main([*base, "--out", str(later), "--stages.distill.model", wider])
    with pytest.raises(SelfsupError, match="stages.distill learns from the start, but there is no backbone.weights"):
        pipeline_main([*base, "--out", str(later), "--stages.distill.model", '{"teacher": {"weights": "start"}}'])
    assert not later.exists() or not any(later.glob("*/checkpoints"))
