"""Options that did nothing in a case where their siblings are refused: refused there too, in one line.

``--allow-overlap`` with ``--data`` (it acts on ``--train``/``--test`` only), knn's ``--seed`` with
``--train``/``--test`` (it only draws the folds of ``--split``), and tsne's ``--labels`` with a
``--color-by`` other than ``label`` (the labels colour nothing then) all exited 0 and were ignored.
"""

from __future__ import annotations

import pytest

from sslkit.errors import UsageError
from tests.test_eval_split import _json, patients  # noqa: F401 (the module's tiny run, reused as a fixture)


def _one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("command", ["knn", "linear", "curve"])
def test_allow_overlap_with_data_is_refused(patients, cli, command):  # noqa: F811
    result = cli("eval", command, patients / "run", "--data", patients / "data", "--split", "group:4",
                 "--allow-overlap", "--no-baseline", "--quiet")
    assert _one_line(result) == ("error: --allow-overlap applies to --train and --test (images in both); --data is "
                                 "one labelled folder, split into folds")


def test_allow_overlap_still_acts_with_train_test(patients, cli):  # noqa: F811
    data = patients / "data"
    rep = _json(cli("eval", "knn", patients / "run", "--train", data, "--test", data, "--allow-overlap", "--k", "1",
                    "--no-baseline", "--json", "--quiet"))
    assert rep["data"]["overlap"]["test_samples_in_train"] == 80


def test_knn_seed_with_train_test_is_refused(patients, cli):  # noqa: F811
    data = patients / "data"
    result = cli("eval", "knn", patients / "run", "--train", data, "--test", data, "--allow-overlap", "--seed", "5",
                 "--k", "1", "--no-baseline", "--quiet")
    assert _one_line(result) == ("error: --seed applies to --data (one labelled folder); --train/--test are "
                                 "already split")
    both = cli("eval", "knn", patients / "run", "--train", data, "--test", data, "--allow-overlap", "--seed", "5",
               "--group-by", "folder", "--quiet")
    assert _one_line(both) == ("error: --group-by folder and --seed apply to --data (one labelled folder); "
                               "--train/--test are already split")
    from sslkit.eval.data_args import DataArgs

    with pytest.raises(UsageError, match="^--seed applies to --data"):
        DataArgs(train="a", test="b", split_only=("--seed",)).check()
    assert DataArgs(train="a", test="b", seed=5).check() is None  # linear's and curve's seed acts on --train/--test


def test_knn_seed_still_draws_the_folds_of_data(patients, cli):  # noqa: F811
    args = ("eval", "knn", patients / "run", "--data", patients / "data", "--split", "group:4", "--group-pattern",
            r"^(p\d+)_", "--k", "1", "--no-baseline", "--json", "--quiet")
    default, seeded = _json(cli(*args)), _json(cli(*args, "--seed", "5"))
    assert default["settings"]["split"]["seed"] == 0 and seeded["settings"]["split"]["seed"] == 5
    folds = [[f["balanced_accuracy"] for f in r["results"]["pretrained"]["k=1"]["folds"]] for r in (default, seeded)]
    assert folds[0] != folds[1]


def test_linear_seed_with_train_test_is_not_refused(patients, cli):  # noqa: F811
    """linear's --seed also draws the validation split that chooses C: it acts on --train/--test too."""
    data = patients / "data"
    rep = _json(cli("eval", "linear", patients / "run", "--train", data, "--test", data, "--allow-overlap", "--seed",
                    "5", "--C", "1", "--no-baseline", "--json", "--quiet"))
    assert rep["settings"]["seed"] == 5


@pytest.mark.parametrize("colour, shown", [("folder", "'folder'"), ("Format", "'Format'")])
def test_tsne_labels_with_another_colour_are_refused(patients, cli, tmp_path, colour, shown):  # noqa: F811
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\np0_a.png,x\n")
    result = cli("eval", "tsne", patients / "run", "--data", patients / "data", "--labels", labels, "--color-by",
                 colour, "--out", tmp_path / "t.png", "--perplexity", "3", "--no-baseline", "--quiet")
    assert _one_line(result) == (f"error: --labels colour the points with --color-by label only; leave out --labels "
                                 f"or --color-by {shown}")
    assert not (tmp_path / "t.png").exists()


def test_tsne_labels_and_color_by_folder_each_still_act(patients, cli, tmp_path):  # noqa: F811
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\np0_a.png,x\np0_b.png,x\n")
    common = ("eval", "tsne", patients / "run", "--data", patients / "data", "--perplexity", "3", "--no-baseline",
              "--json", "--quiet")
    by_label = _json(cli(*common, "--labels", labels, "--color-by", "label", "--out", tmp_path / "l.png"))
    assert by_label["classes"] == ["x"] and by_label["class_counts"]["plotted"] == {"x": 2}
    assert by_label["data"]["data"]["unlabelled"] == 78
    by_folder = _json(cli(*common, "--color-by", "folder", "--out", tmp_path / "f.png"))
    assert by_folder["classes"] == ["healthy", "sick"] and by_folder["settings"]["color_by"] == "folder"
    assert sum(by_folder["class_counts"]["plotted"].values()) == 80 and by_folder["data"]["data"]["unlabelled"] == 0
