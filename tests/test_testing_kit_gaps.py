"""The plugin author's journey: docs samples that run as pasted, the contract kit catching a
``check`` that is not a classmethod, a backbone that ignores unknown options, a default backbone
that cannot be built, a ``describe()`` that is not JSON; and the first pass refusing pixels a
source gives outside [0, 1] instead of clipping them silently."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from sslkit.api import Source, UsageError
from sslkit.data.pipeline import load_refs
from sslkit.data.prepare import prepare
from sslkit.testing import check_backbone, check_source, check_task
from tests.test_api_docs import DOC, example
from tests.test_testing_kit import Arrays, Base, Tiny


def test_docs_graph_preprocessing_snippet_runs_pasted_into_the_worked_source(tmp_path):
    """The indented ``graph_preprocessing`` of "A source's flags and its export graph" pasted into
    the worked ``NpyFolderSource`` (whose import line must name what it uses) passes the kit."""
    import importlib.util
    import sys

    code, name = example("sslkit_npyfolder.py")
    snippets = re.findall(r"```python\n(    def graph_preprocessing.*?)```", DOC.read_text(), flags=re.S)
    assert len(snippets) == 1
    code = code.replace("\n\n\n@hookimpl", "\n\n" + snippets[0] + "\n\n@hookimpl", 1)
    assert "def graph_preprocessing" in code
    path = tmp_path / "sslkit_npyfolder_graph.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("sslkit_npyfolder_graph", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sslkit_npyfolder_graph"] = module  # pickling the source needs its module importable
    spec.loader.exec_module(module)
    (tmp_path / "arrays").mkdir()
    for i in range(3):
        np.save(tmp_path / "arrays" / f"a{i}.npy", (np.random.default_rng(i).random((20, 24)) * 900).astype(np.int16))
    cls = module.NpyFolderSource
    assert check_source(cls, str(tmp_path / "arrays"), tmp_path=tmp_path / "k")["graph"] == "unit"
    assert check_source(cls, str(tmp_path / "arrays"), tmp_path=tmp_path / "k2",
                        options={"max_value": 900.0})["graph"] == "window"


def test_docs_install_line_is_what_new_plugin_prints(tmp_path, monkeypatch, cli):
    """The quick start's second command is the one ``sslkit new-plugin`` prints (pytest is a
    ``[test]`` extra of the generated package, not an sslkit dependency)."""
    monkeypatch.chdir(tmp_path)
    printed = cli("new-plugin", "mytask", "--kind", "task", "--out", "sslkit-mytask").output
    command = printed.split("next: ", 1)[1].strip()
    assert command == "pip install -e 'sslkit-mytask[test]' && python -m pytest sslkit-mytask"
    quick_start = DOC.read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    assert command in [line.split("  #")[0].strip() for line in quick_start.splitlines()]


class InstanceCheck(Base):
    def check(self, backbone, spec):  # as "check(backbone, spec)" reads: an instance method
        return None


class StaticCheck(Base):
    @staticmethod
    def check(backbone, spec):
        return "static checks are refused" if backbone.num_features < 0 else None


def test_check_task_wants_check_as_a_classmethod(tmp_path):
    with pytest.raises(AssertionError, match=r"InstanceCheck.check .*make check a @classmethod"):
        check_task(InstanceCheck, tmp_path=tmp_path, channels=(1,), export=False, resume=False, steps=1)


def ignores_unknown_options(model, in_chans, image_size, **options):
    if model != "tiny":
        raise UsageError(f"unknown model {model!r}")
    return Tiny(in_chans)


def test_check_backbone_wants_an_unknown_option_refused():
    with pytest.raises(AssertionError, match=r"unknown option .*must raise sslkit.api.UsageError"):
        check_backbone(ignores_unknown_options, "tiny")

    def refuses(model, in_chans, image_size, **options):
        if options:
            raise UsageError(f"tiny has no option {', '.join(options)}")
        return ignores_unknown_options(model, in_chans, image_size)

    assert check_backbone(refuses, "tiny")["num_features"] == 8


class BadDefault(Base):
    default_backbone = "timm:resnet_does_not_exist"


@pytest.mark.parametrize("backbone", [None, "timm:resnet10t"])
def test_check_task_checks_the_default_backbone_with_or_without_backbone(backbone, tmp_path):
    with pytest.raises(AssertionError, match=r"BadDefault's default backbone 'timm:resnet_does_not_exist'.*"
                                             r"cannot be built: .*resnet_does_not_exist"):
        check_task(BadDefault, tmp_path=tmp_path, backbone=backbone, channels=(1,), export=False, resume=False,
                   steps=1)


class DescribesAnObject(Arrays):
    def describe(self):
        return {"x": object()}


@pytest.fixture
def arrays(tmp_path) -> str:
    (tmp_path / "a").mkdir()
    for i in range(20):
        np.save(tmp_path / "a" / f"{i:02d}.npy", np.random.default_rng(i).random((1, 8, 8)).astype(np.float32))
    return str(tmp_path / "a")


def test_check_source_wants_describe_json_serialisable(arrays, tmp_path):
    with pytest.raises(AssertionError, match=r"DescribesAnObject.describe\(\) must return JSON-serialisable values"):
        check_source(DescribesAnObject, arrays, tmp_path=tmp_path)


class OneUnscaled(Arrays):
    """Every sample in [0, 1] but one, 0-255 (past the 8 that the full checks load)."""

    def load(self, ref):
        x = super().load(ref)
        return x * 255 if ref.path.endswith("15.npy") else x


def test_check_source_range_checks_more_samples_than_it_fully_checks(arrays, tmp_path):
    with pytest.raises(AssertionError, match=r"OneUnscaled.load\('.*15.npy'\): values must be in \[0, 1\]"):
        check_source(OneUnscaled, arrays, tmp_path=tmp_path)


class Scaled(Source):
    """``scaled:DIR``: the arrays times the factor in the file name (``x255``), or NaN (``nan``)."""

    scheme = "scaled"
    parallel_decode = False

    def index(self):
        from sslkit.api import SampleRef

        return [SampleRef(str(p)) for p in sorted(Path(self.location).glob("*.npy"))]

    def load(self, ref):
        x = np.load(ref.path).astype(np.float32)
        if "nan" in ref.path:
            x[0, 0, 0] = np.nan
        return x * float(ref.path.rsplit("x", 1)[1][:-4]) if "x" in Path(ref.path).name else x


def scaled_folder(root: Path, names: list[str]) -> Path:
    root.mkdir()
    for i, n in enumerate(names):
        x = np.random.default_rng(i).random((1, 16, 16)).astype(np.float32)
        x[0, 0, :2] = (0.0, 1.0)  # the full range: a factor shows at once
        np.save(root / f"{n}.npy", x)
    return root


def test_first_pass_skips_pixels_outside_unit_range_naming_the_source(tmp_path):
    root = scaled_folder(tmp_path / "d", ["a", "b_x255", "c_nan", "d_x1.0000005", "e_x1.01"])
    source = Scaled(str(root))
    refs = source.index()
    out = prepare(source, refs, 1, 16, cache_dir=False, progress=False)
    assert [Path(r.path).name for r in out.refs] == ["a.npy", "d_x1.0000005.npy"]  # float rounding: clipped
    assert out.pixels[:, 0, 0, :2].tolist() == [[0, 65535], [0, 65535]]
    reasons = dict(out.skipped)
    assert sorted(reasons) == ["b_x255.npy", "c_nan.npy", "e_x1.01.npy"]
    assert reasons["b_x255.npy"] == ("pixels outside [0, 1] from source 'scaled': 0 to 255 "
                                      "(Source.load must return values in [0, 1])")
    assert reasons["c_nan.npy"].startswith("pixels outside [0, 1] from source 'scaled': NaN (")
    assert reasons["e_x1.01.npy"].startswith("pixels outside [0, 1] from source 'scaled': 0 to 1.01 (")


def test_first_pass_refuses_data_whose_every_sample_is_out_of_range(tmp_path):
    root = scaled_folder(tmp_path / "d", ["a_x255", "b_x255"])
    source = Scaled(str(root))
    with pytest.raises(UsageError, match=r"^no decodable image in 'scaled:.*': all 2 samples failed to decode "
                                         r"\(first: pixels outside \[0, 1\] from source 'scaled': 0 to 255"):
        load_refs(source, source.index(), f"scaled:{root}", 16, cache_dir=False, progress=False)


def test_a_saturated_image_shrunk_a_long_way_is_kept():
    """The antialiased resize's float rounding takes a large image's white area a hair above 1 (here by more
    than 1e-6): that is sslkit's rounding, not the source's values, and is stored clipped, not skipped."""
    from sslkit.data.prepare import resize_square
    from sslkit.data.quantize import to_uint16

    x = np.random.default_rng(0).random((1, 4280, 3520), dtype=np.float32)
    x[:, :1426] = 1.0
    y = resize_square(x, 48)
    assert float(y.max()) > 1 + 1e-6  # what a tighter tolerance refused
    stored = to_uint16(y, Scaled("x"))
    assert isinstance(stored, np.ndarray) and stored.max() == 65535
    assert np.array_equal(stored, np.clip(np.rint(y * 65535.0), 0, 65535).astype(np.uint16))
