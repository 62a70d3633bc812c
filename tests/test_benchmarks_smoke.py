"""The GPU speed benchmarks run end to end in a tiny CPU configuration (the numbers mean
nothing here; a GPU session runs ``benchmarks/gpu_checks.sh``). Each prints one table row
per (batch, mode); on the CPU the graphs mode falls back and says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--device", "cpu", "--batch-sizes", "2", "--steps", "1", "--warmup", "1", "--profile-steps", "0",
         "--image-size", "32", "--modes", "eager,graphs", "--no-compile", "--precision", "fp32"]
FALLBACK = "not captured: CUDA graphs need a CUDA device, this run is on cpu"


def bench(script: str, *args: str, graphs: bool = True) -> str:
    proc = subprocess.run([sys.executable, script, *SMOKE, *args], cwd=REPO / "benchmarks", capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("note: --capture graphs:") == int(graphs)  # said once
    return proc.stdout


def table_rows(out: str, label: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(f"| {label} |")]


def test_mae_mfu_smoke():
    out = bench("mae_mfu.py", "--backbone", "timm:vit_tiny_patch16_224")
    rows = table_rows(out, "MAE vit_tiny_patch16_224")
    assert [(r[1], r[2]) for r in rows] == [("2", "eager"), ("2", "graphs")]
    assert rows[0][8] == "" and rows[1][8] == FALLBACK
    assert all(float(r[4].replace(",", "")) >= 0 and r[3].endswith(" ms") for r in rows)


def test_mae_mfu_top_ops_and_task_options():
    """``--top-kernels`` lists the step's operators (on the CPU by their own CPU time) with shares that
    add up to at most 100 %; ``--task-opt target=pixels`` reaches the task (the row's label says so)."""
    out = bench("mae_mfu.py", "--backbone", "timm:vit_tiny_patch16_224", "--modes", "eager", "--profile-steps", "1",
                "--top-kernels", "5", "--task-opt", "target=pixels", graphs=False)
    ops = [line.split() for line in out.splitlines() if line.startswith("  cpu op ")]
    assert len(ops) == 5 and any(op[-1].startswith("aten::") for op in ops)
    shares = [float(op[4]) for op in ops]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.01
    assert [r[2] for r in table_rows(out, "MAE vit_tiny_patch16_224 target=pixels")] == ["eager"]


def test_vit_ceiling_smoke():
    proc = subprocess.run([sys.executable, "vit_ceiling.py", "--device", "cpu", "--model", "vit_tiny_patch16_224",
                           "--batch-sizes", "2", "--steps", "1", "--warmup", "1", "--no-compile"],
                          cwd=REPO / "benchmarks", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(proc.stdout, "vit_tiny_patch16_224 (eager)")
    assert len(rows) == 1 and rows[0][1] == "2" and float(rows[0][4]) > 0  # TFLOP/s from counted FLOPs


def test_optimizer_step_smoke():
    proc = subprocess.run([sys.executable, "optimizer_step.py", "--models", "resnet18", "--reps", "1"],
                          cwd=REPO / "benchmarks", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("resnet18"))
    assert float(line.split("ratio ")[1]) > 0


def test_simclr_r50_speed_smoke_with_the_timm_reference():
    out = bench("simclr_r50_speed.py", "--backbone", "timm:resnet18")
    rows = table_rows(out, "SimCLR resnet18")
    assert [(r[1], r[2]) for r in rows] == [("2", "eager"), ("2", "graphs")] and rows[1][8] == FALLBACK
    timm_rows = [line for line in out.splitlines() if line.startswith("| 4 | False |")]
    assert len(timm_rows) == 1 and "(batch 2)" in timm_rows[0]


def test_gpu_scripts_parse():
    for script in ("gpu_checks.sh", "gpu_mfu_probe.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)]).returncode == 0, script


def test_lightly_recipes_train_the_sslkit_backbone_and_save_a_run_dir(tmp_path):
    """Every lightly recipe of benchmarks/lightly_tasks.py (task_table.py --lightly) takes one
    optimizer step with the sslkit run's settings and saves an encoder that loads into the
    sslkit backbone, its weights moved from their initial values (the recipe trains that backbone)."""
    import json

    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    sys.path.insert(0, str(REPO / "benchmarks"))
    import lightly_tasks

    from sslkit.registry import create_backbone

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    for method in lightly_tasks.METHODS:
        vit = method in ("mae", "simmim")
        backbone, opts = ("timm:vit_tiny_patch16_224", {"patch_size": 8}) if vit else ("timm:resnet18", {})
        run = tmp_path / f"sslkit-{method}"
        run.mkdir()
        (run / "run.json").write_text(json.dumps({
            "task": method, "backbone": backbone, "backbone_options": opts,
            "input_spec": {"channels": 3, "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
            "config": {"batch_size": 4, "base_lr": 1e-3, "weight_decay": 0.05, "optimizer": "adamw", "betas": [0.9, 0.95]},
            "optimization": {"lr": 1e-3, "warmup_steps": 0}}))
        cost = lightly_tasks.train(method, tmp_path / "data", run, tmp_path / f"lightly-{method}", steps=1, seed=3)
        assert cost["steps"] == 1 and np.isfinite(cost["final_loss"]) and cost["cpu_s"] >= 0, method
        torch.manual_seed(3)
        initial = create_backbone(backbone, 3, 32, **opts).state_dict()
        saved = load_file(str(tmp_path / f"lightly-{method}" / "encoder.safetensors"))
        assert saved.keys() == initial.keys(), method
        weight = "model.blocks.0.attn.qkv.weight" if vit else "model.conv1.weight"  # moved only by a gradient step
        assert not torch.equal(saved[weight], initial[weight]), method
        info = json.loads((tmp_path / f"lightly-{method}" / "run.json").read_text())
        assert info["task"] == f"{method} (lightly {lightly_tasks.LIGHTLY_VERSION})" and info["backbone"] == backbone


def test_task_table_variants_are_scored_paired_beside_random_init_and_the_default(tmp_path):
    """task_table.py's variant table: the gain over random init and the difference to the task's
    default run are paired differences over the same test images; a variant at another budget
    has no default to compare with. link_split tolerates links a second process made."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import task_table
    from _data import link_split
    from task_table_variants import variant_batch, variant_flag

    default = {"correct": "1100110000"}
    variants = {"v": {"correct": "1110110000", "random": "1000010000", "task": "simclr", "budget": 0.5, "steps": 9, "base_lr": 0.003,
                      "flags": "--warmup-epochs 0.1"},
                "w": {"correct": "1110110000", "random": "1000010000", "task": "simclr", "budget": 2.0, "steps": 36,
                      "flags": ""}}
    rows = table_rows(task_table.variant_report(variants, {"simclr": default}, 0.5), "v")
    rows += table_rows(task_table.variant_report(variants, {"simclr": default}, 0.5), "w")
    # v - random: 3 of 10 images gained, none lost: +0.3, SE sqrt(0.7 * 0.3 * 10 / 9 / 10) = 0.153;
    # v - default: 1 image gained: +0.1, SE 0.1; accuracy 0.5, SE sqrt(0.25 / 9) = 0.167
    assert rows[0][3] == "0.003" and rows[1][3] == "-"
    # a variant's own batch is taken out of its flags, to calibrate its step apart
    assert variant_batch(["--base-lr", "3e-3", "--batch-size", "32"], 128) == (32, ["--base-lr", "3e-3"])
    assert variant_batch(["--base-lr", "3e-3"], 128) == (128, ["--base-lr", "3e-3"])
    # and its own backbone, calibrated with that backbone
    assert variant_flag(["--backbone", "timm:vit_tiny_patch16_224", "--base-lr", "1"], "--backbone") == (
        "timm:vit_tiny_patch16_224", ["--base-lr", "1"])
    assert variant_flag(["--base-lr", "1"], "--backbone") == (None, ["--base-lr", "1"])
    assert rows[0][6:] == ["50.0 ± 16.7", "20.0", "+30.0 (15.3)", "yes", "+10.0 (10.0)"]
    assert rows[1][2] == "`-`" and rows[1][-1] == "-"

    xv = {"x": {"folds": [0.90, 0.92, 0.94, 0.91, 0.93], "random": [0.88, 0.89, 0.90, 0.88, 0.90], "task": "simclr",
                "budget": 0.6, "steps": 40, "flags": "--base-lr 1e-3", "base_lr": 0.001}}
    row = table_rows(task_table.xray_variant_report(xv, {"simclr": {"folds": [0.91, 0.92, 0.93, 0.92, 0.91]}}, 0.6),
                     "x")[0]
    # per-fold gains 0.02, 0.03, 0.04, 0.03, 0.03: +0.030, SE sqrt(0.0002 / 4) / sqrt(5) = 0.0032;
    # minus the default: -0.01, 0, 0.01, -0.01, 0.02: +0.002, SE sqrt(0.00068 / 4) / sqrt(5) = 0.0058
    assert row[3] == "0.001" and row[6:] == ["0.920 ± 0.007", "0.890", "+0.030 (0.003)", "yes", "+0.002 (0.006)"]

    src = tmp_path / "a.jpg"
    src.write_bytes(b"x")
    (tmp_path / "split" / "c").mkdir(parents=True)
    (tmp_path / "split" / "c" / "a.jpg").symlink_to(src)  # as a concurrent call leaves it
    assert (link_split({"c": [src]}, tmp_path / "split") / "c" / "a.jpg").resolve() == src.resolve()


def test_vit_pooling_copy_embeds_the_mean_of_the_normed_patch_tokens_with_the_same_weights(tmp_path):
    """vit_pooling.py scores copies of a run with the same weights: ``avg`` embeds the mean of the
    normed patch tokens (the options the backbone gives), ``token`` the class token, even when the
    run's own run.json asks for the mean (as a mae run's does)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from tests.conftest import make_images, tiny_run
    from vit_pooling import pooled_run

    from sslkit.run import load_run

    run = tiny_run(f"folder:{make_images(tmp_path / 'img')}", tmp_path / "r", 32, "--backbone",
                   "timm:vit_tiny_patch16_224", "--backbone-opt", "patch_size=8", "--backbone-opt", "depth=2")
    (tmp_path / "tmp").mkdir()
    token_copy, avg_copy = (pooled_run(run, pool, tmp_path / "tmp") for pool in ("token", "avg"))
    # a mae run's own run.json asks for the mean: its token copy must still give the class token
    avg_json = json.loads((avg_copy / "run.json").read_text())
    (tmp_path / "mae").mkdir()
    (tmp_path / "mae" / "run.json").write_text(json.dumps(avg_json))
    (tmp_path / "mae" / "encoder.safetensors").symlink_to(run / "encoder.safetensors")
    mae_token = pooled_run(tmp_path / "mae", "token", tmp_path / "tmp")
    plain = load_run(run).build_encoder(True).eval()
    token, avg, token2 = (load_run(r).build_encoder(True).eval() for r in (token_copy, avg_copy, mae_token))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        tokens = token.model.forward_features(x)  # (B, 1 + 16, D), after the final norm
        torch.testing.assert_close(avg(x), tokens[:, 1:].mean(1))
        for encoder in (token, token2, plain):
            torch.testing.assert_close(encoder(x), tokens[:, 0])
        assert not torch.allclose(avg(x), token(x))


def test_task_table_scores_each_task_beside_random_init_of_the_encoder_it_embeds_with(cli, rgb_folder, tmp_path):
    """mae embeds with the mean of its patch tokens, simmim with the class token: one ViT at random init
    gives two baselines, so task_table.py keys each random baseline by the options the run was built
    with (run.json), not by the table's architecture alone (a shared key scored one task's runs beside
    the other's pooling)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import task_table
    from sslkit.embed import embed, open_run

    runs = {}
    for task in ("mae", "simmim"):
        runs[task] = tmp_path / task
        result = cli("pretrain", "--task", task, "--data", f"folder:{rgb_folder}", "--out", runs[task],
                     "--backbone", "timm:vit_tiny_patch16_224", "--backbone-opt", "patch_size=8", "--image-size", 32,
                     "--batch-size", 4, "--max-steps", 1, "--epochs", 1, "--quiet")
        assert result.exit_code == 0, result.output
    keys = {task: task_table.run_arch(run) for task, run in runs.items()}
    assert keys["simmim"] == "timm:vit_tiny_patch16_224 patch_size=8 32px"
    assert keys["mae"].startswith("timm:vit_tiny_patch16_224 patch_size=8 global_pool=avg")
    assert keys["mae"] != keys["simmim"]
    embeddings = []
    for run in runs.values():  # the same random weights (same seed), embedded the way each task embeds
        torch.manual_seed(0)
        embeddings.append(embed(open_run(str(run), weights=False), f"folder:{rgb_folder}", batch_size=8,
                                progress=False).embeddings)
    assert embeddings[0].shape == embeddings[1].shape and not np.allclose(embeddings[0], embeddings[1], atol=1e-3)


def test_probe_keeps_each_test_images_knn_verdict_equal_to_a_second_embedding_pass(tmp_path):
    """``_common.probe`` stores each test image's kNN (k=20) verdict from the embeddings it already
    made; benchmarks/cifar10.py pairs two runs with it instead of embedding the bank again. It must be
    the string :func:`_common.knn_correct_string` computes from a fresh pass, image for image."""
    from tests.conftest import make_images, tiny_run

    sys.path.insert(0, str(REPO / "benchmarks"))
    import _common

    bank = make_images(tmp_path / "bank", n_per_class=12, seed=1)
    test = make_images(tmp_path / "test", n_per_class=10, seed=2)
    run = tiny_run(f"folder:{bank}", tmp_path / "run")
    got = _common.probe(run, bank, test, baseline=True)
    again = _common.knn_correct_string(run, bank, test, True)
    assert len(again) == 20 and set(again) <= {"0", "1"}
    assert got["pretrained"]["correct_k20"] == again
    assert _common.acc_se(again)[0] == got["pretrained"]["k=20"]["top1"]
    # the random encoder's verdicts are mixed (the trained one's may all be right): the order is checked
    random_again = _common.knn_correct_string(run, bank, test, False)
    assert got["random"]["correct_k20"] == random_again and "0" in random_again and "1" in random_again


def test_task_table_keeps_one_set_of_settings_per_work_dir(tmp_path):
    """task_table.py records the settings its stage names do not carry (batch, budgets, seed, image
    counts and sizes, X-ray settings) in ``table-settings`` and refuses another set in one line; a dir
    from before the batch was recorded ran 128; one that recorded only the batch gets the rest recorded;
    the seed is in the split folders' names only in new dirs."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import task_table
    from sslkit.config import defaults

    assert task_table.sslkit_default("batch_size") == defaults()["batch_size"]
    a = SimpleNamespace(work=tmp_path / "new", batch_size=64, budget_min=0.5, seed=0, pretrain_images=300,
                        eval_train=200, eval_test=100, xray_budget_min=0.6, xray_images=1500, xray_batch_size=32,
                        report_only=False)
    rec = task_table.check_table_settings(task_table.SharedStages(a.work), a)
    assert rec["seed_in_split_names"] and rec["batch_size"] == 64 and rec["eval_test"] == 100
    assert json.loads((a.work / "state.json").read_text())["table-settings"] == rec
    assert task_table.check_table_settings(task_table.SharedStages(a.work), a) == rec  # the same again: fine
    for change in ({"batch_size": 32}, {"budget_min": 1.0}, {"seed": 1}, {"eval_test": 200}):
        with pytest.raises(SystemExit, match="holds runs made with .*use a new --work"):
            task_table.check_table_settings(task_table.SharedStages(a.work), SimpleNamespace(**{**vars(a), **change}))
    old = tmp_path / "old"  # before the record: batch 128
    old.mkdir()
    (old / "state.json").write_text(json.dumps({"pretrain-cifar-simclr-default": {}}))
    ro = SimpleNamespace(**{**vars(a), "work": old, "report_only": True})
    with pytest.raises(SystemExit, match="batch-size 128"):
        task_table.check_table_settings(task_table.ReadOnlyStages(old), ro)
    task_table.check_table_settings(task_table.ReadOnlyStages(old), SimpleNamespace(**{**vars(ro), "batch_size": 128}))
    only_batch = tmp_path / "only-batch"  # recorded the batch only: the rest is accepted, then recorded
    only_batch.mkdir()
    (only_batch / "state.json").write_text(json.dumps({"table-settings": {"batch_size": 64}, "calibrate-x": {}}))
    rec = task_table.check_table_settings(task_table.SharedStages(only_batch), SimpleNamespace(**{**vars(a), "work": only_batch}))
    assert rec["budget_min"] == 0.5 and "seed_in_split_names" not in rec
