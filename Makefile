# sslkit: `make demo` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
DEMO   := runs/demo-mae
PYDICOM_FILES = $$($(BIN)/python -c 'import pathlib, pydicom; print(pathlib.Path(pydicom.__file__).parent / "data" / "test_files")')

.PHONY: setup demo test test-slow clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Pretrain MAE on the DICOM files shipped in pydicom's wheel, export to ONNX, check parity.
demo: setup
	$(BIN)/sslkit pretrain --task mae --data dicom:$(PYDICOM_FILES) --out $(DEMO) \
		--epochs 5 --batch-size 32 --image-size 64 --overwrite --quiet
	$(BIN)/sslkit export $(DEMO) --out $(DEMO)/encoder.onnx --overwrite

## The default test suite (long runs are marked slow and excluded): one line per test file
## as it finishes (its name, a dot per test, the share of the suite done), the slowest at the end. Files run on
## one process per core, at most 4 (pytest-xdist; a file's tests on one process, tests/file_progress.py prints the lines).
## A test that kills its process ends the run, naming it: xdist 3.8 replacing the process can hang for good under loadfile.
test: setup
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile --max-worker-restart 0 -p tests.file_progress \
		--durations=10

test-slow: setup
	$(BIN)/python -m pytest --durations=10 -m slow

## The environment, build files and the demo's run; other runs under runs/ are yours and stay.
clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
