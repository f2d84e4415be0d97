"""An independent check of the capture: what the pipeline stores must be what the read layers themselves computed.

Every other test compares captured features with other captured features; a capture processor that stored the value
projection instead of the key (or split the heads wrongly, or took the query before `norm_q`) passed them all. Here
forward hooks on each read layer's own submodules (`to_q`, `to_k`, `to_v`, `norm_q`, `norm_k`, `to_out`) record
what the layer computed, with no help from the capture processor, and

1. the captured queries and keys, per head, must equal the layer's `to_q`/`to_k` outputs split into heads (after
   `norm_q`/`norm_k` where the layer has them), and `to_q`/`to_k` must have seen the attention module's own input
   (after its `group_norm`, flattened to tokens), for SD 2- and SD 1-shaped pipelines (linear and convolutional
   `proj_in`), batch sizes 1 and > 1, ensembles, with and without the early exit;
2. the layer's output, recomputed from the captured Q and K and the layer's own V (softmax by hand, not SDPA),
   must equal what the UNet produced (the `to_out` output, and the module's output where the forward got that far),
   and the UNet's output with the capture processors installed must equal the stock processors' output.
"""

import math
from collections import defaultdict

import pytest
import torch
from diffusers.models.attention_processor import Attention

from cosegment import StableDiffusionCoSegmentationPipeline

HEIGHT, WIDTH = 64, 128


class LayerRecorder:
    """Forward hooks on the read layers' submodules; `calls[name][part]` lists one record per forward, in order.

    Parts: `input` (the `hidden_states` the attention module received), `to_q`/`to_k`/`to_v` (input and output),
    `norm_q`/`norm_k` (output, where the layer has them), `to_out` (the output of `to_out[1]`, before any residual
    and rescale) and `output` (the module's output; absent for a layer whose forward ended in the early exit).
    """

    def __init__(self, unet: torch.nn.Module, layer_names: list[str]) -> None:
        self.calls: dict[str, dict[str, list]] = {name: defaultdict(list) for name in layer_names}
        self.handles = []
        modules = dict(unet.named_modules())
        for name in layer_names:
            attn = modules[name]
            assert isinstance(attn, Attention)
            record = self.calls[name]
            self._hook(attn, lambda m, a, kw, out, r=record: r["output"].append(out.detach().clone()))
            self.handles.append(
                attn.register_forward_pre_hook(
                    lambda m, a, kw, r=record: r["input"].append(
                        (a[0] if a else kw["hidden_states"]).detach().clone()
                    ),
                    with_kwargs=True,
                )
            )
            for part in ("to_q", "to_k", "to_v"):
                self._hook(
                    getattr(attn, part),
                    lambda m, a, kw, out, r=record, p=part: r[p].append((a[0].detach().clone(), out.detach().clone())),
                )
            for part in ("norm_q", "norm_k"):
                if getattr(attn, part, None) is not None:
                    self._hook(
                        getattr(attn, part), lambda m, a, kw, out, r=record, p=part: r[p].append(out.detach().clone())
                    )
            self._hook(attn.to_out[1], lambda m, a, kw, out, r=record: r["to_out"].append(out.detach().clone()))

    def _hook(self, module: torch.nn.Module, hook) -> None:
        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`(B, N, heads * d)` -> `(B, heads, N, d)`: diffusers' head layout (head `h` owns channels `h*d:(h+1)*d`)."""
    batch, tokens, inner = x.shape
    return x.reshape(batch, tokens, heads, inner // heads).permute(0, 2, 1, 3)


def attention_input_tokens(attn: Attention, hidden_states: torch.Tensor) -> torch.Tensor:
    """What `to_q` of a self-attention layer must see: the module's input as `(B, N, C)` tokens, group-normed."""
    assert attn.spatial_norm is None, "spatial_norm needs the time embedding, which this check does not record"
    if hidden_states.ndim == 4:
        batch, channels = hidden_states.shape[:2]
        hidden_states = hidden_states.reshape(batch, channels, -1).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states


def layer_qk(attn: Attention, record: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's own per-head query and key over all forwards, `(B_total, H, N, d)` each, checking on the way that
    `to_q` and `to_k` saw the module's input and that `norm_q`/`norm_k` (where present) got the head-split tensors."""
    queries, keys = [], []
    for i, ((q_in, q_out), (k_in, k_out)) in enumerate(zip(record["to_q"], record["to_k"])):
        expected_input = attention_input_tokens(attn, record["input"][i])
        torch.testing.assert_close(q_in, expected_input, rtol=0, atol=0)
        torch.testing.assert_close(k_in, expected_input, rtol=0, atol=0)  # self-attention: keys from the same tokens
        q, k = split_heads(q_out, attn.heads), split_heads(k_out, attn.heads)
        if attn.norm_q is not None:
            q = record["norm_q"][i]
            torch.testing.assert_close(q, attn.norm_q(split_heads(q_out, attn.heads)))
        if attn.norm_k is not None:
            k = record["norm_k"][i]
            torch.testing.assert_close(k, attn.norm_k(split_heads(k_out, attn.heads)))
        queries.append(q)
        keys.append(k)
    return torch.cat(queries), torch.cat(keys)


def capture_with_hooks(pipe, images, **kwargs):
    layer_names = pipe.resolve_attention_layers(kwargs.get("attention_layers"))
    recorder = LayerRecorder(pipe.unet, layer_names)
    try:
        features = pipe.capture_features(images, height=HEIGHT, width=WIDTH, **kwargs)
    finally:
        recorder.remove()
    return features, layer_names, recorder.calls


def load_pipe(path: str) -> StableDiffusionCoSegmentationPipeline:
    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd2_pipe(tiny_sd_path):
    return load_pipe(tiny_sd_path)


@pytest.fixture(scope="module")
def sd1_pipe(tiny_sd1_path):
    return load_pipe(tiny_sd1_path)


@pytest.fixture(scope="module")
def qk_norm_pipe(tiny_sd_path):
    """The SD2-shaped pipeline with a random-affine LayerNorm as `norm_q` and `norm_k` in every self-attention layer
    (as diffusers builds for `qk_norm="layer_norm"`): the captured query must be taken after it."""
    pipe = load_pipe(tiny_sd_path)
    gen = torch.Generator().manual_seed(5)
    for module in pipe.unet.modules():
        if isinstance(module, Attention) and not module.is_cross_attention:
            head_dim = module.inner_dim // module.heads
            for part in ("norm_q", "norm_k"):
                norm = torch.nn.LayerNorm(head_dim, eps=1e-6)
                with torch.no_grad():
                    norm.weight.copy_(1 + 0.5 * torch.randn(head_dim, generator=gen))
                    norm.bias.copy_(0.5 * torch.randn(head_dim, generator=gen))
                setattr(module, part, norm)
    return pipe


# (batch_size, ensemble_size, stop_early, attention_layers): 3 images, so batches of 2 and 4 leave a short last
# batch, and with an ensemble a batch holds draws of different images.
CASES = [
    pytest.param(1, 1, True, None, id="batch1-early"),
    pytest.param(2, 2, True, None, id="batch2-ensemble2-early"),
    pytest.param(4, 2, False, None, id="batch4-ensemble2-full"),
    pytest.param(3, 1, True, 1, id="batch3-fullres-layers-early"),
]


def assert_capture_is_what_the_layers_computed(pipe, photos, batch_size, ensemble_size, stop_early, layers):
    images = photos[:3]
    features, layer_names, calls = capture_with_hooks(
        pipe,
        images,
        batch_size=batch_size,
        ensemble_size=ensemble_size,
        stop_early=stop_early,
        attention_layers=layers,
        generator=torch.Generator().manual_seed(11),
    )
    num_forwards = math.ceil(len(images) * ensemble_size / batch_size)
    modules = dict(pipe.unet.named_modules())
    entry = {name: i for i, name in enumerate(features.layer_names)}
    assert len(entry) == len(layer_names) * ensemble_size
    for name in layer_names:
        attn, record = modules[name], calls[name]
        assert len(record["to_q"]) == len(record["to_k"]) == num_forwards
        queries, keys = layer_qk(attn, record)  # (M * E, H, N, d), image-major
        heads, tokens = attn.heads, features.grid_size[0] * features.grid_size[1]
        assert queries.shape == (len(images) * ensemble_size, heads, tokens, attn.inner_dim // heads)
        queries = queries.view(len(images), ensemble_size, *queries.shape[1:])
        keys = keys.view(len(images), ensemble_size, *keys.shape[1:])
        for draw in range(ensemble_size):
            index = entry[name if ensemble_size == 1 else f"{name}#{draw}"]
            torch.testing.assert_close(features.queries[index], queries[:, draw], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(features.keys[index], keys[:, draw], rtol=1e-6, atol=1e-6)
    if stop_early:  # the last read layer ended the forward: nothing after it ran
        assert len(calls[layer_names[-1]]["output"]) == 0
    else:
        assert all(len(calls[name]["output"]) == num_forwards for name in layer_names)


@pytest.mark.parametrize("batch_size, ensemble_size, stop_early, layers", CASES)
def test_sd2_capture_equals_the_layers_own_qk(sd2_pipe, photos, batch_size, ensemble_size, stop_early, layers):
    assert_capture_is_what_the_layers_computed(sd2_pipe, photos, batch_size, ensemble_size, stop_early, layers)


@pytest.mark.parametrize("batch_size, ensemble_size, stop_early, layers", CASES)
def test_sd1_capture_equals_the_layers_own_qk(sd1_pipe, photos, batch_size, ensemble_size, stop_early, layers):
    assert not sd1_pipe.unet.config.use_linear_projection  # convolutional proj_in before the transformer blocks
    assert_capture_is_what_the_layers_computed(sd1_pipe, photos, batch_size, ensemble_size, stop_early, layers)


@pytest.mark.parametrize("batch_size, ensemble_size, stop_early, layers", CASES[1:3])
def test_capture_is_taken_after_norm_q_and_norm_k(qk_norm_pipe, photos, batch_size, ensemble_size, stop_early, layers):
    assert_capture_is_what_the_layers_computed(qk_norm_pipe, photos, batch_size, ensemble_size, stop_early, layers)


def recompute_output(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Self-attention output from per-head `(B, H, N, d)` Q, K, V, by hand: softmax(Q K^T * scale) V, heads merged,
    `to_out`. Returns `(B, N, C)` (before any residual and rescale)."""
    weights = torch.softmax(query.double() @ key.double().transpose(-1, -2) * attn.scale, dim=-1)
    out = (weights @ value.double()).to(query.dtype)
    batch, heads, tokens, head_dim = out.shape
    out = out.permute(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)
    return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("pipe_name", ["sd2_pipe", "sd1_pipe", "qk_norm_pipe"])
@pytest.mark.parametrize("stop_early", [True, False], ids=["early", "full"])
def test_layer_output_recomputed_from_captured_qk_and_own_v(pipe_name, stop_early, request, photos):
    pipe = request.getfixturevalue(pipe_name)
    unet_io = []
    pre = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: unet_io.append([a, {k: v for k, v in kw.items() if k != "return_dict"}]), with_kwargs=True
    )
    post = pipe.unet.register_forward_hook(lambda m, a, kw, out: unet_io[-1].append(out[0]), with_kwargs=True)
    try:
        features, layer_names, calls = capture_with_hooks(
            pipe,
            photos[:3],
            batch_size=2,
            ensemble_size=1,
            stop_early=stop_early,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        pre.remove()
        post.remove()
    modules = dict(pipe.unet.named_modules())
    for i, name in enumerate(layer_names):
        attn, record = modules[name], calls[name]
        value = torch.cat([split_heads(out, attn.heads) for _, out in record["to_v"]])
        produced = torch.cat(record["to_out"])
        recomputed = recompute_output(attn, features.queries[i], features.keys[i], value)
        torch.testing.assert_close(recomputed, produced, rtol=1e-4, atol=1e-5)
        # and the attention module returned that, once its residual and rescale are undone (SD's attn1 has neither)
        if record["output"]:
            module_out = torch.cat(record["output"]) * attn.rescale_output_factor
            if attn.residual_connection:
                module_out = module_out - torch.cat(record["input"])
            torch.testing.assert_close(module_out, produced, rtol=0, atol=0)
    if not stop_early:
        # the capture processors change nothing the UNet computes
        assert len(unet_io) == 2 and all(len(io) == 3 for io in unet_io)
        for args, kwargs, captured in unet_io:
            with torch.no_grad():
                reference = pipe.unet(*args, **kwargs, return_dict=False)[0]
            torch.testing.assert_close(captured, reference, rtol=1e-5, atol=1e-5)
