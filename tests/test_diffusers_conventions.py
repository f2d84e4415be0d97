"""diffusers' conventions (issue 28): `encode_prompt`'s signature and return value, a pipeline without a text encoder,
and the pipeline-level helpers of Stable Diffusion pipelines (`fuse_qkv_projections`)."""

import ast
import inspect
import textwrap

import numpy as np
import pytest
import torch
from conftest import NO_FILTER
from diffusers import StableDiffusionPipeline

from cosegment import StableDiffusionCoSegmentationPipeline

CALL = {"height": 64, "width": 64}


def _images(count: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, 256, (64, 56 + 8 * i, 3), dtype=np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _return_names(function) -> list[list[str]]:
    """The names in each `return a, b` of `function` (what diffusers' `test_encode_prompt_works_in_isolation` reads to
    pair the returned tensors with `__call__`'s arguments)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
            found.append([element.id for element in node.value.elts if isinstance(element, ast.Name)])
    return found


def test_encode_prompt_has_stable_diffusions_signature_and_returns():
    ours = list(inspect.signature(StableDiffusionCoSegmentationPipeline.encode_prompt).parameters)
    theirs = list(inspect.signature(StableDiffusionPipeline.encode_prompt).parameters)
    assert ours == theirs
    assert _return_names(StableDiffusionCoSegmentationPipeline.encode_prompt) == [
        ["prompt_embeds", "negative_prompt_embeds"]
    ]
    call = inspect.signature(StableDiffusionCoSegmentationPipeline.__call__).parameters
    assert "prompt_embeds" in call and "prompt" in call


def test_encode_prompt_values(pipe):
    embeds, negative = pipe.encode_prompt("a cat", "cpu")
    assert embeds.shape == (1, 77, 32) and negative is None
    # copies per prompt, and the negative (unconditional) embeddings with guidance
    embeds3, negative3 = pipe.encode_prompt("a cat", "cpu", 3, True)
    assert embeds3.shape == negative3.shape == (3, 77, 32)
    assert torch.equal(embeds3[2], embeds[0])
    torch.testing.assert_close(negative3[0], pipe.encode_prompt("", "cpu")[0][0], rtol=0, atol=0)
    other, _ = pipe.encode_prompt("a cat", "cpu", negative_prompt="blurry", do_classifier_free_guidance=True)
    _, blurry = pipe.encode_prompt("a cat", "cpu", negative_prompt="blurry", do_classifier_free_guidance=True)
    torch.testing.assert_close(blurry, pipe.encode_prompt("blurry", "cpu")[0], rtol=0, atol=0)
    # given embeddings pass through; a list of prompts is a batch
    given = torch.randn(1, 5, 32)
    assert torch.equal(pipe.encode_prompt(None, "cpu", prompt_embeds=given)[0], given)
    assert pipe.encode_prompt(["a", "b"], "cpu")[0].shape == (2, 77, 32)
    # clip_skip: 0 is the last layer through the final norm (= the default), 1 the layer before it
    torch.testing.assert_close(pipe.encode_prompt("a cat", "cpu", clip_skip=0)[0], embeds)
    assert not torch.allclose(pipe.encode_prompt("a cat", "cpu", clip_skip=1)[0], embeds)
    with pytest.raises(ValueError, match="`clip_skip`"):
        pipe.encode_prompt("a cat", "cpu", clip_skip=-1)


def test_encode_prompt_works_in_isolation(tiny_sd_path, pipe):
    """diffusers' test's intent: the text components alone encode the prompt, and a pipeline without them, given
    those embeddings, returns what the whole pipeline returns for the prompt."""
    text_only = StableDiffusionCoSegmentationPipeline(
        vae=None, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=None, scheduler=None
    )
    embeds, _ = text_only.encode_prompt("a dog", "cpu")
    without_text = StableDiffusionCoSegmentationPipeline.from_pretrained(
        tiny_sd_path, text_encoder=None, tokenizer=None
    )
    without_text.set_progress_bar_config(disable=True)
    kwargs = dict(return_features=True, **CALL, **NO_FILTER)
    whole = pipe(_images(), prompt="a dog", generator=torch.Generator().manual_seed(3), **kwargs)
    parts = without_text(_images(), prompt_embeds=embeds, generator=torch.Generator().manual_seed(3), **kwargs)
    for a, b in zip(whole.features.queries + whole.features.keys, parts.features.queries + parts.features.keys):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(whole.density_maps, parts.density_maps)
    # without a text encoder and without embeddings: an error that names `prompt_embeds`, before anything runs
    with pytest.raises(ValueError, match="`prompt_embeds` is required"):
        without_text(_images(), generator=torch.Generator().manual_seed(3), **CALL)
    with pytest.raises(ValueError, match="`prompt_embeds`"):
        without_text.encode_prompt("a dog", "cpu")


def _processors(pipe) -> dict:
    return dict(pipe.unet.attn_processors)


def test_fuse_qkv_projections_keeps_the_capture(tiny_sd_path):
    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    originals = _processors(pipe)
    plain = pipe.capture_features(_images(3), generator=torch.Generator().manual_seed(4), **CALL)
    pipe.fuse_qkv_projections()
    fused_processors = _processors(pipe)
    assert {type(p).__name__ for p in fused_processors.values()} == {"FusedAttnProcessor2_0"}
    assert any(hasattr(module, "to_qkv") for module in pipe.unet.modules())
    fused = pipe.capture_features(_images(3), generator=torch.Generator().manual_seed(4), **CALL)
    for a, b in zip(plain.queries + plain.keys, fused.queries + fused.keys):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    after = _processors(pipe)  # the fused processors come back, the very same objects
    assert after.keys() == fused_processors.keys()
    assert all(after[name] is fused_processors[name] for name in after)
    pipe.unfuse_qkv_projections()
    assert {type(p) for p in _processors(pipe).values()} == {type(p) for p in originals.values()}
    again = pipe.capture_features(_images(3), generator=torch.Generator().manual_seed(4), **CALL)
    for a, b in zip(plain.queries + plain.keys, again.queries + again.keys):
        assert torch.equal(a, b)
