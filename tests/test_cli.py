"""Bad input through the real CLI: one clear error line, a non-zero exit code, no traceback."""

import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "LATHE_NO_PROGRESS": "1"}


def lathe(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lathe", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120)


def assert_clean_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "lathe: error:" in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_error(lathe("data", "--data", "empty", cwd=tmp_path), "empty")


def test_only_binary_files(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"\x00\x01\x02" * 100)
    (folder / "b.md").write_bytes(bytes(range(256)) * 4)
    assert_clean_error(lathe("data", "--data", "bin", cwd=tmp_path), "no documents")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    folder = tmp_path / "j"
    folder.mkdir()
    (folder / "docs.jsonl").write_text('{"text": "a fine first document of some length"}\n{"text": oops}\n')
    assert_clean_error(lathe("data", "--data", "j", cwd=tmp_path), "docs.jsonl:2")


@pytest.mark.parametrize("override,field", [("train.lerning_rate=0.1", "train.lerning_rate"),
                                            ("model.n_layer=0", "model.n_layer")])
def test_recipe_typo_and_range(tmp_path, override, field):
    assert_clean_error(lathe("run", "--set", override, cwd=tmp_path), field)


def test_stage_without_its_inputs(tmp_path):
    assert_clean_error(lathe("pretrain", cwd=tmp_path), "--run")
    (tmp_path / "runs" / "r").mkdir(parents=True)
    assert_clean_error(lathe("pretrain", "--run", "runs/r", cwd=tmp_path), "tokenizer")


def test_too_few_documents_for_a_validation_split(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("a single document, long enough to pass the length filter. " * 3)
    assert_clean_error(lathe("run", "--recipe", "tiny", "--data", "one", cwd=tmp_path), "split", "has no tokens")
