"""The contract kit, continued: what forward returns, raw errors turned into AssertionErrors,
and the built-in plugins the kit's own runs use (whatever the environment loads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sslkit.api import UsageError, write_atomic
from sslkit.testing import check_backbone, check_callback, check_exporter, check_task
from tests.test_testing_kit import Base, Counts, Tiny


class VectorLoss(Base):
    def forward(self, views):
        return {"loss": self.head(self.encoder(views[0])).square().mean(1)}


class VectorMetric(Base):
    def forward(self, views):
        return {**super().forward(views), "norms": torch.ones(len(views[0]))}


class TextMetric(Base):
    def forward(self, views):
        return {**super().forward(views), "phase": "warmup"}


class NumberMetrics(Base):
    def forward(self, views):
        return {**super().forward(views), "tau": 0.5, "k": 3}


@pytest.mark.parametrize("cls,needle", [
    (VectorLoss, r"exited 2: error: task 'kit-vectorloss' \(plugin 'sslkit.testing'\) returned a loss of shape "
                 r"\(4,\); it must be a scalar tensor$"),
    (VectorMetric, r"returned the metric 'norms' of shape \(4,\); every value besides 'loss' is one number"),
    (TextMetric, r"returned the metric 'phase' of type str; every value besides 'loss' is one number"),
])
def test_check_task_catches_what_forward_must_not_return(cls, needle, tmp_path):
    with pytest.raises(AssertionError, match=needle):
        check_task(cls, tmp_path=tmp_path, channels=(1,), export=False, resume=False, steps=1)


def test_check_task_passes_python_number_metrics(tmp_path):
    report = check_task(NumberMetrics, tmp_path=tmp_path, channels=(1,), export=False, resume=False, steps=1)
    assert len(report["losses"][1]) == 1


class NoInChans(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_features = 8
        self.conv = nn.Conv2d(1, 8, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_check_backbone_says_what_is_wrong_instead_of_raising_raw_errors():
    with pytest.raises(AssertionError, match=r"tiny \(1 channel\): NoInChans has no attribute 'in_chans' "
                                             r"\(a backbone has in_chans"):
        check_backbone(lambda m, in_chans, image_size: NoInChans(), "tiny", channels=(1,))

    def keyerror_factory(model, in_chans, image_size, **options):
        return {"tiny": Tiny}[model](in_chans)

    with pytest.raises(AssertionError, match=r"^an unknown model name must raise sslkit.api.UsageError \(one line\), "
                                             r"not KeyError: 'no_such_model_for_sslkit_testing'$"):
        check_backbone(keyerror_factory, "tiny")


def test_check_exporter_refuses_a_report_that_is_not_json(tmp_path):
    def path_report(encoder, spec, metadata, out, *, samples, samples_note, log, **options):
        if options:
            raise UsageError(f"no option {', '.join(options)}")
        write_atomic(Path(out), lambda tmp: torch.save(encoder.state_dict(), tmp))
        return {"file": Path(out)}

    with pytest.raises(AssertionError, match=r"^the exporter's report is not JSON-able .*: TypeError: float\(\) "):
        check_exporter(path_report, tmp_path=tmp_path)


def test_the_kit_uses_sslkits_own_builtins_whatever_is_loaded(tmp_path, monkeypatch):
    """SSLKIT_LOAD_PLUGINS naming only the plugin under test, or another plugin's ``simclr``, changes nothing."""
    from sslkit import plugins, registry
    from tests.conftest import install_plugin

    monkeypatch.setenv("SSLKIT_LOAD_PLUGINS", "")
    plugins.reset()
    assert registry.list_tasks() == [] and registry.list_backbones() == []
    assert check_callback(Counts, tmp_path=tmp_path / "a")["events"]["on_step_end"] == 3
    assert len(check_task(Base, tmp_path=tmp_path / "b", channels=(1,), export=False, resume=False,
                          steps=1)["losses"][1]) == 1
    assert registry.list_tasks() == [] and registry.list_backbones() == [] and registry.list_callbacks() == []
    install_plugin(tmp_path / "site", "sslkit_other_simclr", "othersimclr", """
        from sslkit.api import Task, hookimpl

        @hookimpl
        def register_tasks(register):
            register("simclr", Task)
    """)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("SSLKIT_LOAD_PLUGINS")
    plugins.reset()
    assert plugins.get_plugins().conflict_message("tasks", "simclr")
    assert check_callback(Counts, tmp_path=tmp_path / "c")["events"]["on_step_end"] == 3
    assert plugins.get_plugins().conflict_message("tasks", "simclr")  # as it was
