"""Bad input is refused before any model runs, with an error that names the argument and the value (issue #6).

Every case checks: the exception type, the argument's name in backticks and the offending value in the message; that
no model (UNet, VAE encoder, text encoder) ran; that the original attention processors are in place (identity); and
that a valid call still works afterwards.
"""

import inspect
import math

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import NO_FILTER

from cosegment import CoSegmentationFeatures, analyze_features

NAN, INF = float("nan"), float("inf")
MID = "mid_block.attentions.0.transformer_blocks.0.attn1"
UP1 = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
UP2 = "up_blocks.2.attentions.0.transformer_blocks.0.attn1"


def _img(seed: int = 0, shape=(64, 64, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


IMG = _img()


def _valid_kwargs() -> dict:
    return {
        "image": [_img(1), _img(2)],
        "height": 64,
        "width": 64,
        "generator": torch.Generator().manual_seed(0),
        **NO_FILTER,
    }


# (id, arguments replacing the valid ones, exception type, fragments that must appear in the message)
CASES = [
    # --- the collection
    ("image-none", {"image": None}, ValueError, ["`image`", "None"]),
    ("image-empty-list", {"image": []}, ValueError, ["`image`", "got 0"]),
    ("image-empty-tuple", {"image": ()}, ValueError, ["`image`", "got 0"]),
    ("image-one", {"image": [IMG]}, ValueError, ["`image`", "at least 2", "got 1"]),
    ("image-single-array", {"image": IMG}, ValueError, ["`image`", "(64, 64, 3)"]),
    ("image-single-tensor", {"image": torch.rand(3, 64, 64)}, ValueError, ["`image`", "(3, 64, 64)"]),
    ("image-single-pil", {"image": PIL.Image.fromarray(IMG)}, ValueError, ["`image`", "single image"]),
    ("image-batch-of-one", {"image": torch.rand(1, 3, 64, 64)}, ValueError, ["`image`", "got 1"]),
    ("image-string", {"image": "cat.jpg"}, TypeError, ["`image`", "'cat.jpg'"]),
    ("image-dict", {"image": {"a": IMG}}, TypeError, ["`image`", "dict"]),
    ("image-int", {"image": 3}, TypeError, ["`image`", "3"]),
    # --- one image of the collection
    ("item-string", {"image": [IMG, "cat.jpg"]}, TypeError, ["`image[1]`", "'cat.jpg'"]),
    ("item-none", {"image": [None, IMG]}, TypeError, ["`image[0]`", "None"]),
    ("item-nested-list", {"image": [IMG, [IMG, IMG]]}, TypeError, ["`image[1]`", "list"]),
    ("item-zero-rows", {"image": [IMG, np.zeros((0, 64, 3), np.uint8)]}, ValueError, ["`image[1]`", "zero size"]),
    ("item-zero-channels", {"image": [IMG, np.zeros((8, 8, 0))]}, ValueError, ["`image[1]`", "zero size"]),
    ("item-zero-tensor", {"image": [IMG, torch.zeros(3, 0, 8)]}, ValueError, ["`image[1]`", "zero size"]),
    ("item-empty-pil", {"image": [IMG, PIL.Image.new("RGB", (0, 0))]}, ValueError, ["`image[1]`", "(0, 0)"]),
    ("item-nan-array", {"image": [IMG, np.full((8, 8, 3), np.nan)]}, ValueError, ["`image[1]`", "non-finite"]),
    (
        "item-inf-tensor",
        {"image": [torch.tensor([[[0.5, INF]]]).expand(3, 4, 2), IMG]},
        ValueError,
        ["`image[0]`", "non-finite"],
    ),
    ("item-2-channels", {"image": [IMG, np.zeros((8, 8, 2), np.uint8)]}, ValueError, ["`image[1]`", "got 2"]),
    ("item-5-channels", {"image": [IMG, np.zeros((8, 8, 5), np.uint8)]}, ValueError, ["`image[1]`", "got 5"]),
    ("item-tensor-hwc", {"image": [IMG, torch.rand(64, 64, 3)]}, ValueError, ["`image[1]`", "got 64", "CHW"]),
    ("item-array-chw", {"image": [IMG, np.random.rand(3, 64, 64)]}, ValueError, ["`image[1]`", "got 64", "HWC"]),
    ("item-4d-in-list", {"image": [IMG, np.zeros((2, 8, 8, 3))]}, ValueError, ["`image[1]`", "(2, 8, 8, 3)"]),
    ("item-1d", {"image": [IMG, torch.zeros(8)]}, ValueError, ["`image[1]`", "(8,)"]),
    ("item-int64", {"image": [IMG, np.zeros((8, 8, 3), np.int64)]}, TypeError, ["`image[1]`", "int64"]),
    ("item-complex", {"image": [IMG, np.zeros((8, 8, 3), complex)]}, TypeError, ["`image[1]`", "complex"]),
    ("item-object", {"image": [IMG, np.array([[None]])]}, TypeError, ["`image[1]`", "object"]),
    ("item-int32-tensor", {"image": [IMG, torch.zeros(3, 8, 8, dtype=torch.int32)]}, TypeError, ["`image[1]`"]),
    ("item-float-0-255", {"image": [IMG, np.full((8, 8, 3), 200.0)]}, ValueError, ["`image[1]`", "200", "[0, 1]"]),
    ("item-float-minus1-1", {"image": [torch.linspace(-1, 1, 192).view(3, 8, 8), IMG]}, ValueError, ["`image[0]`"]),
    # --- scalars
    ("prompt-bytes", {"prompt": b"a cat"}, TypeError, ["`prompt`", "b'a cat'"]),
    ("prompt-and-embeds", {"prompt": "", "prompt_embeds": torch.zeros(1, 77, 32)}, ValueError, ["`prompt`", "''"]),
    ("embeds-array", {"prompt_embeds": np.zeros((1, 77, 32))}, TypeError, ["`prompt_embeds`", "numpy"]),
    ("embeds-2d", {"prompt_embeds": torch.zeros(77, 32)}, ValueError, ["`prompt_embeds`", "(77, 32)"]),
    ("embeds-batch-2", {"prompt_embeds": torch.zeros(2, 77, 32)}, ValueError, ["`prompt_embeds`", "(2, 77, 32)"]),
    ("embeds-wrong-dim", {"prompt_embeds": torch.zeros(1, 77, 16)}, ValueError, ["`prompt_embeds`", "(1, L, 32)"]),
    ("embeds-no-tokens", {"prompt_embeds": torch.zeros(1, 0, 32)}, ValueError, ["`prompt_embeds`", "(1, 0, 32)"]),
    ("embeds-int", {"prompt_embeds": torch.zeros(1, 77, 32, dtype=torch.long)}, ValueError, ["`prompt_embeds`"]),
    ("embeds-nan", {"prompt_embeds": torch.full((1, 77, 32), NAN)}, ValueError, ["`prompt_embeds`", "finite"]),
    ("prompt-list", {"prompt": ["a cat"]}, TypeError, ["`prompt`", "['a cat']"]),
    ("prompt-int", {"prompt": 3}, TypeError, ["`prompt`", "3"]),
    ("height-zero", {"height": 0}, ValueError, ["`height`", "64", "got 0"]),
    ("height-negative", {"height": -64}, ValueError, ["`height`", "-64"]),
    ("height-not-multiple", {"height": 100}, ValueError, ["`height`", "100"]),
    ("height-float", {"height": 64.0}, ValueError, ["`height`", "64.0"]),
    ("height-string", {"height": "64"}, ValueError, ["`height`", "'64'"]),
    ("height-bool", {"height": True}, ValueError, ["`height`", "True"]),
    ("width-too-small", {"width": 32}, ValueError, ["`width`", "32"]),
    ("timestep-negative", {"timestep": -1}, ValueError, ["`timestep`", "1000", "-1"]),
    ("timestep-too-large", {"timestep": 1000}, ValueError, ["`timestep`", "got 1000"]),
    ("timestep-float", {"timestep": 261.5}, ValueError, ["`timestep`", "261.5"]),
    ("timestep-none", {"timestep": None}, ValueError, ["`timestep`", "None"]),
    ("ensemble-zero", {"ensemble_size": 0}, ValueError, ["`ensemble_size`", "0"]),
    ("ensemble-float", {"ensemble_size": 1.5}, ValueError, ["`ensemble_size`", "1.5"]),
    ("batch-zero", {"batch_size": 0}, ValueError, ["`batch_size`", "0"]),
    ("batch-negative", {"batch_size": -3}, ValueError, ["`batch_size`", "-3"]),
    ("batch-none", {"batch_size": None}, ValueError, ["`batch_size`", "None"]),
    # --- layers
    ("layers-unknown-pattern", {"attention_layers": "no_such_block"}, ValueError, ["`attention_layers`", UP2]),
    ("layers-unknown-name", {"attention_layers": ["foo.attn1"]}, ValueError, ["`attention_layers`", "foo", UP2]),
    ("layers-cross-attention", {"attention_layers": [UP2[:-1] + "2"]}, ValueError, ["`attention_layers`", UP2]),
    ("layers-empty-list", {"attention_layers": []}, ValueError, ["`attention_layers`", UP2]),
    ("layers-mixed-grids", {"attention_layers": [UP1, UP2]}, ValueError, ["`attention_layers`", "one token grid"]),
    ("layers-bad-regex", {"attention_layers": "up_blocks.("}, ValueError, ["`attention_layers`", "regex"]),
    ("layers-int-not-power", {"attention_layers": 3}, ValueError, ["`attention_layers`", "3"]),
    ("layers-int-absent", {"attention_layers": 16}, ValueError, ["`attention_layers`", "16", "available"]),
    ("layers-bool", {"attention_layers": True}, TypeError, ["`attention_layers`", "True"]),
    ("layers-ints", {"attention_layers": [1, 2]}, TypeError, ["`attention_layers`", "[1, 2]"]),
    # --- analysis
    ("entropy-negative", {"max_entropy": -1.0}, ValueError, ["`max_entropy`", "-1.0"]),
    ("spread-nan", {"max_spread": NAN}, ValueError, ["`max_spread`", "nan"]),
    ("collapse-string", {"max_collapse": "0.5"}, ValueError, ["`max_collapse`", "'0.5'"]),
    ("inverse-error-minus-inf", {"max_inverse_error": -INF}, ValueError, ["`max_inverse_error`", "-inf"]),
    ("selection-unknown", {"selection": "best"}, ValueError, ["`selection`", "'best'", "paper", "auto"]),
    ("selection-none", {"selection": None}, ValueError, ["`selection`", "None"]),
    ("output-type-unknown", {"output_type": "pil"}, ValueError, ["`output_type`", "'pil'", "np"]),
    ("paper-on-one-token", {"selection": "paper", "attention_layers": MID}, ValueError, ["`selection`", "(1, 1)"]),
    ("num-parts-zero", {"num_parts": 0}, ValueError, ["`num_parts`", "0"]),
    # --- randomness
    ("generator-seed", {"generator": 0}, TypeError, ["`generator`", "0"]),
    ("generator-numpy", {"generator": np.random.default_rng(0)}, TypeError, ["`generator`", "Generator"]),
    ("generator-list-short", {"generator": [torch.Generator()]}, ValueError, ["`generator`", "2 images", "got 1"]),
    ("generator-list-long", {"generator": [torch.Generator()] * 3}, ValueError, ["`generator`", "got 3"]),
    ("generator-list-empty", {"generator": []}, ValueError, ["`generator`", "got 0"]),
    ("generator-list-mixed", {"generator": [torch.Generator(), 3]}, TypeError, ["`generator`"]),
    ("generator-tuple", {"generator": (torch.Generator(), torch.Generator())}, TypeError, ["`generator`"]),
]


@pytest.fixture
def model_spy(tiny_pipe):
    """Counts forwards of the UNet, the VAE encoder and the text encoder while a test runs."""
    calls = []
    modules = {"unet": tiny_pipe.unet, "vae": tiny_pipe.vae.encoder, "text_encoder": tiny_pipe.text_encoder}
    handles = [m.register_forward_pre_hook(lambda *_, n=n: calls.append(n)) for n, m in modules.items()]
    yield calls
    for handle in handles:
        handle.remove()


def _call(pipe, kwargs: dict):
    """`pipe(**kwargs)`; `num_parts` goes to `check_inputs` until `__call__` takes it."""
    if "num_parts" in kwargs and "num_parts" not in inspect.signature(pipe.__call__).parameters:
        kwargs = {k: v for k, v in kwargs.items() if k not in NO_FILTER}
        kwargs.pop("generator")
        return pipe.check_inputs(**kwargs)
    return pipe(**kwargs)


@pytest.mark.parametrize(("arguments", "error", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_the_unet(tiny_pipe, model_spy, arguments, error, fragments):
    before = dict(tiny_pipe.unet.attn_processors)
    kwargs = {**_valid_kwargs(), **arguments}
    with pytest.raises(error) as info:
        _call(tiny_pipe, kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert model_spy == [], f"models ran before the error: {model_spy}"
    after = tiny_pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    # the pipeline is still usable
    out = tiny_pipe(**_valid_kwargs())
    assert out.density_maps.shape == (2, 4, 4) and np.isfinite(out.entropy_maps).all()


def test_capture_features_checks_its_arguments_too(tiny_pipe, model_spy):
    with pytest.raises(ValueError, match="`timestep`"):
        tiny_pipe.capture_features([IMG, IMG], height=64, width=64, timestep=5000)
    with pytest.raises(TypeError, match=r"`image\[1\]`"):
        tiny_pipe.capture_features([IMG, "x.png"], height=64, width=64)
    assert model_spy == []


def test_numpy_integers_are_accepted_as_sizes(tiny_pipe):
    kwargs = _valid_kwargs()
    out = tiny_pipe(**{**kwargs, "height": np.int64(64), "width": np.int32(64), "timestep": np.int64(261)})
    assert out.density_maps.shape == (2, 4, 4)


def _features(m: int = 2, grid=(2, 3), heads: int = 2, dim: int = 4) -> CoSegmentationFeatures:
    n = grid[0] * grid[1]
    return CoSegmentationFeatures([torch.randn(m, heads, n, dim)], [torch.randn(m, heads, n, dim)], grid, [(9, 9)] * m)


ANALYSIS_CASES = [
    ("features-dict", {"features": {"queries": []}}, TypeError, ["`features`", "dict"]),
    ("chunk-zero", {"chunk_size": 0}, ValueError, ["`chunk_size`", "0"]),
    ("chunk-float", {"chunk_size": 2.5}, ValueError, ["`chunk_size`", "2.5"]),
    ("device-unknown", {"device": "warp-drive"}, ValueError, ["`device`", "'warp-drive'"]),
    ("progress-not-callable", {"progress": 3}, TypeError, ["`progress`", "3"]),
    ("selection-unknown", {"selection": "magic"}, ValueError, ["`selection`", "'magic'"]),
    ("entropy-nan", {"max_entropy": NAN}, ValueError, ["`max_entropy`", "nan"]),
]


@pytest.mark.parametrize(
    ("arguments", "error", "fragments"), [c[1:] for c in ANALYSIS_CASES], ids=[c[0] for c in ANALYSIS_CASES]
)
def test_analyze_features_refuses_bad_arguments(arguments, error, fragments):
    kwargs = {"features": _features(), **arguments}
    with pytest.raises(error) as info:
        analyze_features(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


FEATURE_CASES = [
    ("grid-not-pair", {"grid_size": 6}, ["`grid_size`", "6"]),
    ("grid-fraction", {"grid_size": (2.5, 2)}, ["`grid_size`", "2.5"]),
    ("grid-mismatch", {"grid_size": (3, 3)}, ["`queries[0]`", "N=9"]),
    ("sizes-count", {"image_sizes": [(9, 9)]}, ["`image_sizes`", "1 sizes for 2"]),
    ("sizes-zero", {"image_sizes": [(9, 9), (0, 4)]}, ["`image_sizes[1]`", "(0, 4)"]),
    ("sizes-not-pairs", {"image_sizes": [9, 9]}, ["`image_sizes`", "[9, 9]"]),
    ("nan-query", {"queries": [torch.full((2, 2, 6, 4), NAN)]}, ["`queries[0]`", "NaN"]),
    ("int-keys", {"keys": [torch.zeros(2, 2, 6, 4, dtype=torch.long)]}, ["`keys[0]`", "float"]),
    ("head-mismatch", {"keys": [torch.randn(2, 3, 6, 4)]}, ["`queries[0]`", "`keys[0]`"]),
    ("no-heads", {"queries": [torch.randn(2, 0, 6, 4)], "keys": [torch.randn(2, 0, 6, 4)]}, ["no heads"]),
    ("one-image", {"queries": [torch.randn(1, 2, 6, 4)], "keys": [torch.randn(1, 2, 6, 4)]}, ["at least 2"]),
    ("three-d", {"queries": [torch.randn(2, 6, 4)]}, ["`queries[0]`", "(2, 6, 4)"]),
    ("layer-names", {"layer_names": "abc"}, ["`layer_names`"]),
]


@pytest.mark.parametrize(("changes", "fragments"), [c[1:] for c in FEATURE_CASES], ids=[c[0] for c in FEATURE_CASES])
def test_inconsistent_features_are_refused(changes, fragments):
    good = _features()
    kwargs = {"queries": good.queries, "keys": good.keys, "grid_size": (2, 3), "image_sizes": [(9, 9)] * 2}
    with pytest.raises(ValueError) as info:
        CoSegmentationFeatures(**{**kwargs, **changes})
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_huge_finite_features_are_refused_not_nan():
    """Logits that overflow float32 would make NaN probabilities: refused with a ValueError naming the pair."""
    features = _features()
    features.queries[0][1] *= 1e30
    features.keys[0][0] *= 1e30
    with pytest.raises(ValueError, match=r"pair \(0, 1\).*too large"):
        analyze_features(features, **NO_FILTER)
    assert math.isfinite(float(analyze_features(_features(), **NO_FILTER).entropy_maps.sum()))


def test_call_resolves_and_validates_once(tiny_pipe, monkeypatch):
    """`check_inputs` returns what it resolved (layers, grid, images, settings): `__call__` resolves the layers
    once, converts the images once and validates the captured features once."""
    from cosegment.analysis import CoSegmentationFeatures
    from cosegment.pipeline_cosegment import CheckedInputs

    counts = {"layers": 0, "validate": 0}
    resolve, validate = type(tiny_pipe).resolve_attention_layers, CoSegmentationFeatures.validate

    def counting_resolve(self, *args, **kwargs):
        counts["layers"] += 1
        return resolve(self, *args, **kwargs)

    def counting_validate(self):
        counts["validate"] += 1
        return validate(self)

    monkeypatch.setattr(type(tiny_pipe), "resolve_attention_layers", counting_resolve)
    monkeypatch.setattr(CoSegmentationFeatures, "validate", counting_validate)
    out = tiny_pipe(**_valid_kwargs())
    assert counts == {"layers": 1, "validate": 1}
    assert out.density_maps.shape == (2, 4, 4)
    checked = tiny_pipe.check_inputs([IMG, IMG], height=64, width=64, max_spread=2.0, num_parts=3)
    assert isinstance(checked, CheckedInputs) and checked.grid_size == (4, 4) and len(checked.images) == 2
    assert checked.layer_names == tiny_pipe.resolve_attention_layers()
    assert checked.settings.thresholds["max_spread"] == 2.0 and checked.settings.num_parts == 3
