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
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DiTTransformer2DModel,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast  # noqa: E402

from sculptdiff import SculptDiT2DModel, SculptPipeline, SculptScheduler, SculptUNet2DModel  # noqa: E402


torch.set_num_threads(1)


DIGIT_NAMES = {str(index): name for index, name in enumerate(["zero", "one", "two", "three", "four"])}
WORDS = ["a", "photo", "of", "digit", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts and ends with one torch thread: a script's `main` run in-process gives torch every core of
    the process (issue 18's default), and a later test comparing its numbers with a one-thread subprocess would see
    another summation order (differences of 1e-7)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


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


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


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


def build_tiny_stock_unet(**overrides) -> UNet2DModel:
    """diffusers' own UNet2DModel, 2 levels of 8-16 channels with attention at the second, for 8x8 RGB images."""
    torch.manual_seed(0)
    config = {
        "sample_size": 8,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (8, 16),
        "norm_num_groups": 8,
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    }
    return UNet2DModel(**{**config, **overrides}).eval()


@pytest.fixture
def tiny_stock_unet() -> UNet2DModel:
    return build_tiny_stock_unet()


def build_tiny_stock_dit(**overrides) -> DiTTransformer2DModel:
    """diffusers' own DiTTransformer2DModel as DiT-XL-2 is built (4 latent channels in, 8 out: the learned
    variance), 1 block of 2 heads of 8 over 2x2 patches, 10 classes."""
    torch.manual_seed(0)
    config = {
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 1,
        "sample_size": 8,
        "patch_size": 2,
        "num_embeds_ada_norm": 10,
        "norm_num_groups": 4,
    }
    return DiTTransformer2DModel(**{**config, **overrides}).eval()


@pytest.fixture
def tiny_stock_dit() -> DiTTransformer2DModel:
    return build_tiny_stock_dit()


@pytest.fixture
def tiny_stock_text_unet() -> UNet2DConditionModel:
    """diffusers' own UNet2DConditionModel for the tiny VAE's 4 latent channels, 2 levels of 8-16 channels with
    cross-attention (4 heads) to the tiny text encoder's 32-d states at the first."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    ).eval()


# What the tiny denoisers share: 8x8 grey images, 5 named classes (index 5 is the null class), the noise objective.
TINY_DENOISER_DATA = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "num_class_embeds": 5,
    "conditioning_dropout_prob": 0.1,
    "id2label": DIGIT_NAMES,
    "prediction_type": "epsilon",
}


def tiny_unet_config(**overrides) -> dict:
    """The one tiny SculptUNet2DModel of the suite: 2 levels of 8-16 channels, attention at the second, on
    `TINY_DENOISER_DATA`; `overrides` change or add config keys."""
    shape = {
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "attention_levels": (False, True),
        "attention_head_dim": 8,
        "norm_num_groups": 4,
    }
    return {**TINY_DENOISER_DATA, **shape, **overrides}


def tiny_dit_config(**overrides) -> dict:
    """The one tiny SculptDiT2DModel of the suite: 1 block of width 16 (2 heads of 8) over 2x2 patches, on
    `TINY_DENOISER_DATA`; `overrides` change or add config keys."""
    shape = {"patch_size": 2, "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8}
    return {**TINY_DENOISER_DATA, **shape, **overrides}


def with_random_zero_parameters(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in eval mode, with every parameter that starts at zero (the U-Net's ADM-style output layers, the DiT's
    adaLN-Zero gates and final layer) drawn at random: zero-initialised layers make every prediction zero, and
    guidance would have nothing to act on (trained weights are not zero)."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.2)
    return model.eval()


def build_tiny_unet(seed: int = 0, **overrides) -> SculptUNet2DModel:
    """`tiny_unet_config(**overrides)` after `torch.manual_seed(seed)`, `with_random_zero_parameters`: the same seed
    and overrides give the same weights."""
    torch.manual_seed(seed)
    return with_random_zero_parameters(SculptUNet2DModel(**tiny_unet_config(**overrides)))


def build_tiny_dit(seed: int = 0, **overrides) -> SculptDiT2DModel:
    """`tiny_dit_config(**overrides)` after `torch.manual_seed(seed)`, `with_random_zero_parameters`."""
    torch.manual_seed(seed)
    return with_random_zero_parameters(SculptDiT2DModel(**tiny_dit_config(**overrides)))


def build_tiny_pipeline(
    seed: int = 0,
    scheduler: SchedulerMixin | None = None,
    text_encoder: CLIPTextModel | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    vae: AutoencoderKL | None = None,
    backbone: str = "unet",
    **denoiser_overrides,
) -> SculptPipeline:
    """A SculptPipeline around `build_tiny_unet(seed, **denoiser_overrides)` (or, with `backbone="dit"`, around
    `build_tiny_dit(seed, **denoiser_overrides)` as its `transformer`), with a default SculptScheduler unless
    `scheduler` is given, and no progress bar."""
    if backbone == "dit":
        denoiser = {"transformer": build_tiny_dit(seed, **denoiser_overrides)}
    else:
        denoiser = {"unet": build_tiny_unet(seed, **denoiser_overrides)}
    pipe = SculptPipeline(
        **denoiser,
        scheduler=SculptScheduler() if scheduler is None else scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=vae,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Test modules reach the builders through these fixtures: `from conftest import ...` would find whichever conftest
# module was imported last (tests/hub has its own), since pytest imports each conftest.py as `conftest`.
@pytest.fixture(name="build_tiny_unet")
def build_tiny_unet_fixture():
    return build_tiny_unet


@pytest.fixture(name="build_tiny_dit")
def build_tiny_dit_fixture():
    return build_tiny_dit


# session scope: they return functions, so module-scoped fixtures of a test file may use them too
@pytest.fixture(name="build_tiny_stock_unet", scope="session")
def build_tiny_stock_unet_fixture():
    return build_tiny_stock_unet


@pytest.fixture(name="build_tiny_stock_dit", scope="session")
def build_tiny_stock_dit_fixture():
    return build_tiny_stock_dit


@pytest.fixture(name="build_tiny_pipeline")
def build_tiny_pipeline_fixture():
    return build_tiny_pipeline


# What a tiny denoiser conditioned on text instead of classes changes: no class table, cross-attention to the tiny
# text encoder's 32-d states.
TINY_TEXT_CONDITIONING = {"num_class_embeds": None, "id2label": None, "cross_attention_dim": 32}


@pytest.fixture
def build_tiny_text_pipeline(tiny_text_encoder, tiny_tokenizer):
    """`build_tiny_text_pipeline(**kwargs)`: `build_tiny_pipeline(**kwargs)` conditioned on text (the tiny text
    encoder and tokenizer, `TINY_TEXT_CONDITIONING`) instead of on classes."""

    def build(**kwargs) -> SculptPipeline:
        text = {"text_encoder": tiny_text_encoder, "tokenizer": tiny_tokenizer, **TINY_TEXT_CONDITIONING}
        return build_tiny_pipeline(**text, **kwargs)

    return build


@pytest.fixture
def build_stable_diffusion(tiny_tokenizer, tiny_text_encoder, tiny_vae):
    """`build_stable_diffusion(unet, scheduler=None)`: diffusers' own StableDiffusionPipeline around `unet` (4 latent
    channels, cross-attention width 32), with the tiny text encoder and VAE and `scheduler` (by default a
    DDIMScheduler with Stable Diffusion's settings)."""

    def build(unet: torch.nn.Module, scheduler: SchedulerMixin | None = None) -> StableDiffusionPipeline:
        if scheduler is None:
            scheduler = DDIMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
            )
        pipeline = StableDiffusionPipeline(
            vae=tiny_vae,
            text_encoder=tiny_text_encoder,
            tokenizer=tiny_tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    return build
