"""The example plugin meets sslkit's contract (run in its CI: ``pytest examples/sslkit-example-plugin``)."""

from sslkit.testing import check_source, check_task, registered


def test_registers_one_task_and_one_source():
    assert registered("tasks", "sslkit-example-plugin") == ["relpos"]
    assert registered("sources", "sslkit-example-plugin") == ["synthetic"]


def test_relpos_contract(tmp_path):
    report = check_task("relpos", tmp_path=tmp_path, image_size=48)
    assert len(report["losses"][3]) == 2


def test_synthetic_contract(tmp_path):
    # generated data reads no file, so there is no damaged file to report
    # other_options: another image size changes the pixels, so it must change the decoded-pixel cache key too
    report = check_source("synthetic", "6", tmp_path=tmp_path, options={"channels": 3}, damaged_file_raises=False,
                          other_options={"channels": 3, "size": 32})
    assert report == {"scheme": "synthetic", "samples": 6, "loaded": 6, "channels": [3],
                      "damaged": "not checked (damaged_file_raises=False)", "graph": "pixels",
                      "cache_key": "another options value, other pixels: another cache key"}
