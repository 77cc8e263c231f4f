"""Audio service: waveform <-> features / audio latents, and the vocoder."""

from __future__ import annotations

import io
import time
import wave

import grpc
import torch

from protos import audio_pb2, audio_pb2_grpc
from services.audio.registry import AUDIO_MODELS
from services.common import validate
from services.common.errors import InvalidArgument
from services.common.runtime import StageRuntime
from services.common.server import Binding, request_id
from services.common.settings import Settings
from services.common.store import TensorStore

MODEL_FOLDERS = ("audio_encoder", "audio_vae", "vocoder")
MAX_SAMPLE_RATE = 192_000
SERVICE = audio_pb2.DESCRIPTOR.services_by_name["Audio"].full_name


def read_wav(data: bytes) -> tuple[torch.Tensor, int]:
    """16-bit PCM WAV -> ((C, T) float32 in [-1, 1], sample rate)."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            frames = w.readframes(n)
    except (wave.Error, EOFError, RuntimeError, ValueError) as e:  # wave's chunk reader raises all four
        raise InvalidArgument(f"input: not a readable WAV file ({type(e).__name__}: {e})") from None
    if width != 2:
        raise InvalidArgument(f"input: {8 * width}-bit WAV; only 16-bit PCM is read")
    validate.in_range("input: the WAV's sample rate", rate, 1000, MAX_SAMPLE_RATE)
    if not frames or len(frames) % (width * channels):
        raise InvalidArgument(
            f"input: the WAV holds {len(frames)} bytes of samples, not a positive multiple of "
            f"{width * channels} ({channels} channels of 16 bits)"
        )
    pcm = torch.frombuffer(bytearray(frames), dtype=torch.int16).reshape(-1, channels)  # (T, C)
    return pcm.t().float() / 32768.0, rate


def write_wav(waveform: torch.Tensor, sample_rate: int) -> bytes:
    """(C, T) float in [-1, 1] -> 16-bit PCM WAV bytes."""
    pcm = (waveform.float().clamp(-1, 1) * 32767).round().to(torch.int16).t().contiguous()  # (T, C)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(waveform.shape[0])
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.numpy().tobytes())
    return buf.getvalue()


class AudioServicer(audio_pb2_grpc.AudioServicer):
    def __init__(self, runtime: StageRuntime) -> None:
        self.rt = runtime

    def Encode(self, request: audio_pb2.AudioEncodeRequest, context: grpc.ServicerContext):
        started = time.perf_counter()
        rid = request_id(context)
        validate.required("model", request.model)
        kind = request.input.WhichOneof("source")
        if kind == "data":
            waveform, rate = read_wav(request.input.data)
        elif kind == "tensor":
            waveform = self.rt.input(request.input.tensor, "input.tensor")
            rate = int(validate.in_range("sample_rate", request.sample_rate, 1000, MAX_SAMPLE_RATE))
            if waveform.ndim != 2:
                raise InvalidArgument(f"input.tensor: expected (C, T), got {list(waveform.shape)}")
        else:
            raise InvalidArgument(f"input: give WAV bytes or a (C, T) tensor (got {kind or 'nothing'})")
        model = self.rt.load(request.model, MODEL_FOLDERS, AUDIO_MODELS)
        outputs = model.encode(waveform[None], rate, num_frames=request.num_frames, fps=request.fps)
        resp = audio_pb2.AudioEncodeResponse(
            duration_s=waveform.shape[-1] / rate, timing=self.rt.timing(started)
        )
        for key, tensor in outputs.items():
            resp.outputs[key].CopyFrom(self.rt.output(rid, f"{request.name or 'audio'}.{key}", tensor))
        return resp

    def Decode(self, request: audio_pb2.AudioDecodeRequest, context: grpc.ServicerContext):
        started = time.perf_counter()
        rid = request_id(context)
        validate.required("model", request.model)
        latents = self.rt.input(request.latents, "latents")
        model = self.rt.load(request.model, MODEL_FOLDERS, AUDIO_MODELS)
        waveform, rate = model.decode(latents)
        resp = audio_pb2.AudioDecodeResponse(
            waveform=self.rt.output(rid, "waveform", waveform), sample_rate=rate
        )
        if request.return_wav:
            resp.wav = write_wav(waveform[0], rate)
        resp.timing.CopyFrom(self.rt.timing(started))
        return resp


def binding(settings: Settings, store: TensorStore) -> Binding:
    servicer = AudioServicer(StageRuntime("audio", settings, store))
    return Binding(SERVICE, audio_pb2_grpc.add_AudioServicer_to_server, servicer)
