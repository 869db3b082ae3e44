"""``fastlora.io``: files are written atomically (a temporary file beside the target, then a rename)."""

from __future__ import annotations

import os

import pytest

from fastlora.io import atomic_write, atomic_write_text


def test_atomic_write_text_creates_and_replaces(tmp_path):
    path = tmp_path / "adapter_config.json"
    atomic_write_text(path, "first")
    assert path.read_text() == "first"
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert os.listdir(tmp_path) == ["adapter_config.json"]


def test_writer_gets_a_temporary_path_beside_the_target(tmp_path):
    seen = []

    def write(tmp: str) -> None:
        seen.append(tmp)
        with open(tmp, "wb") as fh:
            fh.write(b"data")

    atomic_write(tmp_path / "weights.bin", write)
    assert os.path.dirname(seen[0]) == str(tmp_path)  # same filesystem, so the rename is atomic
    assert seen[0] != str(tmp_path / "weights.bin")
    assert (tmp_path / "weights.bin").read_bytes() == b"data"
    assert not os.path.exists(seen[0])


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failing_writer_leaves_the_old_file_and_no_temp_files(tmp_path, error):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"previous contents")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(b"half of the new")
        raise error("disk full")

    with pytest.raises(error, match="disk full"):
        atomic_write(path, write)
    assert path.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == [path.name]


def test_failing_writer_with_no_previous_file_leaves_nothing(tmp_path):
    def write(tmp: str) -> None:
        raise OSError("no space left")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "new.json", write)
    assert os.listdir(tmp_path) == []


def test_writer_that_removes_its_temp_file_still_raises_cleanly(tmp_path):
    def write(tmp: str) -> None:
        os.remove(tmp)
        raise ValueError("gave up")

    with pytest.raises(ValueError, match="gave up"):
        atomic_write(tmp_path / "x.json", write)
    assert os.listdir(tmp_path) == []
