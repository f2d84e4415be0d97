"""Memory formats: the VAE's input layout chosen per device (modules untouched), and a user's channels_last UNet."""

import pytest
import torch

from cosegment import StableDiffusionCoSegmentationPipeline
from cosegment.utils.images import preferred_memory_format

KWARGS = {"height": 128, "width": 128}


def _capture(pipe, photos, **kwargs):
    return pipe.capture_features(photos[:3], generator=torch.Generator().manual_seed(5), **KWARGS, **kwargs)


def _assert_features_close(a, b) -> None:
    assert a.layer_names == b.layer_names and len(a.queries) == len(b.queries) > 0
    for x, y in zip(a.queries + a.keys, b.queries + b.keys):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def _layout(x: torch.Tensor) -> str:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return "channels_last"
    return "contiguous" if x.is_contiguous() else "other"


def _record_input_layouts(pipe):
    """Records, per forward, the layout of the VAE encoder's and the UNet's first convolutions' inputs."""
    seen = {"vae": [], "unet": []}

    def recorder(key):
        return lambda module, args: seen[key].append(_layout(args[0]))

    handles = [
        pipe.vae.encoder.conv_in.register_forward_pre_hook(recorder("vae")),
        pipe.unet.conv_in.register_forward_pre_hook(recorder("unet")),
    ]
    return seen, handles


@pytest.mark.parametrize(
    "device, expected",
    [("cpu", torch.channels_last), ("cuda", torch.channels_last), ("mps", torch.contiguous_format)],
)
def test_preferred_memory_format_per_device(device, expected):
    assert preferred_memory_format(device) == expected
    assert preferred_memory_format(torch.device(device)) == expected


def test_vae_input_is_channels_last_on_cpu_and_modules_are_not_converted(tiny_pipe, photos, monkeypatch):
    layouts = {
        name: (p.is_contiguous(), p.is_contiguous(memory_format=torch.channels_last))
        for module in (tiny_pipe.vae, tiny_pipe.unet)
        for name, p in module.named_parameters()
    }
    seen, handles = _record_input_layouts(tiny_pipe)
    try:
        default = _capture(tiny_pipe, photos, batch_size=2)  # two VAE batches
        monkeypatch.setattr(tiny_pipe, "vae_input_memory_format", torch.contiguous_format)
        contiguous = _capture(tiny_pipe, photos, batch_size=2)
    finally:
        for handle in handles:
            handle.remove()
    # per device by default (channels_last on CPU), the override when set; the UNet gets NCHW either way
    assert seen["vae"] == ["channels_last"] * 2 + ["contiguous"] * 2
    assert seen["unet"] == ["contiguous"] * 4
    # only the inputs were laid out: no parameter of the modules (shared with from_pipe siblings) changed layout
    for module in (tiny_pipe.vae, tiny_pipe.unet):
        for name, p in module.named_parameters():
            assert (p.is_contiguous(), p.is_contiguous(memory_format=torch.channels_last)) == layouts[name], name
    _assert_features_close(default, contiguous)


def test_user_channels_last_unet_gives_the_contiguous_results(tiny_sd_path, photos):
    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(tiny_sd_path)  # its own modules: converted below
    pipe.set_progress_bar_config(disable=True)
    reference = _capture(pipe, photos)
    reference_out = pipe(image=photos[:3], generator=torch.Generator().manual_seed(5), output_type="pt", **KWARGS)

    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    weight = pipe.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    early = _capture(pipe, photos)
    full = _capture(pipe, photos, stop_early=False)
    out = pipe(image=photos[:3], generator=torch.Generator().manual_seed(5), output_type="pt", **KWARGS)

    _assert_features_close(early, reference)
    # the early exit still captures exactly what a full forward does
    for a, b in zip(early.queries + early.keys, full.queries + full.keys):
        assert torch.equal(a, b)
    torch.testing.assert_close(out.density_maps, reference_out.density_maps, rtol=1e-4, atol=1e-4)
