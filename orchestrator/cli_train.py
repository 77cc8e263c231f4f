"""`diffmesh train submit | status | logs | list | cancel`: training jobs, run here (the local launcher, the
default) or as Kubernetes Jobs (`--launcher kubernetes`), directly or through a running orchestrator
(`--endpoint`).

`submit` checks the spec before anything is launched (exit 2, naming the field) and prints the job id. Every
submitted job is recorded in `<state dir>/jobs/<id>/job.json` with its launcher, so `status` / `logs` /
`cancel` from any later process find it (`--launcher` overrides). Failures exit 1 as
`diffmesh train <command>: <CODE>: <message>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from orchestrator.cli_generate import CommandError, _env_token, _text, _token

PROG = "diffmesh train"
_UINT32 = (1 << 32) - 1


def _gpus(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{value} is out of range [0, 64]")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= _UINT32:
        raise argparse.ArgumentTypeError(f"{value} is out of range [0, {_UINT32}]")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `train` on the `diffmesh` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--launcher", choices=("local", "kubernetes"), help="default: $DIFFMESH_LAUNCHER, else local"
    )
    common.add_argument(
        "--namespace", metavar="NS", type=_text, help="kubernetes: default $DIFFMESH_NAMESPACE, ..."
    )
    common.add_argument(
        "--kubeconfig", metavar="PATH", help="default: in-cluster, $KUBECONFIG, ~/.kube/config"
    )
    common.add_argument(
        "--endpoint", metavar="HOST:PORT", type=_text, help="act through this orchestrator's gRPC API"
    )
    common.add_argument(
        "--token", metavar="T", type=_token, help="with --endpoint (default: $DIFFMESH_TOKEN[_FILE])"
    )
    common.add_argument("--json", action="store_true", help="print jobs as JSON (the Job message)")

    t = sub.add_parser("train", help="training jobs: submit, status, logs, list, cancel")
    tsub = t.add_subparsers(dest="train_command", required=True)

    s = tsub.add_parser("submit", parents=[common], help="check a spec and launch it; prints the job id")
    s.add_argument("--spec", metavar="SPEC.json", required=True, help="a TrainSpec as JSON")
    s.add_argument("--image", metavar="IMG", type=_text, help="kubernetes: default $DIFFMESH_TRAIN_IMAGE")
    s.add_argument("--gpus", metavar="N", type=_gpus, default=0, help="kubernetes: nvidia.com/gpu limit")
    s.add_argument("--service-account", metavar="SA", type=_text, help="kubernetes: the pod's ServiceAccount")
    s.add_argument("--dry-run", action="store_true", help="print what would be launched (kubernetes: YAML)")
    s.set_defaults(fn=cmd_submit)

    st = tsub.add_parser("status", parents=[common], help="one job's state, step and message")
    st.add_argument("job", type=_text)
    st.set_defaults(fn=cmd_status)

    lg = tsub.add_parser("logs", parents=[common], help="a job's log")
    lg.add_argument("job", type=_text)
    lg.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    lg.add_argument("--tail", metavar="N", type=_count, default=0, help="the last N lines (0 = all)")
    lg.set_defaults(fn=cmd_logs)

    ls = tsub.add_parser("list", parents=[common], help="jobs (every recorded job, or one launcher's)")
    ls.add_argument("--state", metavar="STATE", help="pending, running, succeeded, failed, cancelled")
    ls.set_defaults(fn=cmd_list)

    c = tsub.add_parser("cancel", parents=[common], help="stop a job (kubernetes: delete its Job)")
    c.add_argument("job", type=_text)
    c.set_defaults(fn=cmd_cancel)


# ---------------------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, env: Mapping[str, str]):
    from orchestrator.settings import JobSettings

    try:
        settings = JobSettings.from_env(env)
    except ValueError as e:
        raise CommandError(str(e)) from None
    if args.kubeconfig:
        _check_kubeconfig(args.kubeconfig)
    state_dir = Path(args.state_dir) if args.state_dir else settings.state_dir
    return dataclasses.replace(
        settings,
        state_dir=state_dir,
        launcher=args.launcher or settings.launcher,
        kubeconfig=args.kubeconfig or settings.kubeconfig,
        namespace=args.namespace or settings.namespace,
    )


def _check_kubeconfig(path: str) -> None:
    """--kubeconfig: a file of the shape the kubernetes client reads (the same check as the launcher's)."""
    from orchestrator.jobs.kubernetes import kubeconfig_problem

    problem = kubeconfig_problem(path)
    if problem:
        raise CommandError(f"--kubeconfig {path}: {problem}")


def open_jobs(args: argparse.Namespace, env: Mapping[str, str]):
    """A `Jobs` acting here, or a `RemoteJobs` on --endpoint."""
    if args.endpoint:
        from orchestrator.jobs.remote import RemoteJobs

        return RemoteJobs(args.endpoint, args.token or _env_token(env))
    if args.token:
        raise CommandError("--token goes with --endpoint")
    from orchestrator.jobs.service import Jobs

    return Jobs.from_settings(_settings(args, env))


def _override(args: argparse.Namespace) -> dict:
    """status / logs / cancel use the job's recorded launcher; --launcher overrides it (not remotely)."""
    return {"launcher": args.launcher} if args.launcher and not args.endpoint else {}


def _when(ts) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if ts.seconds else "-"


def _print_job(job, as_json: bool) -> None:
    from google.protobuf import json_format

    from orchestrator.jobs.base import state_name

    if as_json:
        print(json_format.MessageToJson(job, indent=2))
        return
    rows = [
        ("id", job.id),
        ("state", state_name(job.state)),
        ("step", f"{job.step}/{job.total_steps}"),
        ("message", job.message or "-"),
        ("launcher", job.launch.launcher or "local"),
    ]
    if job.launch.launcher == "kubernetes":
        rows += [("namespace", job.launch.namespace), ("image", job.launch.image), ("gpus", job.launch.gpus)]
    rows += [
        ("created", _when(job.created_at)),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
        ("output", job.output or "-"),
    ]
    for key, value in rows:
        print(f"{key:<10} {value}")


def _run(prog: str, fn) -> int:
    from orchestrator.errors import StageError

    try:
        return fn()
    except CommandError as e:
        print(f"{PROG} {prog}: {e}", file=sys.stderr)
        return e.exit_code
    except StageError as e:
        print(f"{PROG} {prog}: {e.code.name}: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(
            f"{PROG} {prog}: {e.filename}: {e.strerror}" if e.filename else f"{PROG} {prog}: {e}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {prog}: interrupted", file=sys.stderr)
        return 130


def cmd_submit(args: argparse.Namespace) -> int:
    return _run("submit", lambda: _submit(args, os.environ))


def _submit(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from orchestrator.jobs.local import WRAPPER
    from protos import orchestrator_pb2
    from trainer.spec import SpecError, parse_spec, to_json, validate_spec, with_defaults

    path = Path(args.spec)
    if not path.is_file():
        raise CommandError(f"--spec {args.spec}: no such file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise CommandError(f"--spec {args.spec}: not UTF-8 text (a TrainSpec is JSON)") from None
    try:
        spec = parse_spec(text, source=str(path))
    except SpecError as e:
        raise CommandError(str(e)) from None
    settings = _settings(args, env)
    launcher = args.launcher or ("" if args.endpoint else settings.launcher)  # remote: the server's default
    if launcher == "local":
        for flag in ("namespace", "image", "service_account"):
            if getattr(args, flag):
                raise CommandError(f"--{flag.replace('_', '-')} is for --launcher kubernetes")
    try:  # the dataset folder must exist where the trainer runs: here, for the local launcher
        validate_spec(spec, check_paths=launcher == "local" and not args.endpoint)
    except SpecError as e:
        raise CommandError(f"{path}: {e}") from None
    launch = orchestrator_pb2.LaunchOptions(
        launcher=launcher,
        namespace=args.namespace or "",
        image=args.image or "",
        gpus=args.gpus,
        service_account=args.service_account or "",
    )
    if args.dry_run:
        if launcher == "kubernetes":
            from orchestrator.jobs.kubernetes import default_namespace
            from orchestrator.jobs.manifest import build_job_manifest, build_spec_configmap, to_yaml

            launch.namespace = launch.namespace or default_namespace(settings)
            job = build_job_manifest(spec, launch, settings)
            cm = build_spec_configmap(spec, job["metadata"]["name"], launch.namespace)
            print(to_yaml(cm, job), end="")
        else:
            from orchestrator.jobs.local import default_command

            command = settings.train_command or default_command()
            print(f"# would run (wrapped in: sh -c {WRAPPER!r}):\n# {' '.join(command)} --spec SPEC.json")
            print(to_json(with_defaults(spec)))
        return 0

    def action(jobs) -> int:
        job = jobs.submit(spec, launch)
        if args.json:
            _print_job(job, True)
        else:
            print(job.id)
        return 0

    return _with_jobs(args, action)


def _with_jobs(args: argparse.Namespace, action) -> int:
    from google.protobuf.json_format import ParseError

    jobs = open_jobs(args, os.environ)
    try:
        return action(jobs)
    except (ParseError, UnicodeDecodeError) as e:  # a job.json under the state dir that is not a Job
        index = getattr(jobs, "index", None)
        bad = [i for i in index.ids() if not _readable(index, i)] if index is not None else []
        where = ", ".join(str(index.folder(i) / index.RECORD) for i in bad) or "a job record"
        raise CommandError(f"{where}: cannot be read: {e}", 1) from None
    finally:
        if hasattr(jobs, "close"):
            jobs.close()


def _readable(index, job_id: str) -> bool:
    from google.protobuf.json_format import ParseError

    try:
        index.load(job_id)
    except (ParseError, UnicodeDecodeError):
        return False
    return True


def cmd_status(args: argparse.Namespace) -> int:
    def action(jobs) -> int:
        _print_job(jobs.get(args.job, **_override(args)), args.json)
        return 0

    return _run("status", lambda: _with_jobs(args, action))


def cmd_logs(args: argparse.Namespace) -> int:
    def action(jobs) -> int:
        for line in jobs.logs(args.job, follow=args.follow, tail_lines=args.tail, **_override(args)):
            print(line, flush=args.follow)
        return 0

    return _run("logs", lambda: _with_jobs(args, action))


def cmd_list(args: argparse.Namespace) -> int:
    from orchestrator.jobs.base import parse_state, state_name

    def action(jobs) -> int:
        try:
            state = parse_state(args.state) if args.state else 0
        except ValueError as e:
            raise CommandError(f"--state: {e}") from None
        found = jobs.list(state, launcher=args.launcher or "") if not args.endpoint else jobs.list(state)
        if args.json:
            for job in found:
                _print_job(job, True)
            return 0
        print(f"{'ID':<40} {'STATE':<10} {'STEP':<12} {'LAUNCHER':<10} {'CREATED':<19}  MESSAGE")
        for j in found:
            step = f"{j.step}/{j.total_steps}"
            launcher = j.launch.launcher or "local"
            print(
                f"{j.id:<40} {state_name(j.state):<10} {step:<12} {launcher:<10} {_when(j.created_at):<19}  {j.message}"
            )
        return 0

    return _run("list", lambda: _with_jobs(args, action))


def cmd_cancel(args: argparse.Namespace) -> int:
    from orchestrator.jobs.base import state_name

    def action(jobs) -> int:
        job = jobs.cancel(args.job, **_override(args))
        print(f"{job.id} {state_name(job.state)}")
        return 0

    return _run("cancel", lambda: _with_jobs(args, action))
