"""The training data helpers: the built-in digits, dataset loading, column checks and image transforms."""

import argparse

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

from sculptdiff.training.data import (
    ExampleTransform,
    ImageTransform,
    batch_latents,
    check_columns,
    class_names,
    class_value_names,
    collate_fn,
    image_mode_for_channels,
    load_run_dataset,
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
    transform = ExampleTransform(
        ImageTransform(resolution, "L", center_crop=True), "image", "label", class_value_names(digits, "label")
    )
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


def test_integer_class_values_are_mapped_through_the_sorted_names():
    # 1, 2, 3 are values, not ids: they train as 0, 1, 2, which is what the names (and id2label) say; as ids, 3 would
    # be the null class of guidance.
    dataset = Dataset.from_dict({"image": [Image.new("L", (4, 4))] * 4, "grade": [3, 1, 2, 3]})
    names = class_value_names(dataset, "grade")
    assert names == class_names(dataset, "grade") == ["1", "2", "3"]
    transform = ExampleTransform(ImageTransform(4, "L", center_crop=True), "image", "grade", names)
    assert transform(dataset[:4])["class_labels"] == [2, 0, 1, 2]

    # numeric order, not string order: 10 comes after 9
    dataset = Dataset.from_dict({"image": [Image.new("L", (4, 4))] * 3, "grade": [10, 9, 2]})
    transform = ExampleTransform(
        ImageTransform(4, "L", center_crop=True), "image", "grade", class_value_names(dataset, "grade")
    )
    assert class_names(dataset, "grade") == ["2", "9", "10"]
    assert transform(dataset[:3])["class_labels"] == [2, 1, 0]


def test_class_label_columns_keep_their_ids_and_names():
    features = Features({"image": ImageFeature(), "kind": ClassLabel(names=["dog", "cat", "7"])})
    dataset = Dataset.from_dict({"image": [Image.new("L", (4, 4))] * 3, "kind": [2, 0, 1]}, features=features)
    assert class_names(dataset, "kind") == ["dog", "cat", "7"]
    assert class_value_names(dataset, "kind") is None and class_value_names(dataset, None) is None
    transform = ExampleTransform(
        ImageTransform(4, "L", center_crop=True), "image", "kind", class_value_names(dataset, "kind")
    )
    assert transform(dataset[:3])["class_labels"] == [2, 0, 1]


def test_a_class_value_outside_the_names_names_the_column():
    transform = ExampleTransform(ImageTransform(4, "L", center_crop=True), "image", "grade", ["1", "2"])
    with pytest.raises(ValueError, match="--class_column 'grade' holds 5, which is not one of its class names"):
        transform({"image": [Image.new("L", (4, 4))], "grade": [5]})


# A horizontal ramp over the whole range of each mode: black, dark grey, mid grey, white.
RAMPS = {
    "I;16": (np.array([[0, 4369, 32896, 65535]], dtype=np.uint16), [0, 17, 128, 255]),
    "I;16B": (np.array([[0, 4369, 32896, 65535]], dtype=">u2"), [0, 17, 128, 255]),
    "I": (np.array([[0, 4369, 32896, 65535]], dtype=np.int32), [0, 17, 128, 255]),
    "F": (np.array([[0.0, 1 / 15, 128 / 255, 1.0]], dtype=np.float32), [0, 17, 128, 255]),
}


@pytest.mark.parametrize("mode", sorted(RAMPS))
@pytest.mark.parametrize("target", ["L", "RGB"])
def test_16_bit_and_float_images_are_scaled_not_clipped(mode, target):
    pixels, grey_levels = RAMPS[mode]
    image = Image.frombytes(mode, (4, 1), pixels.tobytes()).resize((4, 4), Image.NEAREST)
    assert image.mode == mode
    tensor = ImageTransform(4, target, center_crop=True)(image)
    expected = torch.tensor(grey_levels, dtype=torch.float32) / 127.5 - 1.0
    # every channel of every row is the ramp: mid grey stays mid grey (PIL's convert("L") would clip it to white)
    torch.testing.assert_close(tensor, expected.expand_as(tensor))


def test_a_16_bit_png_from_an_image_folder_trains_as_grey(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(tmp_path / "data" / "a" / "0.png")
    dataset = load_training_dataset(train_data_dir=str(tmp_path / "data"))
    assert dataset[0]["image"].mode == "I;16"
    dataset.set_transform(ExampleTransform(ImageTransform(8, "L", center_crop=True), "image"))
    torch.testing.assert_close(dataset[0]["pixel_values"], torch.full((1, 8, 8), 128 / 127.5 - 1.0))


@pytest.mark.parametrize(
    ("mode", "pixels", "message"),
    [
        ("I", np.array([[0, 70000]], dtype=np.int32), "mode 'I' image holds values in \\[0, 70000\\]"),
        ("I", np.array([[-5, 10]], dtype=np.int32), "integer images are read as 16-bit"),
        ("F", np.array([[0.0, 255.0]], dtype=np.float32), "float images are read as \\[0, 1\\]"),
        ("F", np.array([[0.0, np.nan]], dtype=np.float32), "float images are read as \\[0, 1\\]"),
    ],
)
def test_images_outside_their_modes_range_are_refused(mode, pixels, message):
    image = Image.frombytes(mode, (2, 1), pixels.tobytes())
    with pytest.raises(ValueError, match=message):
        ImageTransform(2, "L", center_crop=True)(image)


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


def test_load_run_dataset_cuts_to_max_train_samples():
    args = argparse.Namespace(
        dataset_name=None, dataset_config_name=None, train_data_dir=None, cache_dir=None, max_train_samples=7
    )
    accelerator = Accelerator(cpu=True)
    assert len(load_run_dataset(accelerator, args)) == 7
    args.max_train_samples = None
    assert len(load_run_dataset(accelerator, args)) == 1797


def test_batch_latents_are_float_pixels_or_the_vaes_scaled_latents(tiny_vae):
    pixel_values = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    pixels = batch_latents(pixel_values)
    assert pixels.dtype == torch.float32 and torch.equal(pixels, pixel_values.float())

    tiny_vae.config.scaling_factor = 0.5
    pixel_values = pixel_values.float().requires_grad_()
    torch.manual_seed(0)
    latents = batch_latents(pixel_values, tiny_vae)
    torch.manual_seed(0)
    expected = tiny_vae.encode(pixel_values).latent_dist.sample() * 0.5
    assert latents.shape == (2, tiny_vae.config.latent_channels, 8, 8)
    # a sample of the posterior (not its mean), scaled; no gradient reaches the frozen VAE
    torch.testing.assert_close(latents, expected.detach())
    assert not latents.requires_grad
