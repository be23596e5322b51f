"""agent.files.replace_dir: a folder replaced in one rename, the old one gone, nothing left aside."""

from __future__ import annotations

from pathlib import Path

from agent.files import replace_dir


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "agent.toml").write_text(text)
    return path


def test_replace_dir_puts_the_new_folder_in_place_of_none_or_the_old(tmp_path: Path) -> None:
    out = tmp_path / "pi-a"
    replace_dir(_folder(tmp_path / ".new1", "one"), out)
    assert (out / "agent.toml").read_text() == "one"
    replace_dir(_folder(tmp_path / ".new2", "two"), out)
    assert (out / "agent.toml").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pi-a"]  # no temp or old folder left
