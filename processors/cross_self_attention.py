"""Attention processor that records the self-attention queries and keys of chosen layers.

The processor computes exactly what diffusers' :class:`AttnProcessor2_0` computes (same operations, same order) and
hands the per-head queries and keys to a per-call :class:`AttentionStore`. No global state: the store is created for
one pipeline call and given to every processor of that call; the pipeline restores the original processors in a
``finally`` block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.utils.torch_utils import is_compiled_module

try:
    from diffusers.utils.torch_utils import unwrap_module
except ImportError:  # diffusers < 0.35 has no `unwrap_module`: the same two lines

    def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
        """The module inside a `torch.compile` wrapper, or the module itself."""
        return module._orig_mod if is_compiled_module(module) else module


class StopForward(Exception):
    """Raised by the last capturing processor so that the UNet forward ends early (nothing after it is needed)."""


class AttentionStore:
    """Collects the queries and keys of the chosen layers during one pipeline call.

    Args:
        layer_names (`list[str]`): the attention modules (names as in `unet.named_modules()`) to record.
        stop_after_last (`bool`, defaults to `False`): raise :class:`StopForward` once every chosen layer has
            run in the current forward, so the rest of the UNet is skipped.

    Attributes:
        queries, keys (`dict[str, list[torch.Tensor]]`): per layer, one `(B, H, N, d)` tensor per forward.
    """

    def __init__(self, layer_names: list[str], stop_after_last: bool = False) -> None:
        self.layer_names = list(layer_names)
        self.stop_after_last = stop_after_last
        self.queries: dict[str, list[torch.Tensor]] = {name: [] for name in self.layer_names}
        self.keys: dict[str, list[torch.Tensor]] = {name: [] for name in self.layer_names}
        self._seen_this_forward: set[str] = set()
        self.stopped_at: str | None = None

    def begin_forward(self) -> None:
        """Marks the start of a UNet forward (resets the early-exit bookkeeping)."""
        self._seen_this_forward = set()
        self.stopped_at = None

    def add(self, name: str, query: torch.Tensor, key: torch.Tensor) -> None:
        """Stores `(B, H, N, d)` query and key of layer `name`; may raise :class:`StopForward`."""
        self.queries[name].append(query.detach())
        self.keys[name].append(key.detach())
        self._seen_this_forward.add(name)
        if self.stop_after_last and len(self._seen_this_forward) == len(self.layer_names):
            self.stopped_at = name
            raise StopForward()

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Concatenates the forwards of each layer along the batch: two lists of `(B_total, H, N, d)` tensors."""
        queries = [torch.cat(self.queries[name], dim=0) for name in self.layer_names]
        keys = [torch.cat(self.keys[name], dim=0) for name in self.layer_names]
        return queries, keys


class CrossSelfAttentionCaptureProcessor(AttnProcessor2_0):
    """:class:`AttnProcessor2_0` that also records the layer's per-head query and key.

    The output equals the stock processor's (same code path); the query and key are stored as `(B, H, N, d)` after
    the head split (and after `norm_q`/`norm_k` where the layer has them), which are the tensors the softmax of
    Eq. 2.1 is taken over.

    Args:
        store (`AttentionStore`): the per-call store.
        name (`str`): the attention module's name, used as the store key.
    """

    def __init__(self, store: AttentionStore, name: str) -> None:
        super().__init__()
        self.store = store
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor

        # Record after the stock output is computed, so that an early exit happens after this layer has run.
        self.store.add(self.name, query, key)
        return hidden_states


def finish_interrupted_forward(model: torch.nn.Module, stopped_at: str) -> None:
    """Does for the hooks of `model` what the end of a completed forward would have done, after :class:`StopForward`
    ended the forward inside the module named `stopped_at`.

    Design (how the early exit cooperates with diffusers' and accelerate's hooks): the exception leaves every module
    still in flight -- `stopped_at` and its ancestors, the modules whose forward called it -- without the
    `post_forward` of its hooks. So, innermost first, each of them runs its diffusers hooks' `post_forward` (in the
    order a completed forward runs them: first registered first) and then its accelerate hook's. For group offloading
    this offloads the groups whose offload leader was in flight and lets the lazy-prefetch hook (`use_stream=True`)
    settle its execution order instead of recording every call. Then every group-offloading group still onloaded --
    prefetched for a block that never ran, or led by a module after the exit (`num_blocks_per_group > 1`) -- is
    offloaded (`offload_` is idempotent). This needs only the name of the layer that stopped the forward, not which
    processors are installed, so processors that stay installed and switch by state work the same.

    Args:
        model (`torch.nn.Module`): the model whose forward was interrupted (the UNet).
        stopped_at (`str`): the name in `model.named_modules()` of the module that raised.
    """
    parts = stopped_at.split(".")
    in_flight = [".".join(parts[:i]) for i in range(len(parts), -1, -1)]  # innermost first, "" is `model`
    for name in in_flight:
        module = model.get_submodule(name)
        if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            continue  # containers are indexed, never called
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            for hook in list(registry.hooks.values()):  # a hook may remove itself (lazy prefetching does)
                hook.post_forward(module, None)
        accelerate_hook = getattr(module, "_hf_hook", None)
        if accelerate_hook is not None:
            accelerate_hook.post_forward(module, None)
    for group in offloading_groups(model):
        group.offload_()


def offloading_groups(model: torch.nn.Module) -> list:
    """The distinct `ModuleGroup`s of diffusers' group offloading under `model`, in module order (empty without it)."""
    try:
        from diffusers.hooks.group_offloading import GroupOffloadingHook
    except ImportError:  # diffusers < 0.33 has no group offloading
        return []
    groups = {}
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in registry.hooks.values() if registry is not None else ():
            if isinstance(hook, GroupOffloadingHook):
                groups[id(hook.group)] = hook.group
    return list(groups.values())


def runs_compiled(model: torch.nn.Module) -> bool:
    """Whether calling `model` runs `torch.compile`'s code: the wrapper `torch.compile(model)` returns
    (`OptimizedModule`), or a module compiled in place with `model.compile()`."""
    return is_compiled_module(model) or getattr(unwrap_module(model), "_compiled_call_impl", None) is not None


def capture_stops_early(model: torch.nn.Module, stop_early: bool) -> bool:
    """Whether the capture of `model` ends its forward with :class:`StopForward` (`stop_early`, in eager only).

    A compiled UNet never raises it: dynamo cannot trace an exception that leaves the compiled function, so it falls
    back to eager for the UNet's frame and compiles its blocks one by one, and more of them on the second call (tiny
    UNet: 13 graphs, then 24; raising from a `torch.compiler.disable`d function: 16, then 25). A compiled UNet stops
    early through :func:`compiled_prefix` instead (a compiled forward that returns after the last read layer), or runs
    its whole forward where the prefix does not apply. The queries and keys are the same in every case (the early exit
    only skips what runs after the last read layer)."""
    return stop_early and not runs_compiled(model)


def compile_context(model: torch.nn.Module):
    """The dynamo context `model` was compiled with (its backend, mode and options), or `None`.

    For the wrapper of `torch.compile(model, ...)` it is the wrapper's `dynamo_ctx`; for `model.compile(...)` it is the
    context held by the compiled call (`_compiled_call_impl`). Calling the context on a function compiles that function
    the same way."""
    from torch._dynamo.eval_frame import _TorchDynamoContext

    context = getattr(model, "dynamo_ctx", None)
    if isinstance(context, _TorchDynamoContext):
        return context
    compiled_call = getattr(unwrap_module(model), "_compiled_call_impl", None)
    for cell in getattr(compiled_call, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(content, _TorchDynamoContext):
            return content
    return None


def prefix_stop(unet: torch.nn.Module, layer_names: list[str]) -> tuple | None:
    """Where :func:`unet_prefix_forward` stops for the read layers `layer_names`, or `None` where it does not apply.

    Returns `("down", i)` or `("mid",)` (the block holding the last read layer runs whole), or `("up", i, j)` (up block
    `i` runs until its attention `j`, which holds the last read layer). `None` unless `unet` is a plain text-conditioned
    :class:`UNet2DConditionModel` (its own `forward`, no class or added embedding, no encoder projection, no centred
    input, FreeU off) without hooks that its own forward would run (accelerate's, diffusers' offloading, forward hooks
    on the UNet itself), and the last read layer sits in a down, mid or `CrossAttnUpBlock2D` up block's attentions."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D

    unet = unwrap_module(unet)
    if type(unet).forward is not UNet2DConditionModel.forward or not layer_names:
        return None
    config = unet.config
    if (
        config.center_input_sample
        or unet.class_embedding is not None
        or config.addition_embed_type is not None
        or unet.encoder_hid_proj is not None
        or unet._forward_hooks
        or unet._forward_pre_hooks
    ):
        return None
    for module in unet.modules():
        if getattr(module, "_hf_hook", None) is not None or getattr(module, "_diffusers_hook", None) is not None:
            return None
    for block in unet.up_blocks:
        if all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2")):
            return None  # FreeU changes the up blocks' inputs
    order = {name: index for index, (name, _) in enumerate(unet.named_modules())}
    if any(name not in order for name in layer_names):
        return None
    parts = max(layer_names, key=order.__getitem__).split(".")
    if parts[0] == "down_blocks" and len(parts) > 2 and parts[2] == "attentions":
        return ("down", int(parts[1]))
    if parts[0] == "mid_block" and len(parts) > 1 and parts[1] == "attentions":
        return ("mid",)
    if parts[0] == "up_blocks" and len(parts) > 3 and parts[2] == "attentions":
        if type(unet.up_blocks[int(parts[1])]) is CrossAttnUpBlock2D:
            return ("up", int(parts[1]), int(parts[3]))
    return None


def unet_prefix_forward(
    unet: torch.nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    stop: tuple,
) -> torch.Tensor:
    """The start of :meth:`UNet2DConditionModel.forward` up to the stop :func:`prefix_stop` chose (mirrors it for the
    plain text-conditioned case, with no mask, no extra residuals and no `cross_attention_kwargs`), then returns the
    hidden states there. The modules run are the forward's own, with the same inputs in the same order, so a capture
    processor records the same queries and keys (bitwise, in eager). It exists for a compiled UNet: a forward that
    returns early, which dynamo compiles into graphs that later calls reuse, unlike an exception.

    Args:
        unet (`UNet2DConditionModel`): the (unwrapped) UNet.
        sample (`torch.Tensor` of shape `(B, C, h, w)`): noisy latents.
        timestep (`torch.Tensor` of shape `(B,)`): their timesteps.
        encoder_hidden_states (`torch.Tensor` of shape `(B, L, D)`): the text condition.
        stop (`tuple`): from :func:`prefix_stop`.
    """
    forward_upsample_size = any(size % 2**unet.num_upsamplers != 0 for size in sample.shape[-2:])
    upsample_size = None
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    sample = unet.conv_in(sample)
    down_block_res_samples = (sample,)
    for index, block in enumerate(unet.down_blocks):
        if getattr(block, "has_cross_attention", False):
            sample, res_samples = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample, res_samples = block(hidden_states=sample, temb=emb)
        down_block_res_samples += res_samples
        if stop == ("down", index):
            return sample
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = unet.mid_block(sample, emb)
    if stop == ("mid",):
        return sample
    for index, block in enumerate(unet.up_blocks):
        res_samples = down_block_res_samples[-len(block.resnets) :]
        down_block_res_samples = down_block_res_samples[: -len(block.resnets)]
        if stop[1] == index:  # CrossAttnUpBlock2D.forward's loop, until attention `stop[2]`
            for resnet, attention in list(zip(block.resnets, block.attentions))[: stop[2] + 1]:
                sample = torch.cat([sample, res_samples[-1]], dim=1)
                res_samples = res_samples[:-1]
                sample = resnet(sample, emb)
                sample = attention(sample, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
            return sample
        if index < len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = down_block_res_samples[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(
                hidden_states=sample,
                temb=emb,
                res_hidden_states_tuple=res_samples,
                encoder_hidden_states=encoder_hidden_states,
                upsample_size=upsample_size,
            )
        else:
            sample = block(
                hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples, upsample_size=upsample_size
            )
    raise ValueError(f"`stop`={stop!r} names no block of the UNet.")


def compiled_prefix(unet: torch.nn.Module, layer_names: list[str]):
    """For a compiled `unet` (either form), a callable `(sample, timestep, encoder_hidden_states)` that runs
    :func:`unet_prefix_forward` compiled with the UNet's own dynamo context (backend, mode, options; `torch.compile`'s
    defaults if it cannot be found), so the capture stops after the last read layer and later calls reuse the graphs.
    `None` for an eager UNet or where :func:`prefix_stop` does not apply (the compiled UNet then runs whole)."""
    if not runs_compiled(unet):
        return None
    stop = prefix_stop(unet, layer_names)
    if stop is None:
        return None
    context = compile_context(unet)
    compiled = context(unet_prefix_forward) if context is not None else torch.compile(unet_prefix_forward)
    module = unwrap_module(unet)

    def run(sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return compiled(module, sample, timestep, encoder_hidden_states, stop)

    return run


def self_attention_layer_levels(unet: torch.nn.Module) -> dict[str, int]:
    """Self-attention (`attn1`) modules of a UNet and their downsampling level.

    A layer at level `l` sees the latent grid downsampled `2 ** l` times: its token grid is
    `(height / vae_scale_factor / 2 ** l, width / vae_scale_factor / 2 ** l)`. A compiled UNet (the wrapper of
    `torch.compile(unet)`) gives the names of the module it wraps.

    Returns:
        `{module_name: level}` in module order, for every `Attention` module named `...attn1` that is not a
        cross-attention layer.
    """
    unet = unwrap_module(unet)  # `torch.compile(unet)`'s wrapper names the layers `_orig_mod.<name>`
    down_levels, level = [], 0
    for block in getattr(unet, "down_blocks", []):
        down_levels.append(level)
        if getattr(block, "downsamplers", None):
            level += 1
    bottom = level
    up_levels = []
    for block in getattr(unet, "up_blocks", []):
        up_levels.append(level)
        if getattr(block, "upsamplers", None):
            level -= 1
    levels = {}
    for name, module in unet.named_modules():
        if not isinstance(module, Attention) or not name.endswith("attn1") or module.is_cross_attention:
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            levels[name] = down_levels[int(parts[1])]
        elif parts[0] == "up_blocks":
            levels[name] = up_levels[int(parts[1])]
        elif parts[0] == "mid_block":
            levels[name] = bottom
    return levels
