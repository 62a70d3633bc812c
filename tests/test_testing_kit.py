"""The contract kit fails where a plugin breaks a rule, with a message naming the rule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sslkit.api import (Callback, GraphPreprocessing, MultiView, SampleMode, SampleRef, Source, Task, Undecodable,
                        UsageError, recipe, write_atomic)
from sslkit.testing import check_backbone, check_callback, check_exporter, check_source, check_task


@dataclass
class NoOptions:
    pass


class Base(Task):
    Options = NoOptions
    default_backbone = "timm:resnet18"

    def __init__(self, backbone, options, spec):
        super().__init__(backbone, options, spec)
        self.head = nn.Linear(backbone.num_features, 4)

    def views(self, spec):
        return MultiView([recipe("simclr", spec.image_size)], spec.mean, spec.std)

    def forward(self, views):
        return {"loss": self.head(self.encoder(views[0])).square().mean()}


class NaNLoss(Base):
    def forward(self, views):
        return {"loss": super().forward(views)["loss"] * float("nan")}


class NoOverride(Base):
    def views(self, spec):
        return lambda x: (x,)


class ReservedKey(Base):
    def forward(self, views):
        out = super().forward(views)
        return {**out, "lr": out["loss"].detach()}


class HiddenState(Base):
    """Keeps a step counter outside the state dict: a resumed run starts it again at 0."""

    calls = 0

    def forward(self, views):
        self.calls += 1
        return {"loss": super().forward(views)["loss"] * self.calls}


class UnfitDefault(Base):
    """Fits its default ResNet with an option a ResNet does not take."""

    @classmethod
    def default_backbone_options(cls, image_size):
        return {"patch_size": 8} if image_size < 96 else {}


class ListDefault(Base):
    @classmethod
    def default_backbone_options(cls, image_size):
        return [("cifar_stem", True)]


@dataclass
class WidthOption:
    width: int | None = None  # default: from the image size


class ResolvesWidth(Base):
    Options = WidthOption

    def __init__(self, backbone, options, spec):
        super().__init__(backbone, options, spec)
        self.width = options.width or spec.image_size // 4


class ResolvesAnotherName(ResolvesWidth):
    def resolved_options(self):
        return {"size": self.width}


class ResolvesNone(ResolvesWidth):
    def resolved_options(self):
        return {"width": None}


class ResolvesOnce(ResolvesWidth):
    """Resolves ``width`` to twice what it is given: rebuilt from its run.json it would differ."""

    def resolved_options(self):
        return {"width": 2 * self.width}


@pytest.mark.parametrize("cls,needle", [(ResolvesAnotherName, r"names \['size'\], which are not options"),
                                        (ResolvesNone, r"leaves \['width'\] at None"),
                                        (ResolvesOnce, "--resume would rebuild another task")])
def test_check_task_catches_resolved_options_a_resume_cannot_rebuild(cls, needle, tmp_path):
    with pytest.raises(AssertionError, match=needle):
        check_task(cls, tmp_path=tmp_path, channels=(1,), export=False, resume=False, steps=1)


def test_check_task_builds_the_default_backbone_as_fitted(tmp_path):
    """The kit trains on a tiny stand-in, but first builds what ``pretrain`` without --backbone would."""
    with pytest.raises(AssertionError, match=r"UnfitDefault's default backbone 'timm:resnet18' with \{'patch_size': 8\} "
                                             r"\(what sslkit pretrain builds without --backbone at 32 px\) cannot be "
                                             r"built: cannot build timm:resnet18"):
        check_task(UnfitDefault, tmp_path=tmp_path, channels=(1,), export=False, resume=False, steps=1)
    with pytest.raises(AssertionError, match=r"default_backbone_options\(32\) must return a dict"):
        check_task(ListDefault, tmp_path=tmp_path, channels=(1,), export=False, resume=False, steps=1)


@pytest.mark.parametrize("cls,needle", [(NaNLoss, "loss"), (NoOverride, "override"), (ReservedKey, "'lr'")])
def test_check_task_catches_a_broken_task(cls, needle, tmp_path):
    with pytest.raises(AssertionError, match=needle):
        check_task(cls, tmp_path=tmp_path, channels=(1,), export=False, resume=False, steps=1)


def test_the_kits_own_volume_source_passes_the_source_kit(tmp_path):
    from sslkit.testing.data import KitVolumes, volume_folder

    folder = volume_folder(tmp_path / "v", 3, (8, 6, 6))
    report = check_source(KitVolumes, str(folder), tmp_path=tmp_path / "k", options={"volume_size": "8,6,6"})
    assert report["loaded"] == 3 and report["channels"] == [1] and report["graph"] == "unit"


def test_check_task_on_volumes_needs_a_task_that_trains_on_them(tmp_path):
    with pytest.raises(AssertionError, match="does not train on volumes"):
        check_task(Base, tmp_path=tmp_path, volume=(16, 16, 16))


def test_check_task_catches_state_a_resume_loses(tmp_path):
    with pytest.raises(AssertionError, match="resumed from step 1, the losses differ"):
        check_task(HiddenState, tmp_path=tmp_path, channels=(1,), export=False)


class Arrays(Source):
    scheme = "arrays"

    def index(self):
        return [SampleRef(str(p)) for p in sorted(Path(self.location).glob("*.npy"))]

    def load(self, ref):
        return np.load(ref.path).astype(np.float32)


class Unscaled(Arrays):
    def load(self, ref):
        return super().load(ref) * 255


class FakePaths(Arrays):
    def index(self):
        return [SampleRef(self.location + "/image#1")]


class Unpicklable(Arrays):
    def __init__(self, location, options=None):
        super().__init__(location, options)
        self.handle = open(__file__)


class IgnoresDamage(Arrays):
    def load(self, ref):
        try:
            return super().load(ref)
        except Exception:
            return np.zeros((1, 8, 8), np.float32)


class GraphAsDict(Arrays):
    def graph_preprocessing(self):
        return {"kind": "window", "window": [{"lower": 0, "upper": 1}]}


class GraphBakesInAnUnknownOption(Arrays):
    def graph_preprocessing(self):
        return GraphPreprocessing("window", (0.0,), (1.0,), options=("level",))


class GraphWindowsMismatchChannels(Arrays):
    def graph_preprocessing(self):  # three windows, but the arrays load one channel
        return GraphPreprocessing("window", (0.0, 0.0, 0.0), (1.0, 2.0, 3.0))


class ByIndex(Arrays):
    """Loads a sample by what ``index()`` saw (as the nifti and dicom sources do): a path it
    never indexed is a KeyError, so the damaged copy has to go through a source of its own."""

    def index(self):
        refs = super().index()
        self.seen = {r.id: r.path for r in refs}
        return refs

    def load(self, ref):
        return np.load(self.seen[ref.id]).astype(np.float32)


class ByIndexIgnoresDamage(ByIndex):
    def load(self, ref):
        try:
            return super().load(ref)
        except KeyError:
            raise
        except Exception:
            return np.zeros((1, 8, 8), np.float32)


class ByIndexWrapsTheLookup(ByIndexIgnoresDamage):
    """Reports an unknown file as Undecodable (as the dicom source does), so its load of the
    copy raises; only a source of its own on the copy shows it makes up pixels."""

    def load(self, ref):
        try:
            return super().load(ref)
        except KeyError as exc:
            raise Undecodable(f"KeyError: {exc}") from None


class Volumes(Arrays):
    """``--sample volume`` at 4x6x6: each array as a (1, 4, 6, 6) volume."""

    sample = SampleMode("volume", size=(4, 6, 6))

    def load(self, ref):
        x = super().load(ref)[:, None, :6, :6]
        return np.ascontiguousarray(np.broadcast_to(x, (x.shape[0], 4, 6, 6)))


class VolumesOfAnotherSize(Volumes):
    def load(self, ref):
        return super().load(ref)[:, :, :, :5]


class VolumesAsSlices(Volumes):
    def load(self, ref):
        return super().load(ref)[:, 0]


def test_check_source_passes_indexed_and_volumetric_sources(arrays, tmp_path):
    report = check_source(ByIndex, arrays, tmp_path=tmp_path / "k1")
    assert report["damaged"] == "a source on the damaged file fails every load"  # its own source read the copy
    assert check_source(Volumes, arrays, tmp_path=tmp_path / "k2")["loaded"] == 3


@pytest.mark.parametrize("cls,needle", [
    (ByIndexIgnoresDamage, "load of a truncated file returned an array of shape \\(1, 8, 8\\)"),
    (ByIndexWrapsTheLookup, "load of a truncated file returned an array of shape \\(1, 8, 8\\)"),
    (VolumesOfAnotherSize, r"sampling volumes of \(4, 6, 6\), want \(C, 4, 6, 6\), got \(1, 4, 6, 5\)"),
    (VolumesAsSlices, r"want \(C, 4, 6, 6\), got \(1, 6, 6\)"),
])
def test_check_source_catches_a_broken_indexed_or_volumetric_source(cls, needle, arrays, tmp_path):
    with pytest.raises(AssertionError, match=needle):
        check_source(cls, arrays, tmp_path=tmp_path)


@pytest.fixture
def arrays(tmp_path) -> str:
    (tmp_path / "a").mkdir()
    for i in range(3):
        np.save(tmp_path / "a" / f"{i}.npy", np.random.default_rng(i).random((1, 8, 8)))
    return str(tmp_path / "a")


def test_check_source_passes_a_good_source(arrays, tmp_path):
    report = check_source(Arrays, arrays, tmp_path=tmp_path)
    assert report["damaged"].startswith("load raises") and report["graph"] == "pixels"


@pytest.mark.parametrize("cls,needle", [(Unscaled, r"\[0, 1\]"), (FakePaths, "not an existing file"),
                                        (Unpicklable, "does not pickle"), (IgnoresDamage, "instead of raising"),
                                        (GraphAsDict, "not sslkit.api.GraphPreprocessing"),
                                        (GraphBakesInAnUnknownOption, r"options \['level'\] that are not fields"),
                                        (GraphWindowsMismatchChannels, "export --with-preprocessing refuses")])
def test_check_source_catches_a_broken_source(cls, needle, arrays, tmp_path):
    with pytest.raises(AssertionError, match=needle):
        check_source(cls, arrays, tmp_path=tmp_path)


class Tiny(nn.Module):
    def __init__(self, in_chans, out=8):
        super().__init__()
        self.in_chans, self.num_features = in_chans, 8
        self.conv = nn.Conv2d(in_chans, out, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def good_factory(model, in_chans, image_size, **options):
    if model != "tiny":
        raise UsageError(f"unknown model {model!r}")
    if options:
        raise UsageError(f"tiny has no option {', '.join(sorted(options))}")
    return Tiny(in_chans)


def test_check_backbone_passes_a_good_factory_and_catches_bad_ones():
    assert check_backbone(good_factory, "tiny")["num_features"] == 8
    with pytest.raises(AssertionError, match="expected"):
        check_backbone(lambda m, in_chans, image_size: Tiny(in_chans, out=5), "tiny")
    with pytest.raises(AssertionError, match="unknown model name must raise"):
        check_backbone(lambda m, in_chans, image_size: Tiny(in_chans), "tiny")


class Flat3D(Tiny):
    """Declares volumes but is built of 2D convolutions: a (B, C, D, H, W) batch fails."""

    spatial_dims = 3


class Tiny3D(nn.Module):
    spatial_dims = 3

    def __init__(self, in_chans):
        super().__init__()
        self.in_chans, self.num_features = in_chans, 8
        self.conv = nn.Conv3d(in_chans, 8, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3, 4))


def factory_of(cls):
    def create(model, in_chans, image_size, **options):
        good_factory(model, in_chans, image_size, **options)  # the unknown-model and unknown-option errors
        return cls(in_chans)

    return create


def test_check_backbone_runs_a_3d_backbone_on_volumes():
    assert check_backbone(factory_of(Tiny3D), "tiny", image_size=8)["spatial_dims"] == 3
    with pytest.raises(AssertionError, match=r"spatial_dims 3, but \(B, C, D, H, W\) input"):
        check_backbone(factory_of(Flat3D), "tiny", image_size=8)


def test_check_exporter_catches_stray_files_and_ignored_options(tmp_path):
    def sloppy(encoder, spec, metadata, out, *, samples, samples_note, log, **options):
        torch.save(encoder.state_dict(), out)
        Path(str(out) + ".tmp").write_text("left behind")
        return {}

    def lenient(encoder, spec, metadata, out, *, samples, samples_note, log, **options):
        write_atomic(Path(out), lambda tmp: torch.save(encoder.state_dict(), tmp))
        return {}

    with pytest.raises(AssertionError, match="left other files behind"):
        check_exporter(sloppy, tmp_path=tmp_path / "a")
    with pytest.raises(AssertionError, match="unknown exporter option"):
        check_exporter(lenient, tmp_path=tmp_path / "b")


def test_check_exporter_on_volumes_compares_a_reloaded_3d_encoder(tmp_path):
    pytest.importorskip("monai")
    from sslkit.sample_modes import build_backbone

    def state_dict_exporter(encoder, spec, metadata, out, *, samples, samples_note, log, **options):
        if options:
            raise UsageError(f"no option {', '.join(options)}")
        assert samples.shape == (4, 1, 8, 16, 16) and spec.volume_size == (8, 16, 16) and spec.sample == "volume"
        write_atomic(Path(out), lambda tmp: torch.save(encoder.state_dict(), tmp))
        return {"keys": len(encoder.state_dict())}

    def reload(keep_weights):
        def load(out):
            net = build_backbone("monai:resnet10", 1, 16, (8, 16, 16)).eval()
            if keep_weights:
                net.load_state_dict(torch.load(out, weights_only=True))
            return lambda x: net(torch.from_numpy(x)).detach().numpy()
        return load

    report = check_exporter(state_dict_exporter, tmp_path=tmp_path / "a", volume=(8, 16, 16), reload=reload(True))
    assert report["keys"] > 10
    with pytest.raises(AssertionError, match="the reloaded file differs"):  # a fresh 3D network, not the file's
        check_exporter(state_dict_exporter, tmp_path=tmp_path / "b", volume=(8, 16, 16), reload=reload(False))


class Counts(Callback):
    """Counts the steps it saw: a well-behaved callback."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, step, metrics):
        self.steps.append((step, metrics["loss"]))


class RaisesAtStep2(Counts):
    def on_step_end(self, step, metrics):
        if step == 2:
            raise ConnectionError("tracker unreachable")


class ForgetsResume(Counts):
    """Assumes every run starts at step 1 (a tracker that opens a run only on step 1)."""

    def on_run_start(self, run):
        self.open = not run.resumed

    def on_step_end(self, step, metrics):
        if not self.open:
            raise RuntimeError("no tracker run is open")


class WantsFinalLoss(Counts):
    def on_run_end(self, summary):
        print(f"final loss {summary['final_loss']:.3f}")


def test_check_callback_passes_a_well_behaved_callback(tmp_path):
    report = check_callback(Counts, tmp_path=tmp_path)
    assert report["callback"].startswith("kit-") and "failed" in report["failed"]
    assert report["events"] == {"on_step_end": 3}  # only the events it handles (Callback's no-ops are not)


@pytest.mark.parametrize("cls,needle", [
    (RaisesAtStep2, "raised ConnectionError in on_step_end during a new run: tracker unreachable"),
    (ForgetsResume, "raised RuntimeError in on_step_end during a resumed run"),
    (WantsFinalLoss, "fails after step 1: on_run_end raised KeyError"),
    (lambda: object(), "with none of on_run_start"),
])
def test_check_callback_catches_a_broken_callback(cls, needle, tmp_path):
    with pytest.raises(AssertionError, match=needle):
        check_callback(cls, tmp_path=tmp_path)
