"""``--capture``: the step from static buffers with a device-tensor LR, recorded after a
warm-up, and the clean fall-back. No CUDA here, so a stand-in recorder plays the CUDA graph
(records nothing, each replay runs the recorded body on the same static buffers and writes
the same output tensor); ``tests/test_gpu.py`` checks the real graphs on a GPU."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sslkit.engine import capture as cap
from sslkit.engine.capture import WARMUP_STEPS, StepCapture, TensorLR, blocker
from sslkit.testing import crashed_copy
from tests.conftest import make_images, run_sslkit

TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}
ARGS = dict(task="simclr", backbone="timm:vit_tiny_patch16_224", backbone_options=TINY_VIT, image_size=16,
            batch_size=4, seed=3, deterministic=True, progress=False, warmup_epochs=0.5,
            task_options={"proj_hidden_dim": 32, "proj_dim": 16})
CLI = ["--task", "simclr", "--backbone", "timm:vit_tiny_patch16_224", "--image-size", "16", "--batch-size", "8",
       "--max-steps", "2", "--seed", "3", "--quiet", "--task-opt", "proj_hidden_dim=32", "--task-opt",
       "proj_dim=16", "--device", "cpu", *[f"--backbone-opt={k}={v}" for k, v in TINY_VIT.items()]]
N = WARMUP_STEPS + 3  # steps in the in-process tests: warm-up, the recording, replays


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("capture") / "img", n_per_class=16, size=20)


@pytest.fixture(scope="module")
def plain(images, tmp_path_factory) -> list[dict[str, float]]:
    """The scalars of N plain (uncaptured) steps."""
    return values(steps(build(images, tmp_path_factory.mktemp("plain") / "run"), N))


class StandIn:
    """A recorder that behaves like a CUDA graph for what the engine can see: recording
    runs nothing; a replay reads the static inputs seen at recording (their storage must
    not change) and returns the same output tensor every time."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail, self.records, self.replays = fail, 0, 0
        self.capture: StepCapture | None = None

    def __call__(self, body, stream):
        if self.fail is not None:
            raise self.fail
        self.records += 1
        ptrs = [b.data_ptr() for b in self.capture.inputs]
        out: list[torch.Tensor] = []

        def replay() -> torch.Tensor:
            assert [b.data_ptr() for b in self.capture.inputs] == ptrs, "static inputs were reallocated"
            self.replays += 1
            v = body()
            if not out:
                out.append(v.clone())
            out[0].copy_(v)
            return out[0]

        return replay


def build(images: Path, out: Path, **kw):
    from sslkit.engine import build as engine_build
    from sslkit.run import RunConfig

    return engine_build(RunConfig(data=f"folder:{images}", out=str(out), epochs=2, **{**ARGS, **kw}),
                        torch.device("cpu"))


def attach(s, recorder: StandIn, mode: str = "graphs", said: list | None = None) -> StepCapture:
    c = StepCapture(s, mode, recorder=recorder, say=(said if said is not None else []).append)
    recorder.capture, s.capture = c, c
    return c


def steps(s, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` optimizer steps through the engine's train_step; scalars read only at the end
    (as the loop reads them late), so a reused output buffer would show."""
    from sslkit.engine import RunState, train_step

    state, out = RunState(), []
    batches = s.loader.epoch(0)
    try:
        for _ in range(n):
            out.append(train_step(s, state, batches))
    finally:
        batches.close()
    return out


def values(rows: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    return [{k: v.item() for k, v in r.items()} for r in rows]


def test_static_buffer_step_equals_the_plain_step(images, tmp_path, plain):
    """Also with the batches as the cache's uint16 (what a CUDA run copies), scaled inside
    the recorded step."""
    s = build(images, tmp_path / "b")
    s.loader.raw = True
    rec = StandIn()
    c = attach(s, rec)
    assert torch.is_tensor(s.optimizer.param_groups[0]["lr"])
    got = values(steps(s, N))
    assert rec.records == 1 and rec.replays == N - WARMUP_STEPS and c.captured and c.active
    assert c.inputs[0].dtype == torch.uint16
    assert got == plain  # every scalar, bit for bit (losses after LR-scheduled updates)
    assert len({r["loss"] for r in got}) == N


def test_raw_batches_scaled_on_the_device_equal_the_float_batches():
    import numpy as np

    from sslkit.data.loader import BatchLoader, to_unit

    pixels = np.random.default_rng(0).integers(0, 65536, (12, 3, 5, 5), dtype=np.uint16)
    pixels[0, 0, 0, :3] = [0, 65535, 32768]
    floats, raw = BatchLoader(pixels, 4, 0, pin_memory=False), BatchLoader(pixels, 4, 0, pin_memory=False, raw=True)
    for idx in (floats.indices(0, 0), floats.indices(1, 2), np.arange(12)):
        r = raw.read(idx)
        assert r.dtype == torch.uint16 and r.element_size() == 2
        assert torch.equal(to_unit(r), floats.read(idx))
    assert [x.dtype for x in raw.epoch(0)] == [torch.uint16] * 3


def test_static_buffers_with_accumulation_and_clipping(images, tmp_path):
    """Two static micro-batch buffers, the clipped norm from inside the recording; the
    model ends where the plain run's does."""
    kw = dict(accumulate=2, grad_clip=1.0, batch_size=2)  # 32 images: 8 steps an epoch
    a = build(images, tmp_path / "a", **kw)
    expected = values(steps(a, N))
    s = build(images, tmp_path / "b", **kw)  # build seeds every generator: after the plain run
    attach(s, StandIn())
    got = values(steps(s, N))
    assert got == expected and all("grad_norm" in r for r in got)
    assert len(s.capture.inputs) == 2
    for p, q in zip(a.task.parameters(), s.task.parameters()):
        assert torch.equal(p, q)


def test_lars_step_with_the_lr_tensor_equals_the_plain_lars_step(images, tmp_path):
    """LARS (the default of simclr, moco, vicreg and barlowtwins) reads the LR from the device tensor:
    the recorded steps equal the plain ones bit for bit, parameters included."""
    kw = dict(optimizer="lars", base_lr=1.2, lr_scaling="sqrt", weight_decay=1e-6)
    a = build(images, tmp_path / "a", **kw)
    expected = values(steps(a, N))
    s = build(images, tmp_path / "b", **kw)
    rec = StandIn()
    c = attach(s, rec)
    assert blocker(s, need_cuda=False) is None and torch.is_tensor(s.optimizer.param_groups[0]["lr"])
    got = values(steps(s, N))
    assert rec.records == 1 and rec.replays == N - WARMUP_STEPS and c.captured
    assert got == expected and len({r["loss"] for r in got}) == N
    for p, q in zip(a.task.parameters(), s.task.parameters()):
        assert torch.equal(p, q)


def test_capture_raising_falls_back_once_and_the_step_is_unchanged(images, tmp_path, plain):
    expected = plain
    s = build(images, tmp_path / "b")
    said: list[str] = []
    rec = StandIn(fail=RuntimeError("operation not permitted when stream is capturing\nmore detail"))
    c = attach(s, rec, said=said)
    got = values(steps(s, N))
    assert got == expected
    assert not c.active and not c.captured
    assert said == ["note: --capture graphs: capturing the step failed (RuntimeError: operation not permitted "
                    "when stream is capturing); the step runs eagerly"]
    assert all(isinstance(g["lr"], float) for g in s.optimizer.param_groups)  # the optimizer is plain again


def test_auto_on_cpu_is_silent_and_graphs_says_it_once(images, tmp_path):
    s = build(images, tmp_path / "a")
    said: list[str] = []
    c = StepCapture(s, "auto", say=said.append)
    assert not c.active and said == []
    c = StepCapture(s, "graphs", say=said.append)
    c.fall_back("again")
    assert not c.active and said == ["note: --capture graphs: CUDA graphs need a CUDA device, this run is on cpu; "
                                     "the step runs eagerly"]
    assert isinstance(s.optimizer.param_groups[0]["lr"], float)


def test_blocker_names_what_cannot_be_captured():
    class Capturable(torch.nn.Module):
        capturable = True

    class Declines(torch.nn.Module):
        capturable = "keeps the keys of forward for on_step_end in Python"

    def run(task=Capturable(), world=1, device="cuda", **cfg):
        base = dict(precision="bf16", optimizer="adamw", task="t")
        return SimpleNamespace(device=torch.device(device), world=world, task=task,
                               cfg=SimpleNamespace(**{**base, **cfg}))

    assert blocker(run()) is None
    assert blocker(run(device="cpu")) == "CUDA graphs need a CUDA device, this run is on cpu"
    assert blocker(run(device="cpu"), need_cuda=False) is None
    assert "DDP" in blocker(run(world=2))
    assert "fp16" in blocker(run(precision="fp16"))
    assert blocker(run(optimizer="lars")) is None
    assert blocker(run(optimizer="adam9")) == "--optimizer adam9 is not capturable (use adamw, sgd, lars)"
    assert blocker(run(task=torch.nn.Linear(1, 1))) == "task 't' does not declare itself capturable (Task.capturable)"
    assert blocker(run(task=Declines())) == "task 't' keeps the keys of forward for on_step_end in Python"


def test_shape_change_falls_back(images, tmp_path):
    s = build(images, tmp_path / "a")
    said: list[str] = []
    c = attach(s, StandIn(), said=said)
    x = torch.rand(8, 3, 16, 16)
    c.run(s, 0, iter([x]))
    out = c.run(s, 1, iter([torch.rand(4, 3, 16, 16)]))
    assert not c.active and torch.isfinite(out["loss"])
    assert said == ["note: --capture graphs: the batch shape changed to (4, 3, 16, 16); the step runs eagerly"]


def test_checkpoints_hold_a_float_lr_and_load_back_the_tensor():
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    lr = TensorLR(opt, torch.device("cpu"))
    lr.apply()
    lr.set(0.25)
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["lr"] == 0.25 and isinstance(saved["param_groups"][0]["lr"], float)
    assert saved["param_groups"][0]["capturable"] is False
    assert opt.param_groups[0]["lr"] is lr.lr  # saving left the live optimizer alone
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] is lr.lr
    plain = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    plain.load_state_dict(saved)  # a run without --capture reads the checkpoint as its own
    assert plain.param_groups[0]["lr"] == 0.25


def rows(run: Path) -> list[tuple[str, str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(r["step"], r["loss"], r["lr"]) for r in csv.DictReader(f)]


def test_resume_with_capture_repeats_the_uninterrupted_run(images, tmp_path, monkeypatch):
    """Captured in both sessions (each warms up anew), the resumed run writes the same
    metrics as the uninterrupted one."""
    from sslkit.engine import pretrain, setup
    from sslkit.run import RunConfig

    recorders: list[StandIn] = []

    def standin_capture(s):
        recorders.append(StandIn())
        return attach(s, recorders[-1])

    def cfg(out: Path, **kw) -> RunConfig:
        return RunConfig(data=f"folder:{images}", out=str(out), epochs=2, max_steps=8, checkpoint_every=2,
                         keep_checkpoints=0, **{**ARGS, **kw})

    monkeypatch.setattr(setup, "make_capture", standin_capture)
    ref = tmp_path / "ref"
    pretrain(cfg(ref))
    assert recorders[-1].replays > 0
    total = len(rows(ref))
    assert total == 8

    crashed = crashed_copy(ref, tmp_path / "crashed", keep=1)  # the run "died" after step 2
    pretrain(cfg(crashed, resume=True))
    assert recorders[-1].replays == total - 2 - WARMUP_STEPS
    assert rows(crashed) == rows(ref)


def test_cli_capture_graphs_on_cpu_says_one_line(images, tmp_path, cli):
    a = tmp_path / "a"
    proc = cli("pretrain", "--data", f"folder:{images}", "--out", a, *CLI, "--capture", "graphs")  # in-process
    assert proc.exit_code == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "--capture" in line]
    assert notes == ["note: --capture graphs: CUDA graphs need a CUDA device, this run is on cpu; "
                     "the step runs eagerly"]
    assert json.loads((a / "run.json").read_text())["config"]["capture"] == "graphs"
    assert len(rows(a)) == 2


def test_cli_rejects_an_unknown_capture_mode(images, tmp_path):
    proc = run_sslkit("pretrain", "--data", f"folder:{images}", "--out", tmp_path / "a", *CLI, "--capture", "yes")
    assert proc.returncode == 2 and not (tmp_path / "a").exists()
    assert "--capture" in proc.stderr


def test_make_capture_is_none_when_off():
    assert cap.make_capture(SimpleNamespace(cfg=SimpleNamespace(capture="off"))) is None


@pytest.mark.slow
def test_compiled_views_equal_eager_views_and_draw_the_same_random_numbers():
    """--compile compiles the views too (on CUDA); inductor compiles with a C++ compiler
    on the CPU, hence slow. Same RNG state in, same views (to float rounding) and the
    same RNG state out: a run's random stream does not depend on compiling."""
    from sslkit.views import MultiView, ViewRecipe
    from sslkit.engine.compiled import compile_views

    views = MultiView([ViewRecipe(32, blur_p=0.5, solarize_p=0.2), ViewRecipe(32, gray_p=0.5)],
                      (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    x = torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    compiled = compile_views(views)
    assert compiled is not views and compile_views(print) is print
    torch.manual_seed(5)
    eager = views(x)
    after_eager = torch.get_rng_state()
    torch.manual_seed(5)
    fused = compiled(x)
    assert torch.equal(torch.get_rng_state(), after_eager)
    for a, b in zip(eager, fused):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)  # normalised: ~4x the pixel error


def test_prefetch_passes_cpu_batches_through_and_closes_the_source():
    from sslkit.engine.transfer import prefetch_to

    closed = []

    def source():
        try:
            for i in range(5):
                yield torch.full((2,), float(i))
        finally:
            closed.append(True)

    out = prefetch_to(source(), torch.device("cpu"))
    assert [next(out).tolist() for _ in range(2)] == [[0.0, 0.0], [1.0, 1.0]]
    out.close()
    assert closed == [True]
    assert [b[0].item() for b in prefetch_to(iter([torch.zeros(1), torch.ones(1)]), torch.device("cpu"))] == [0, 1]


def test_views_the_compiler_refuses_stay_eager_and_say_so_once():
    from sslkit.engine.compiled import compile_views
    from sslkit.views import MultiView, ViewRecipe

    views = MultiView([ViewRecipe(8)], (0.5,) * 3, (0.25,) * 3)
    said: list[str] = []
    c = compile_views(views)
    c.say = said.append
    calls = []

    def refuses(x):
        calls.append(x)
        raise RuntimeError("backend compiler failed\ndetails")

    c.compiled = refuses
    x = torch.rand(2, 3, 10, 10)
    torch.manual_seed(0)
    got = c(x)
    torch.manual_seed(0)
    assert torch.equal(got[0], views(x)[0]) and c(x)[0].shape == (2, 3, 8, 8)
    assert said == ["note: --compile: the augmentation stays eager (RuntimeError: backend compiler failed)"]
    assert len(calls) == 1 and c.recipes == views.recipes  # attributes read through

    c = compile_views(views)
    c.compiled, c.proven = refuses, True  # after a compiled call worked, an error is the caller's
    with pytest.raises(RuntimeError):
        c(x)

    def out_of_memory(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    c = compile_views(views)
    c.compiled = out_of_memory  # not the compiler's failure: eagerly it would not fit either
    with pytest.raises(torch.OutOfMemoryError):
        c(x)


class CompilerCrash(Exception):
    """Stands in for torch._inductor.exc.InductorError (Triton failing inside the compiler)."""


def test_a_model_the_compiler_fails_on_trains_eagerly_said_in_one_line(images, tmp_path, monkeypatch, capsys):
    """--compile where torch's compiler crashes on the model's first call (seen on the H200:
    Triton 3.6 under torch 2.11 on SimCLR's cross-entropy): the run does not end in a
    compiler traceback; it trains eagerly, says so once, and its steps equal a run without
    --compile (the failed call ran nothing)."""
    from sslkit.engine import compiled, pretrain
    from sslkit.run import RunConfig

    attempts = []

    def crashing_compile(fn, **options):
        def call(*args, **kwargs):
            attempts.append(options)
            raise CompilerCrash("SubprocException: An exception occurred in a subprocess:\nName=triton_red_fused")
        return call

    monkeypatch.setattr(compiled.torch, "compile", crashing_compile)
    runs = {}
    for name, flag in (("compiled", True), ("eager", False)):
        runs[name] = tmp_path / name
        pretrain(RunConfig(data=f"folder:{images}", out=str(runs[name]), epochs=1, max_steps=3, compile=flag,
                           **{**ARGS, "deterministic": False}))
    assert len(attempts) == 1  # compiled once on the CPU: the model (views are compiled on CUDA only)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: --compile")]
    assert said == ["note: --compile: the model stays eager (CompilerCrash: SubprocException: An exception "
                    "occurred in a subprocess:)"]
    assert rows(runs["compiled"]) == rows(runs["eager"]) and len(rows(runs["eager"])) == 3

