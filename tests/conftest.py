import atexit
import os
import shutil
import tempfile


# Tests run offline and never touch the user's Hugging Face cache, token or remote-code modules (diffusers copies
# trust_remote_code files under HF_HOME); the Hub tests set their own endpoint and HF_HOME on top of this.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="sculptdiff-tests-hf-home-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Tiny models gain nothing from intra-op threads, and the suite runs two workers on two cores (pytest -n 2):
# one thread per process (subprocesses inherit it) avoids oversubscription, which slows torch down many times.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DModel  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast  # noqa: E402


torch.set_num_threads(1)


WORDS = ["a", "photo", "of", "digit", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow check: set RUN_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def build_tiny_tokenizer(model_max_length: int = 16) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline, with CLIP's special tokens, for tiny text encoders."""
    vocab = {"<|pad|>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "<|unk|>": 3}
    vocab.update({word: index + len(vocab) for index, word in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        model_max_length=model_max_length,
    )


def build_tiny_text_encoder(hidden_size: int = 32) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=4 + len(WORDS),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return CLIPTextModel(config).eval()


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_text_encoder() -> CLIPTextModel:
    return build_tiny_text_encoder()


def build_tiny_vae() -> AutoencoderKL:
    """A 2-level AutoencoderKL (8-16 channels, 4 latent channels, so a scale factor of 2) for RGB images."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


@pytest.fixture
def tiny_vae() -> AutoencoderKL:
    return build_tiny_vae()


@pytest.fixture
def tiny_stock_unet() -> UNet2DModel:
    """diffusers' own UNet2DModel, 2 levels of 8-16 channels with attention at the second, for 8x8 RGB images."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
