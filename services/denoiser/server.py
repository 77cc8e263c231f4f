"""Denoiser service: runs the whole sampling loop beside the weights and streams progress.

The loop runs in a worker thread; its per-step callback feeds a queue this handler drains into the
response stream. A client that cancels (or whose deadline passes) stops the loop at the next step boundary.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc

from protos import common_pb2, denoiser_pb2, denoiser_pb2_grpc
from services.common import metrics
from services.common.errors import Cancelled
from services.common.runtime import StageRuntime
from services.common.server import Binding, request_id
from services.common.settings import Settings
from services.common.store import TensorStore
from services.denoiser.inputs import decode_request
from services.denoiser.registry import DENOISERS

MODEL_FOLDERS = ("transformer", "unet")
SERVICE = denoiser_pb2.DESCRIPTOR.services_by_name["Denoiser"].full_name
_DONE = object()


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, runtime: StageRuntime) -> None:
        self.rt = runtime

    def Denoise(
        self, request: denoiser_pb2.DenoiseRequest, context: grpc.ServicerContext
    ) -> Iterator[denoiser_pb2.DenoiseEvent]:
        started = time.perf_counter()
        rid = request_id(context)
        inputs = decode_request(request, self.rt)
        model = self.rt.load(request.model, MODEL_FOLDERS, DENOISERS)
        events: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        outcome: dict[str, object] = {}
        step_seconds = metrics.DENOISE_STEP_SECONDS.labels(self.rt.stage, request.model)
        last_step = [started]

        def on_step(step: int, total: int) -> None:
            now = time.perf_counter()
            step_seconds.observe(now - last_step[0])
            last_step[0] = now
            elapsed = now - started
            eta = elapsed / step * (total - step) if step else 0.0
            progress = common_pb2.Progress(
                step=step, total=total, elapsed_s=elapsed, eta_s=eta, stage="denoise"
            )
            events.put(denoiser_pb2.DenoiseEvent(progress=progress))

        def work() -> None:
            last_step[0] = (
                time.perf_counter()
            )  # step 1 is timed from the start of the loop (its setup included)
            try:
                outcome["out"] = model.denoise(inputs, on_step, cancelled.is_set)
            except BaseException as e:  # handed to the handler thread, which raises it
                outcome["error"] = e
            finally:
                events.put(_DONE)

        worker = threading.Thread(target=work, name=f"denoise-{rid}", daemon=True)
        worker.start()
        try:
            while True:
                try:
                    event = events.get(timeout=0.1)
                except queue.Empty:
                    if not context.is_active():
                        cancelled.set()
                    continue
                if event is _DONE:
                    break
                yield event
        finally:
            if worker.is_alive():  # the stream ended early: stop the loop at its next step
                cancelled.set()
            worker.join()
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        if cancelled.is_set():
            raise Cancelled("denoise cancelled by the client")
        out: dict = outcome["out"]  # type: ignore[assignment]
        result = denoiser_pb2.DenoiseResult(
            latents=self.rt.output(rid, "latents", out["latents"]),
            seed=request.seed,
            steps_run=int(out.get("steps_run", inputs.steps)),
            timing=self.rt.timing(started),
        )
        if "audio_latents" in out:
            result.audio_latents.CopyFrom(self.rt.output(rid, "audio_latents", out["audio_latents"]))
        yield denoiser_pb2.DenoiseEvent(result=result)


def binding(settings: Settings, store: TensorStore) -> Binding:
    servicer = DenoiserServicer(StageRuntime("denoiser", settings, store))
    return Binding(
        SERVICE,
        denoiser_pb2_grpc.add_DenoiserServicer_to_server,
        servicer,
        queued_events={"Denoise": queued_event},
    )


def queued_event(position: int, queue_size: int) -> denoiser_pb2.DenoiseEvent:
    return denoiser_pb2.DenoiseEvent(queued=common_pb2.Queued(position=position, queue_size=queue_size))
