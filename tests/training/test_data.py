"""The training data helpers: the built-in digits, dataset loading, column checks and image transforms."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from sculptdiff.training.data import (
    ExampleTransform,
    ImageTransform,
    check_columns,
    class_names,
    collate_fn,
    image_mode_for_channels,
    load_training_dataset,
)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_training_dataset()


def test_builtin_digits_are_the_real_sklearn_digits(digits):
    from sklearn.datasets import load_digits

    reference = load_digits()
    assert len(digits) == 1797
    assert class_names(digits, "label") == [str(index) for index in range(10)]
    assert digits[5]["label"] == reference.target[5]
    image = digits[5]["image"]
    assert image.mode == "L" and image.size == (8, 8)
    # 16 ink levels mapped onto 0..255
    np.testing.assert_array_equal(np.asarray(image), np.round(reference.images[5] * 255 / 16).astype(np.uint8))


@pytest.mark.parametrize("resolution", [16, 32])
def test_digits_transform_upsamples_and_scales_to_minus_one_one(digits, resolution):
    transform = ExampleTransform(ImageTransform(resolution, "L", center_crop=True), "image", "label", ["0"])
    batch = collate_fn(
        [{name: values[0] for name, values in transform(digits[index : index + 1]).items()} for index in range(4)]
    )
    assert batch["pixel_values"].shape == (4, 1, resolution, resolution)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0
    # white background at -1, ink reaching close to +1
    assert batch["pixel_values"].min() == -1.0 and batch["pixel_values"].max() > 0.5
    assert batch["class_labels"].tolist() == digits[:4]["label"]


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA"])
def test_mixed_image_modes_are_converted(mode):
    image = Image.new("RGB", (12, 20), (255, 0, 0)).convert(mode)
    rgb = ImageTransform(8, "RGB", center_crop=True)(image)
    grey = ImageTransform(8, "L", center_crop=True)(image)
    assert rgb.shape == (3, 8, 8) and grey.shape == (1, 8, 8)


def test_transparent_pixels_become_white_not_black():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert torch.all(ImageTransform(8, "RGB", center_crop=True)(image) == 1.0)


def test_center_crop_takes_the_middle_of_a_non_square_image():
    pixels = np.zeros((8, 24), dtype=np.uint8)
    pixels[:, 8:16] = 255
    cropped = ImageTransform(8, "L", center_crop=True)(Image.fromarray(pixels))
    assert torch.all(cropped == 1.0)


def test_class_values_that_are_not_class_label_ints_are_mapped_by_name():
    dataset = Dataset.from_dict({"image": [Image.new("L", (4, 4))] * 3, "kind": ["cat", "dog", "cat"]})
    names = class_names(dataset, "kind")
    assert names == ["cat", "dog"]
    transform = ExampleTransform(ImageTransform(4, "L", center_crop=True), "image", "kind", names)
    assert transform(dataset[:3])["class_labels"] == [0, 1, 0]


def test_captions_pass_through_as_strings():
    rows = {"image": [Image.new("L", (4, 4))] * 2, "text": ["a photo of digit one", ["digit two", "digit two"]]}
    transform = ExampleTransform(ImageTransform(4, "L", center_crop=True), "image", caption_column="text")
    assert transform(rows)["captions"] == ["a photo of digit one", "digit two"]
    with pytest.raises(ValueError, match="--caption_column 'text' holds int values"):
        transform({"image": rows["image"], "text": [1, 2]})


def test_missing_columns_and_empty_data_name_the_flag(digits):
    with pytest.raises(ValueError, match="--image_column 'img' is not a column"):
        check_columns(digits, "img")
    with pytest.raises(ValueError, match="--class_column 'digit' is not a column"):
        check_columns(digits, "image", class_column="digit")
    with pytest.raises(ValueError, match="--caption_column 'text' is not a column"):
        check_columns(digits, "image", caption_column="text")
    with pytest.raises(ValueError, match="dataset is empty"):
        check_columns(digits.select([]), "image")


def test_channels_map_to_modes():
    assert image_mode_for_channels(1) == "L" and image_mode_for_channels(3) == "RGB"
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\)"):
        image_mode_for_channels(4)


def test_local_datasets_load_from_save_to_disk_and_image_folders(tmp_path):
    dataset = Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 2, "label": [0, 1]})
    dataset.save_to_disk(tmp_path / "saved")
    assert len(load_training_dataset(str(tmp_path / "saved"))) == 2

    for name in ("a", "b"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "folder" / name / "0.png")
    folder = load_training_dataset(train_data_dir=str(tmp_path / "folder"))
    assert len(folder) == 2 and class_names(folder, "label") == ["a", "b"]

    with pytest.raises(ValueError, match="--train_data_dir .* is not a folder"):
        load_training_dataset(train_data_dir=str(tmp_path / "nowhere"))
