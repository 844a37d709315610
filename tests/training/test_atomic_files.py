import os

from PIL import Image

from sculptdiff.training.atomic_files import replace_path, save_image, write_bytes, write_text


def test_write_text_and_save_image_leave_only_the_target(tmp_path):
    write_text(str(tmp_path / "sub" / "args.json"), "{}")
    write_text(str(tmp_path / "sub" / "args.json"), '{"a": 1}')
    save_image(Image.new("L", (4, 2), 255), str(tmp_path / "sub" / "grid.png"))
    save_image(Image.new("RGB", (3, 3)), str(tmp_path / "sub" / "photo.jpg"))
    write_bytes(str(tmp_path / "sub" / "blob.bin"), b"\x00\x01")
    assert sorted(os.listdir(tmp_path / "sub")) == ["args.json", "blob.bin", "grid.png", "photo.jpg"]
    assert (tmp_path / "sub" / "blob.bin").read_bytes() == b"\x00\x01"
    assert Image.open(tmp_path / "sub" / "photo.jpg").format == "JPEG"
    assert (tmp_path / "sub" / "args.json").read_text() == '{"a": 1}'
    assert Image.open(tmp_path / "sub" / "grid.png").size == (4, 2)


def test_replace_path_swaps_a_folder_and_removes_the_old_one(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "old.txt").write_text("old")
    (tmp_path / ".staging").mkdir()
    (tmp_path / ".staging" / "new.txt").write_text("new")
    replace_path(str(tmp_path / ".staging"), str(tmp_path / "target"))
    assert sorted(os.listdir(tmp_path)) == ["target"]
    assert os.listdir(tmp_path / "target") == ["new.txt"]
    # a missing target is simply created
    (tmp_path / "file.tmp").write_text("x")
    replace_path(str(tmp_path / "file.tmp"), str(tmp_path / "file"))
    assert sorted(os.listdir(tmp_path)) == ["file", "target"]
