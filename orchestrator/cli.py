"""`diffmesh`: the command line. up / down / status run the local stack; serve runs one service; generate
(in cli_generate) runs one request; train (in cli_train) submits and follows training jobs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from orchestrator import cli_eval, cli_generate, cli_train

SERVE_STAGES = ("text-encoder", "denoiser", "vae", "audio", "orchestrator")


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or os.environ.get("DIFFMESH_STATE_DIR", ".diffmesh"))


def cmd_up(args: argparse.Namespace) -> int:
    from orchestrator.stack.local_stack import StackError, up

    try:
        state = up(_state_dir(args), timeout=args.timeout)
    except StackError as e:
        print(f"diffmesh up: {e}", file=sys.stderr)
        return 1
    for name, endpoint in state.endpoints.items():
        metrics = state.data["services"][name].get("metrics")
        print(
            f"{name:<13} {endpoint:<22} SERVING" + (f"  metrics http://{metrics}/metrics" if metrics else "")
        )
    print(f"{'s3':<13} {state.data['s3']['endpoint']:<22} (SeaweedFS)")
    print(f"ready in {state.data['ready_s']:.1f}s; state in {state.path}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from orchestrator.stack.local_stack import down

    stopped = down(_state_dir(args))
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from orchestrator.stack.local_stack import running

    try:
        state = cli_generate.read_stack(_state_dir(args))
    except cli_generate.CommandError as e:
        print(f"diffmesh status: {e}", file=sys.stderr)
        return e.exit_code
    if state is None:
        print("not running")
        return 1
    alive = running(state)
    for name, endpoint in state.endpoints.items():
        status = "DOWN"
        if name in alive:
            with grpc.insecure_channel(endpoint) as ch:
                try:
                    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                except grpc.RpcError as e:
                    status = e.code().name
        print(f"{name:<13} {endpoint:<22} {status}")
    return 0 if len(alive) == len(state.pids()) else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from orchestrator.local import TlsFiles, start_stage_server

    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            print("diffmesh serve: --tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        tls = TlsFiles(
            Path(args.tls_cert), Path(args.tls_key), Path(args.tls_client_ca) if args.tls_client_ca else None
        )
    stage = args.stage.replace("-", "_")
    server, port = start_stage_server(
        stage, args.host, args.port, tls, metrics_port=args.metrics_port, metrics_host=args.metrics_host
    )
    logging.getLogger("diffmesh").info("%s serving on %s:%d", stage, args.host, port)
    if server.metrics is not None:
        logging.getLogger("diffmesh").info("%s metrics on %s", stage, server.metrics.url)
        if args.metrics_port_file:  # before --port-file: whoever waits for that one finds both
            _write_atomic(Path(args.metrics_port_file), str(server.metrics.port))
    if args.port_file:
        _write_atomic(Path(args.port_file), str(port))
    print(json.dumps({"stage": stage, "port": port, "metrics_port": server.metrics_port}), flush=True)
    server.serve_until_signal(grace=args.grace)
    return 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _port_or_off(value: str) -> int | None:
    """A TCP port (0: any free one); empty or 'off': no endpoint."""
    if value.strip().lower() in ("", "off"):
        return None
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (or 'off')") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffmesh", description="diffusion models as gRPC stage services")
    p.add_argument("--state-dir", help="local stack state (default .diffmesh or $DIFFMESH_STATE_DIR)")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start S3 + every service on loopback, wait until SERVING")
    up.add_argument("--timeout", type=float, default=120.0)
    up.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop what `up` started").set_defaults(fn=cmd_down)
    sub.add_parser("status", help="health of the local stack").set_defaults(fn=cmd_status)

    serve = sub.add_parser("serve", help="run one service in the foreground (the container entrypoint)")
    serve.add_argument("stage", choices=SERVE_STAGES)
    serve.add_argument("--host", default=os.environ.get("DIFFMESH_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("DIFFMESH_PORT", "50051")))
    serve.add_argument("--port-file", help="write the bound port here once serving (for --port 0)")
    serve.add_argument(
        "--grace", type=float, default=30.0, help="seconds to drain in-flight calls on SIGTERM"
    )
    serve.add_argument(
        "--metrics-port",
        type=_port_or_off,
        default=os.environ.get("DIFFMESH_METRICS_PORT", "off"),
        help="serve Prometheus metrics over HTTP at /metrics on this port (0: any free one; default: off, "
        "or $DIFFMESH_METRICS_PORT)",
    )
    serve.add_argument(
        "--metrics-host",
        default=os.environ.get("DIFFMESH_METRICS_HOST"),
        help="address of the metrics endpoint (default: --host)",
    )
    serve.add_argument("--metrics-port-file", help="write the metrics endpoint's bound port here")
    serve.add_argument("--tls-cert", default=os.environ.get("DIFFMESH_TLS_CERT"))
    serve.add_argument("--tls-key", default=os.environ.get("DIFFMESH_TLS_KEY"))
    serve.add_argument("--tls-client-ca", default=os.environ.get("DIFFMESH_TLS_CLIENT_CA"))
    serve.set_defaults(fn=cmd_serve)

    cli_generate.add_parser(sub)
    cli_train.add_parser(sub)
    cli_eval.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("DIFFMESH_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s"
    )
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
