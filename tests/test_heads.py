"""The deconvolution head: published shape, channels-last layout kept through moves and loads."""

from __future__ import annotations

import torch

from em_foundation.heads.deconv import DeconvHead, up_blocks_for

CHANNELS_LAST = torch.channels_last


def _all_conv_weights_channels_last(head: DeconvHead) -> bool:
    weights = [m.weight for m in head.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    return bool(weights) and all(w.is_contiguous(memory_format=CHANNELS_LAST) for w in weights)


def test_head_upsamples_by_sixteen_for_patch_14_and_resizes_to_the_tile():
    head = DeconvHead(in_channels=24, width=32, up_blocks=up_blocks_for(14)).eval()
    with torch.no_grad():
        raw = head.classifier(head.up(head.stem(torch.randn(1, 24, 4, 4))))
        logits = head(torch.randn(1, 24, 4, 4), (56, 56))
    assert raw.shape == (1, 2, 64, 64)  # four ×2 blocks
    assert logits.shape == (1, 2, 56, 56)


def test_head_keeps_channels_last_through_to_and_load_state_dict():
    head = DeconvHead(in_channels=24, width=32, up_blocks=3)
    assert _all_conv_weights_channels_last(head)
    contiguous_state = {k: v.contiguous() for k, v in head.state_dict().items()}
    loaded = DeconvHead(in_channels=24, width=32, up_blocks=3)
    loaded.load_state_dict(contiguous_state)
    assert _all_conv_weights_channels_last(loaded.to("cpu", dtype=torch.float32))


def test_channels_last_gives_the_numbers_of_the_plain_layout():
    torch.manual_seed(0)
    head = DeconvHead(in_channels=24, width=32, up_blocks=3)
    plain = DeconvHead(in_channels=24, width=32, up_blocks=3).to(memory_format=torch.contiguous_format)
    plain.load_state_dict(head.state_dict())
    grid = torch.randn(2, 24, 6, 6)
    target = torch.randn(2, 2, 40, 40)
    outputs, grads = [], []
    for model in (head, plain):
        model.train()
        if model is plain:  # the plain layout's forward, without the conversion in DeconvHead.forward
            out = model.classifier(model.up(model.stem(grid.contiguous())))
            out = torch.nn.functional.interpolate(out, size=(40, 40), mode="bilinear", align_corners=False)
        else:
            out = model(grid, (40, 40))
        (out - target).square().mean().backward()
        outputs.append(out.detach())
        grads.append(model.stem[0].weight.grad.clone())
    # The two really differ in layout (a 3×3 conv's weight; 1×1 weights look alike in both).
    assert head.up[0][3].weight.is_contiguous(memory_format=CHANNELS_LAST)
    assert not plain.up[0][3].weight.is_contiguous(memory_format=CHANNELS_LAST)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
