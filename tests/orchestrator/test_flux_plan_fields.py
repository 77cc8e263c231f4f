"""The FLUX family refuses request fields it does not use (video, second-expert and sampler options) instead of
ignoring them, naming the field."""

from __future__ import annotations

import pytest

from orchestrator.errors import StageError
from orchestrator.families import flux
from protos import orchestrator_pb2


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"num_frames": 5}, "num_frames is set, but FLUX.1 does not use it"),
        ({"cfg_scale_2": 2.0}, "cfg_scale_2 is set"),
        ({"last_image": {"data": b"x"}}, "last_image is set"),
        ({"sampler": {"solver": "unipc"}}, "sampler.solver 'unipc'"),
        ({"sampler": {"eta": 0.5}}, "sampler.eta is set"),
        ({"output": {"video_frames_png": True}}, "output.video_frames_png is set"),
    ],
)
def test_unused_fields_are_refused(kw, needle):
    req = orchestrator_pb2.GenerateRequest(model="m", prompt="a cat", seed=1, **kw)
    with pytest.raises(StageError, match=needle) as err:
        flux.plan(req, None)
    assert err.value.code.name == "INVALID_ARGUMENT"
    assert (
        flux.plan(orchestrator_pb2.GenerateRequest(model="m", prompt="a cat", seed=1), None).params.task
        == "t2i"
    )
