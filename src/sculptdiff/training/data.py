"""Training data for the sculptdiff training scripts: the built-in digits, `datasets` loading, transforms."""

import os
import random

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image, load_dataset, load_from_disk
from PIL import Image as PILImage


DIGITS_DATASET_NAME = "sklearn-digits"
DIGITS_CLASS_COLUMN = "label"


def load_digits_dataset() -> Dataset:
    """scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 16 grey levels, 10 classes) as a `Dataset`.

    The images keep their native 8x8 size; `ImageTransform` upsamples them to the training resolution.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 ink levels -> 0..255 grey values: the same "L" images any image folder would give.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(name) for name in digits.target_names])})
    return Dataset.from_dict(
        {"image": [PILImage.fromarray(image, mode="L") for image in pixels], "label": digits.target.tolist()},
        features=features,
    )


def load_training_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
) -> Dataset:
    """The "train" split of a Hub dataset, a local `save_to_disk` folder, a local dataset script/folder or an image
    folder (`train_data_dir`, loaded with the "imagefolder" builder); the built-in digits when both are None."""
    if dataset_name is None and train_data_dir is None:
        return load_digits_dataset()
    if dataset_name is not None:
        if os.path.isfile(os.path.join(dataset_name, "dataset_info.json")) or os.path.isfile(
            os.path.join(dataset_name, "dataset_dict.json")
        ):
            dataset = load_from_disk(dataset_name)
        else:
            dataset = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    else:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"--train_data_dir {train_data_dir!r} is not a folder; pass a folder of images.")
        dataset = load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    if isinstance(dataset, dict):
        if "train" not in dataset:
            raise ValueError(
                f"The dataset {dataset_name or train_data_dir!r} has no 'train' split (splits: {sorted(dataset)});"
                " save the split to train on under the name 'train'."
            )
        dataset = dataset["train"]
    return dataset


def load_run_dataset(accelerator, args) -> Dataset:
    """The training set of a script's data flags (`args.dataset_name`, `dataset_config_name`, `train_data_dir`,
    `cache_dir`), loaded by the main process first so that the others read its cache, cut to
    `args.max_train_samples` when set."""
    with accelerator.main_process_first():
        dataset = load_training_dataset(
            args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir
        )
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    return dataset


def check_columns(
    dataset: Dataset, image_column: str, class_column: str | None = None, caption_column: str | None = None
) -> None:
    """Raise a ValueError naming the flag when a requested column is missing or the dataset is empty."""
    columns = dataset.column_names
    for flag, column in (("--image_column", image_column), ("--class_column", class_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{flag} {column!r} is not a column of the dataset; its columns are {columns}.")
    if caption_column is not None and caption_column not in columns:
        raise ValueError(
            f"--caption_column {caption_column!r} is not a column of the dataset; its columns are {columns}."
        )
    if len(dataset) == 0:
        raise ValueError(
            "The training dataset is empty (0 rows, or --max_train_samples 0); point --dataset_name or"
            " --train_data_dir at images."
        )


def class_names(dataset: Dataset, class_column: str) -> list[str]:
    """Class names in label order: a `ClassLabel`'s names, else the sorted distinct values of the column."""
    feature = dataset.features[class_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(value) for value in sorted(set(dataset[class_column]))]


def class_value_names(dataset: Dataset, class_column: str | None) -> list[str] | None:
    """What `ExampleTransform(class_names=...)` maps the class column through: None for no column or a `ClassLabel`
    (its values are its ids), else the sorted names `class_names` gives (an integer column 1, 2, 3 -> ids 0, 1, 2)."""
    if class_column is None or isinstance(dataset.features[class_column], ClassLabel):
        return None
    return class_names(dataset, class_column)


def image_mode_for_channels(num_channels: int) -> str:
    """The PIL mode images are converted to, from the channel count of what the model reads (U-Net or VAE)."""
    if num_channels == 1:
        return "L"
    if num_channels == 3:
        return "RGB"
    raise ValueError(f"Images can feed 1 (grey) or 3 (RGB) channels, not {num_channels}; check in_channels.")


def to_8bit(image: PILImage.Image) -> PILImage.Image:
    """A 16-bit or float grey image as the "L" image of the same picture; 8-bit images are returned as they are.

    PIL's own `convert("L")` clips these modes at 255 instead of scaling them, which turns them white. The rules:
    - "I;16" (and "I;16B", "I;16L", "I;16N"): 0..65535, the 16-bit PNG/TIFF range, scaled by 1/257 (65535 -> 255).
    - "I" (32-bit integers): the mode PIL holds 16-bit data in (`convert("I")` of an "I;16" image), so read as
      0..65535 like "I;16"; values outside that range are refused rather than guessed at.
    - "F" (32-bit float): the float image convention of diffusers' image processors and torchvision, [0, 1],
      scaled by 255; values outside [0, 1] (or NaN) are refused.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(
                f"A mode {image.mode!r} image holds values in [{pixels.min():g}, {pixels.max():g}]; integer images"
                " are read as 16-bit (0..65535). Rescale the data to 0..65535, or save it as 8-bit."
            )
        pixels = pixels / 257.0
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if not (np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0):
            raise ValueError(
                f"A mode 'F' image holds values in [{np.nanmin(pixels):g}, {np.nanmax(pixels):g}]; float images are"
                " read as [0, 1]. Rescale the data to [0, 1], or save it as 8-bit."
            )
        pixels = pixels * 255.0
    else:
        return image
    return PILImage.fromarray(np.round(pixels).astype(np.uint8))


class ImageTransform:
    """PIL image -> float tensor (C, H, W) in [-1, 1]: convert mode, resize the short side, crop, scale.

    16-bit and float grey images ("I;16", "I", "F") are first brought to 8 bits by their range (see `to_8bit`).

    Args:
        resolution: side of the square output.
        mode: PIL mode every image is converted to ("L" or "RGB"); mixed-mode data (L, RGB, RGBA, P) is converted.
        center_crop: crop the centre; otherwise a random square (only differs for non-square images).

    Random horizontal flips are applied to whole batches in the training loop, not here, so that all training
    randomness is drawn in the main process in step order (which makes resuming exact).
    """

    def __init__(self, resolution: int, mode: str, center_crop: bool = False):
        self.resolution = resolution
        self.mode = mode
        self.center_crop = center_crop

    def __call__(self, image: PILImage.Image) -> torch.Tensor:
        image = to_8bit(image)
        if image.mode in ("RGBA", "LA", "P") and self.mode == "RGB":
            # Transparent pixels become white, not the black that a plain convert("RGB") gives.
            background = PILImage.new("RGBA", image.size, (255, 255, 255, 255))
            image = PILImage.alpha_composite(background, image.convert("RGBA"))
        image = image.convert(self.mode)
        width, height = image.size
        scale = self.resolution / min(width, height)
        size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        # Bilinear like diffusers' examples (transforms.Resize default); it upsamples 8x8 digits smoothly.
        image = image.resize(size, resample=PILImage.BILINEAR)
        if self.center_crop:
            left = (size[0] - self.resolution) // 2
            top = (size[1] - self.resolution) // 2
        else:
            # only non-square images have room to move; square ones draw nothing from the RNG
            left = random.randint(0, size[0] - self.resolution) if size[0] > self.resolution else 0
            top = random.randint(0, size[1] - self.resolution) if size[1] > self.resolution else 0
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        if array.ndim == 2:
            array = array[:, :, None]
        # (H, W, C) -> (C, H, W)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


class ExampleTransform:
    """`Dataset.set_transform` callable: a batch of rows -> `pixel_values`, and `class_labels` or `captions`.

    Args:
        image_transform: the per-image transform.
        image_column: column holding the images.
        class_column: column holding class labels.
        class_names: for a column that is not a `ClassLabel`: its sorted names (`class_value_names`); every value
            is mapped to the index of `str(value)` among them. None when the column is a `ClassLabel`, whose values
            are its ids.
        caption_column: column holding captions (a string, or a list of strings of which one is picked at random).

    Captions stay strings: the training loop encodes them with the pipeline's own `encode_prompt`, so training and
    sampling tokenize and encode text the same way.
    """

    def __init__(
        self,
        image_transform: ImageTransform,
        image_column: str,
        class_column: str | None = None,
        class_names: list[str] | None = None,
        caption_column: str | None = None,
    ):
        self.image_transform = image_transform
        self.image_column = image_column
        self.class_column = class_column
        self.class_index = {name: index for index, name in enumerate(class_names)} if class_names is not None else None
        self.caption_column = caption_column

    def __call__(self, examples: dict) -> dict:
        images = examples[self.image_column]
        if not all(isinstance(image, PILImage.Image) for image in images):
            kinds = sorted({type(image).__name__ for image in images if not isinstance(image, PILImage.Image)})
            raise ValueError(
                f"--image_column {self.image_column!r} holds {', '.join(kinds)} values, not images; name the column"
                " that holds the images."
            )
        batch = {"pixel_values": [self.image_transform(image) for image in images]}
        if self.class_column is not None:
            values = examples[self.class_column]
            batch["class_labels"] = values if self.class_index is None else [self._class_id(value) for value in values]
        if self.caption_column is not None:
            captions = []
            for caption in examples[self.caption_column]:
                if isinstance(caption, str):
                    captions.append(caption)
                elif isinstance(caption, (list, np.ndarray)):
                    # Several captions per image: pick one, as diffusers' train_text_to_image.py does.
                    captions.append(random.choice(caption))
                else:
                    raise ValueError(
                        f"--caption_column {self.caption_column!r} holds {type(caption).__name__} values; captions"
                        " must be strings or lists of strings."
                    )
            batch["captions"] = captions
        return batch

    def _class_id(self, value) -> int:
        # Every value goes through the names, integers too: a column of 1, 2, 3 trains as ids 0, 1, 2, which is
        # what `class_names` (and so the U-Net's id2label) says.
        if str(value) not in self.class_index:
            raise ValueError(
                f"--class_column {self.class_column!r} holds {value!r}, which is not one of its class names"
                f" {list(self.class_index)}."
            )
        return self.class_index[str(value)]


def collate_fn(examples: list[dict]) -> dict:
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples]).contiguous()}
    if "class_labels" in examples[0]:
        batch["class_labels"] = torch.tensor([example["class_labels"] for example in examples], dtype=torch.long)
    if "captions" in examples[0]:
        batch["captions"] = [example["captions"] for example in examples]
    return batch


def set_training_transform(
    dataset: Dataset,
    args,
    image_mode: str,
    class_column: str | None = None,
    caption_column: str | None = None,
    resolution: int | None = None,
):
    """Sets the scripts' training transform on `dataset`: images from `args.image_column`, resized to `resolution`
    (default `args.resolution`, center-cropped with `args.center_crop`) in `image_mode`, with class ids from
    `class_column` or captions from `caption_column` (a script without conditioning passes neither)."""
    dataset.set_transform(
        ExampleTransform(
            ImageTransform(args.resolution if resolution is None else resolution, image_mode, args.center_crop),
            image_column=args.image_column,
            class_column=class_column,
            class_names=class_value_names(dataset, class_column),
            caption_column=caption_column,
        )
    )


def build_train_dataloader(dataset: Dataset, args) -> torch.utils.data.DataLoader:
    """The shuffled training loader of `args.train_batch_size` and `args.dataloader_num_workers`, after decoding one
    example, so that a bad column or an unreadable image fails before the first step."""
    collate_fn([dataset[0]])
    return torch.utils.data.DataLoader(
        dataset,
        shuffle=True,
        collate_fn=collate_fn,
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
        # The loader draws its workers' base seed from this generator, not from the global RNG, whose state the
        # checkpoints restore: a resumed run creating its loader mid-epoch then draws the same noise as an
        # uninterrupted one.
        generator=torch.Generator().manual_seed(torch.initial_seed()),
    )


@torch.no_grad()
def batch_latents(pixel_values: torch.Tensor, vae=None) -> torch.Tensor:
    """What a diffusion model of the batch denoises, in float32 and without gradients: the pixels themselves, or for
    latent diffusion (Rombach et al. 2022) a sample of the `AutoencoderKL`'s latents times its `scaling_factor`."""
    if vae is None:
        return pixel_values.float()
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample()
    return (latents * vae.config.scaling_factor).float()
