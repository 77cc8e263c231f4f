"""The VAE service's condition videos (Wan I2V / FLF2V): images placed at frame positions in zeros, as
WanImageToVideoPipeline builds them; bad positions and counts are InvalidArgument naming the value."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import InvalidArgument
from services.vae.server import condition_video


def test_first_and_last_frame():
    first, last = torch.rand(3, 8, 8) * 2 - 1, torch.rand(3, 8, 8) * 2 - 1
    video = condition_video([first, last], [0, -1], 9)
    want = torch.cat([first[:, None], first.new_zeros(3, 7, 8, 8), last[:, None]], dim=1)[None]
    assert torch.equal(video, want)
    assert torch.equal(condition_video([first], [0], 5)[0, :, 1:], torch.zeros(3, 4, 8, 8))


@pytest.mark.parametrize(
    ("images", "positions", "frames", "needle"),
    [
        (2, [0, 0], 5, r"frame_positions\[1\]=0"),
        (1, [9], 5, r"frame_positions\[0\]=9"),
        (1, [0], 6, "num_frames"),
        (2, [0, 1, 2], 5, "3 entries for 2 inputs"),
    ],
)
def test_bad_positions(images, positions, frames, needle):
    with pytest.raises(InvalidArgument, match=needle):
        condition_video([torch.zeros(3, 4, 4)] * images, positions, frames)
