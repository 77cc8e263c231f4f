"""A test-only stage for the graceful-stop test: a Denoiser whose Denoise takes `steps` x 0.2 s.

Run as a script: serves on port 0 through the real `create_server` + `serve_until_signal`, prints the port.
"""

from __future__ import annotations

import sys
import time

from protos import common_pb2, denoiser_pb2, denoiser_pb2_grpc
from services.common.server import Binding, create_server


class SlowDenoiser(denoiser_pb2_grpc.DenoiserServicer):
    def Denoise(self, request, context):
        for step in range(1, request.steps + 1):
            time.sleep(0.2)
            yield denoiser_pb2.DenoiseEvent(progress=common_pb2.Progress(step=step, total=request.steps))
        yield denoiser_pb2.DenoiseEvent(result=denoiser_pb2.DenoiseResult(steps_run=request.steps))


if __name__ == "__main__":
    binding = Binding(
        "diffmesh.v1.Denoiser", denoiser_pb2_grpc.add_DenoiserServicer_to_server, SlowDenoiser()
    )
    server, port = create_server([binding], token=sys.argv[1])
    print(port, flush=True)
    server.serve_until_signal(grace=float(sys.argv[2]))
