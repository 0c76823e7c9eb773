"""Whole-file text writes: diffalign.files."""

import pytest

from diffalign.files import atomic_write_text


def test_atomic_write_text_replaces_whole_files_and_keeps_the_old_one_on_failure(tmp_path):
    path = tmp_path / "metrics.json"
    assert atomic_write_text(path, '{"a": 1}') == path and path.read_text() == '{"a": 1}'
    atomic_write_text(path, '{"a": 2}')
    assert path.read_text() == '{"a": 2}'
    with pytest.raises(TypeError):
        atomic_write_text(path, b"not text")  # fails inside the write
    assert path.read_text() == '{"a": 2}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no staging file left
