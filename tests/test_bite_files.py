"""Atomic writes (utils/files.py): cases written for the mutation run of issue 29. A written file is on disk before
it takes its name (its bytes flushed, then the rename flushed), in the encoding and form documented."""

import json
import os
import re
import stat

import numpy as np
import PIL.Image
import pytest

from cosegment.utils import files
from cosegment.utils.files import (
    TEMPORARY_MARK,
    atomic_open,
    atomic_path,
    copy_file,
    find_temporaries,
    is_temporary,
    remove_temporaries,
    save_png,
    temporary_path,
    write_bytes,
    write_json,
    write_text,
)


@pytest.fixture
def synced(monkeypatch):
    """Each `os.fsync` as `(kind, inode, mode)` of what it flushed, and each `os.replace` as `("replace", source,
    destination)`, in order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        status = os.fstat(descriptor)
        events.append(("fsync", status.st_ino, stat.S_ISDIR(status.st_mode)))
        return real_fsync(descriptor)

    def replace(source, destination):
        events.append(("replace", os.fspath(source), os.fspath(destination)))
        return real_replace(source, destination)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    return events


@pytest.mark.parametrize("writer", ["text", "bytes", "json", "png", "copy", "path"])
def test_the_file_then_its_rename_are_flushed_to_disk(tmp_path, synced, writer):
    path = tmp_path / "sub" / "result.out"
    path.parent.mkdir()
    source = tmp_path / "source.txt"
    source.write_text("copied")
    if writer == "text":
        write_text(path, "x")
    elif writer == "bytes":
        write_bytes(path, b"x")
    elif writer == "json":
        write_json(path, {"x": 1})
    elif writer == "png":
        save_png(path.with_suffix(".png"), np.zeros((2, 2), np.uint8))
        path = path.with_suffix(".png")
    elif writer == "copy":
        copy_file(source, path)
    else:
        with atomic_path(path) as temporary:
            with open(temporary, "w") as handle:
                handle.write("x")
    file_inode, folder_inode = os.stat(path).st_ino, os.stat(path.parent).st_ino
    (replaced,) = [event for event in synced if event[0] == "replace"]
    assert replaced[2] == str(path) and os.path.dirname(replaced[1]) == str(path.parent)
    position = synced.index(replaced)
    # the written file's bytes before the rename (the file keeps its inode through it), the folder after it
    assert synced[:position] == [("fsync", file_inode, False)]
    assert synced[position + 1 :] == [("fsync", folder_inode, True)]


def test_a_failed_write_flushes_and_renames_nothing(tmp_path, synced):
    with pytest.raises(OSError):
        with atomic_open(tmp_path / "a.txt") as handle:
            handle.write("half")
            raise OSError("disk full")
    assert synced == [] and os.listdir(tmp_path) == []


def test_text_is_utf8_whatever_the_locale(tmp_path, monkeypatch):
    import builtins

    def latin_open(file, mode="r", buffering=-1, encoding=None, *args, **kwargs):
        """`open` where the locale's encoding is Latin-1 (the default of many Windows set-ups)."""
        if "b" not in mode and encoding is None:
            encoding = "latin-1"
        return builtins.open(file, mode, buffering, encoding, *args, **kwargs)

    monkeypatch.setattr(files, "open", latin_open, raising=False)
    write_text(tmp_path / "a.txt", "café ∑")
    assert (tmp_path / "a.txt").read_bytes() == "café ∑".encode()
    with atomic_open(tmp_path / "b.txt", "w", encoding="utf-16") as handle:
        handle.write("é")
    assert (tmp_path / "b.txt").read_bytes().decode("utf-16") == "é"


def test_write_json_is_one_document_and_a_newline(tmp_path):
    write_json(tmp_path / "a.json", {"b": [1, 2], "a": "é"}, indent=1, sort_keys=True)
    text = (tmp_path / "a.json").read_text(encoding="utf-8")
    assert text == json.dumps({"b": [1, 2], "a": "é"}, indent=1, sort_keys=True) + "\n"
    write_json(tmp_path / "b.json", [1])
    assert (tmp_path / "b.json").read_text() == "[1]\n"


def test_copy_and_bytes_and_png(tmp_path):
    write_bytes(tmp_path / "a.bin", b"\x00\xff")
    copy_file(tmp_path / "a.bin", tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    picture = PIL.Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    save_png(tmp_path / "p.png", picture)  # a PIL image as it is
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "p.png")), np.asarray(picture))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.bin", "p.png"]


@pytest.mark.parametrize("mode", ["a", "r", "w+", "x", "rb", "ab"])
def test_atomic_open_takes_only_writing_modes(tmp_path, mode):
    with pytest.raises(ValueError, match=rf"`mode` must be 'w' or 'wb', got '{re.escape(mode)}'"):
        with atomic_open(tmp_path / "a.txt", mode):
            pass
    assert os.listdir(tmp_path) == []


def test_temporary_names_are_hidden_beside_the_file_with_its_extension(tmp_path):
    path = temporary_path(str(tmp_path / "figure.png"))
    folder, name = os.path.split(path)
    assert folder == str(tmp_path)
    assert name.startswith(".figure.png" + TEMPORARY_MARK) and name.endswith(".png")
    assert name.split(TEMPORARY_MARK)[1].startswith(f"{os.getpid()}-")
    assert is_temporary(path) and is_temporary(name) and is_temporary(os.path.join("a", "b", name))
    assert not is_temporary("figure.png" + TEMPORARY_MARK + "1.png")  # not hidden: another program's file
    assert not is_temporary(".figure.png") and not is_temporary(str(tmp_path / ".partial"))
    assert re.fullmatch(r"\.noext\.partial-\d+-[0-9a-f]{8}", temporary_path("noext"))


def test_find_and_remove_temporaries_recursively(tmp_path):
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    left = sorted([temporary_path(deep / "x.json"), temporary_path(tmp_path / "y.png"), temporary_path(deep / "z")])
    for path in left:
        open(path, "w").close()
    keep = [deep / "x.json", tmp_path / ".hidden", tmp_path / "a" / "plain.partial-1.png"]
    for path in keep:
        path.write_text("mine")
    assert find_temporaries(tmp_path) == left
    assert find_temporaries(deep) == [path for path in left if path.startswith(str(deep))]
    assert remove_temporaries(tmp_path) == left
    assert find_temporaries(tmp_path) == [] and all(path.read_text() == "mine" for path in keep)
    assert remove_temporaries(tmp_path) == []


def test_umask_is_read_and_put_back():
    previous = os.umask(0o037)
    try:
        assert files._umask() == 0o037
        assert files._umask() == 0o037  # reading it did not change it
    finally:
        os.umask(previous)


def test_a_file_named_without_a_folder_flushes_the_current_folder(tmp_path, synced, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_text("notes.txt", "x")
    assert (tmp_path / "notes.txt").read_text() == "x"
    assert synced[-1] == ("fsync", os.stat(tmp_path).st_ino, True)


def test_a_temporary_removed_by_someone_else_meanwhile_is_skipped(tmp_path, monkeypatch):
    left = [temporary_path(tmp_path / "a.json"), temporary_path(tmp_path / "b.json")]
    for path in left:
        open(path, "w").close()
    real_remove = os.remove

    def remove(path):
        if path == min(left):
            real_remove(path)  # another process got there first
            raise FileNotFoundError(path)
        real_remove(path)

    monkeypatch.setattr(files.os, "remove", remove)
    assert remove_temporaries(tmp_path) == [max(left)]
    assert os.listdir(tmp_path) == []


def test_png_whatever_the_name_and_a_pil_image_as_it_is(tmp_path):
    save_png(tmp_path / "picture.bin", np.zeros((2, 3, 3), np.uint8))  # not a .png name: still a PNG file
    assert (tmp_path / "picture.bin").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    palette = PIL.Image.new("P", (3, 2))
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.putdata([0, 1, 2, 2, 1, 0])
    save_png(tmp_path / "palette.png", palette)
    again = PIL.Image.open(tmp_path / "palette.png")
    assert again.mode == "P" and np.asarray(again).tolist() == [[0, 1, 2], [2, 1, 0]]
    assert np.array_equal(np.asarray(again.convert("RGB")), np.asarray(palette.convert("RGB")))


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_written_files_are_never_executable(tmp_path, mask):
    # a new file's usual permissions: read and write as the umask allows, no execute bit for anyone
    previous = os.umask(mask)
    try:
        write_text(tmp_path / "a.json", "{}")
        write_bytes(tmp_path / "b.bin", b"1")
        save_png(tmp_path / "c.png", np.zeros((2, 2), np.uint8))
        copy_file(tmp_path / "b.bin", tmp_path / "d.bin")
    finally:
        os.umask(previous)
    for name in ("a.json", "b.bin", "c.png", "d.bin"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o666 & ~mask), name
