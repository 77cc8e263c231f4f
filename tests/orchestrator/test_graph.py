"""Stage graphs: the order is derived from declared inputs and outputs, and bad graphs are refused."""

from __future__ import annotations

import grpc
import pytest

from orchestrator.errors import StageError
from orchestrator.graph import Graph, GraphError, Stage


def stage(name: str, service: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Stage:
    return Stage(name, service, inputs, outputs, run=lambda client, values, ctx: {o: name for o in outputs})


T2I = Graph(
    "t2i",
    (
        stage("decode", "vae", ("latents",), ("image",)),
        stage("denoise", "denoiser", ("positive", "seed"), ("latents",)),
        stage("encode_prompt", "text_encoder", ("prompt",), ("positive",)),
    ),
    result=("image",),
)


def test_order_is_derived_from_inputs_and_outputs():
    order = T2I.validate({"prompt", "seed"})
    assert [s.name for s in order] == ["encode_prompt", "denoise", "decode"]


def test_missing_input_names_stage_and_value():
    with pytest.raises(GraphError, match="'denoise' reads 'seed'"):
        T2I.validate({"prompt"})
    with pytest.raises(StageError) as e:
        T2I.check_request({"prompt"})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_two_producers_cycle_duplicates_unknown_service():
    twice = Graph("x", (stage("a", "vae", (), ("v",)), stage("b", "vae", (), ("v",))), result=("v",))
    with pytest.raises(GraphError, match="produced by both"):
        twice.validate(set())
    with pytest.raises(GraphError, match="produced by both"):  # the request may not shadow a stage output
        Graph("x", (stage("a", "vae", (), ("v",)),), result=("v",)).validate({"v"})
    cycle = Graph("x", (stage("a", "vae", ("w",), ("v",)), stage("b", "vae", ("v",), ("w",))), result=("v",))
    with pytest.raises(GraphError, match="cycle"):
        cycle.validate(set())
    dup = Graph("x", (stage("a", "vae", (), ("v",)), stage("a", "vae", (), ("w",))), result=("v",))
    with pytest.raises(GraphError, match="duplicate stage names"):
        dup.validate(set())
    with pytest.raises(GraphError, match="unknown service"):
        stage("a", "upscaler", (), ("v",))
    with pytest.raises(GraphError, match="never produced"):
        Graph("x", (stage("a", "vae", (), ("v",)),), result=("image",)).validate(set())
