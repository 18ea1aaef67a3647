"""``dicomnode``: run the node (serve, worker), follow its jobs, studies and models, explain the
routing, send DICOM, run the demo, upgrade the database."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode import __version__
from dicomnode.errors import DicomNodeError

if TYPE_CHECKING:
    from dicomnode.admin import ModelSummary
    from dicomnode.config import Settings
    from dicomnode.envelope import Envelope
    from dicomnode.pipeline.models import BuiltinModels
    from dicomnode.pipeline.trial import TrialRun
    from dicomnode.queue import JobRepository

logger = logging.getLogger("dicomnode.cli")


def main(
    argv: Sequence[str] | None = None,
    *,
    builtin_models: BuiltinModels | None = None,
    command: Sequence[str] | None = None,
) -> int:
    """Run one command; ``builtin_models`` run beside the model packages (the tests' ``echo``,
    through ``python -m dicomnode.testing.cli``). ``command`` runs this same CLI (its
    builtins included) in the child processes of ``serve``: its workers and extra receivers
    (default: ``python -m dicomnode.cli``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.builtin_models = dict(builtin_models or {})
    args.child_command = tuple(command or (sys.executable, "-m", "dicomnode.cli"))
    from dicomnode import log

    log.configure(args.log_level)
    try:
        return int(args.func(args) or 0)
    except DicomNodeError as exc:
        print(f"dicomnode: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomnode", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the node (receiver) until stopped")
    _config_option(serve)
    serve.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="receiver processes on the DICOM port (default: [node] processes, 1)",
    )
    # an extra receiver process of another serve: settings on stdin (dicomnode.receive.processes)
    serve.add_argument("--receiver-child", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    studies = commands.add_parser("studies", help="studies in the index")
    studies_commands = studies.add_subparsers(dest="studies_command", required=True)
    studies_list = studies_commands.add_parser("list", help="list studies, newest first")
    _config_option(studies_list)
    studies_list.add_argument("--limit", type=int, default=100)
    studies_list.add_argument("--offset", type=int, default=0)
    studies_list.add_argument("--json", action="store_true", help="print JSON")
    studies_list.set_defaults(func=_studies_list)

    worker = commands.add_parser("worker", help="run queued jobs on one device until stopped")
    _config_option(worker)
    worker.add_argument("--device", help="cpu, cuda:0, ... (default: the first [[workers]]')")
    worker.add_argument("--models", help="comma-separated model names (default: every model)")
    worker.add_argument("--worker-id", help="name in the jobs table (default: host:pid:device)")
    # a worker of a serve, [[workers]] isolation = "process": its assignment on stdin
    # (dicomnode.queue.processes)
    worker.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    worker.set_defaults(func=_worker)

    jobs = commands.add_parser("jobs", help="the job queue")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    jobs_list = jobs_commands.add_parser("list", help="list jobs, newest first")
    _config_option(jobs_list)
    jobs_list.add_argument("--state", help="only these states, comma-separated")
    jobs_list.add_argument("--model")
    jobs_list.add_argument("--study", metavar="STUDY_UID")
    jobs_list.add_argument("--accession", metavar="ACCESSION_NUMBER")
    jobs_list.add_argument("--patient-id", metavar="PATIENT_ID")
    jobs_list.add_argument(
        "--since", metavar="WHEN", help="received since: 2h, 30m, 3d, 1w, or ISO 8601 (UTC)"
    )
    jobs_list.add_argument("--limit", type=int, default=50)
    jobs_list.add_argument("--offset", type=int, default=0)
    jobs_list.add_argument("--json", action="store_true", help="print JSON")
    jobs_list.set_defaults(func=_jobs_list)
    for action, help_text in (
        ("show", "one job in full"),
        ("retry", "queue a failed or cancelled job again"),
        ("cancel", "cancel an unfinished job"),
        ("approve", "send the results a review route holds (as its release would have)"),
        ("reject", "refuse the results a review route holds: nothing is sent"),
    ):
        command = jobs_commands.add_parser(action, help=help_text)
        _config_option(command)
        command.add_argument("job_id", type=int)
        command.add_argument("--json", action="store_true", help="print JSON")
        command.set_defaults(func=_jobs_action, jobs_action=action)
        if action == "approve":
            command.add_argument("--note", help="audited with the approval")
        elif action == "reject":
            command.add_argument("--reason", required=True, help="why (audited, kept on the job)")

    models = commands.add_parser("models", help="the models this node can run")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_list = models_commands.add_parser(
        "list", help="name, version, demo weights, level, what it accepts, where it runs"
    )
    _config_option(models_list)
    models_list.add_argument("--json", action="store_true", help="print JSON")
    models_list.set_defaults(func=_models_list)
    models_run = models_commands.add_parser(
        "run",
        help="run one model once on DICOM files (no queue, no database); write what it would "
        "send (SEG/SR/SC/KO) into --out",
    )
    _config_option(models_run)
    models_run.add_argument("name", help="the model (models list names them)")
    models_run.add_argument("files", nargs="+", type=Path, help="the DICOM files of one study")
    models_run.add_argument("--out", type=Path, required=True, help="folder for the objects")
    models_run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    models_run.add_argument("--json", action="store_true", help="print the job's result as JSON")
    models_run.set_defaults(func=_models_run)
    models_check = models_commands.add_parser(
        "check",
        help="run one model on the files (none: a phantom of a modality it accepts) and check "
        "every object it would send; exit 1 when one is wrong",
    )
    _config_option(models_check)
    models_check.add_argument("name", help="the model (models list names them)")
    models_check.add_argument("files", nargs="*", type=Path, help="DICOM files of one study")
    models_check.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    models_check.add_argument("--out", type=Path, help="keep the objects in this folder")
    models_check.set_defaults(func=_models_check)
    models_compare = models_commands.add_parser(
        "compare",
        help="how a shadow route's model agrees with a live route's on the same inputs: "
        "findings matched, only one side's, mean Dice, kappa of grades",
    )
    _config_option(models_compare)
    models_compare.add_argument("live", help="the live route's name")
    models_compare.add_argument("shadow", help='the shadow route\'s name (mode = "shadow")')
    models_compare.add_argument("--since", help="jobs finished since: 2h, 3d, 1w or ISO 8601")
    models_compare.add_argument("--json", action="store_true", help="print JSON")
    models_compare.set_defaults(func=_models_compare)

    route = commands.add_parser("route", help="routing rules")
    route_commands = route.add_subparsers(dest="route_command", required=True)
    route_explain = route_commands.add_parser(
        "explain", help="which route DICOM files take, and why each other route does not"
    )
    route_explain.add_argument("files", nargs="+", type=Path, help="files or folders")
    _config_option(route_explain)
    route_explain.add_argument("--calling-aet", help="match calling_aet as if this AE sent them")
    route_explain.add_argument("--json", action="store_true", help="print JSON")
    route_explain.set_defaults(func=_route_explain)

    send = commands.add_parser(
        "send",
        help="send DICOM files with C-STORE, or a job's results again",
        description="FILES... --to AET@HOST:PORT sends files now; --job ID queues a job's "
        "result objects again for its destinations (or --destination NAME), dead sends too",
    )
    send.add_argument("files", nargs="*", type=Path, help="files or folders")
    send.add_argument("--to", metavar="AET@HOST:PORT")
    send.add_argument("--job", type=int, metavar="ID", help="queue this job's results again")
    send.add_argument(
        "--destination", action="append", metavar="NAME", help="with --job: only to this one"
    )
    _config_option(send)
    send.add_argument("--calling-aet", default="DICOMNODE")
    send.add_argument("--tls-ca", help="CA file that signed the peer's certificate (enables TLS)")
    send.add_argument("--tls-cert", help="our certificate, for peers that verify senders")
    send.add_argument("--tls-key", help="our private key")
    send.add_argument("--timeout", type=float, default=60.0)
    send.add_argument("--json", action="store_true", help="print one JSON result per file")
    send.set_defaults(func=_send)

    demo = commands.add_parser(
        "demo", help="send phantom studies to a running node and show what it found"
    )
    _config_option(demo)
    demo.add_argument("--to", help="the node as AET@HOST:PORT (default: from the config)")
    demo.add_argument("--api", help="the node's API URL (default: from the config)")
    demo.add_argument("--token", help="the API's bearer token (default: from the config)")
    demo.add_argument(
        "--studies", default="chest,brain,retina", help="which: chest, brain, retina (default all)"
    )
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for results")
    demo.add_argument("--keep", type=Path, help="write the studies here and keep them")
    demo.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    demo.set_defaults(func=_demo)

    analyze = commands.add_parser(
        "analyze",
        help="retrieve a study from a source and analyse it (the running node does both)",
    )
    _config_option(analyze)
    which = analyze.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="STUDY_UID", help="the Study Instance UID")
    which.add_argument("--accession", metavar="ACCESSION_NUMBER", help="or its accession number")
    analyze.add_argument(
        "--from", dest="source", metavar="SOURCE", help="a [[sources]] name (default: the only one)"
    )
    how = analyze.add_mutually_exclusive_group()
    how.add_argument("--route", help="analyse as this route does (its match picks the series)")
    how.add_argument("--model", help="run this model on the series it accepts")
    analyze.add_argument("--priority", choices=["routine", "urgent", "stat"])
    analyze.add_argument(
        "--transaction-id", help="your id for this ask: asked again, the same request answers"
    )
    analyze.add_argument("--wait", action="store_true", help="wait until its jobs have ended")
    analyze.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits")
    analyze.add_argument("--json", action="store_true", help="print the request as JSON")
    analyze.set_defaults(func=_analyze)

    backfill = commands.add_parser(
        "backfill",
        help="ask for every past study a query finds on a source, paced (the node analyses them)",
    )
    _config_option(backfill)
    backfill.add_argument(
        "--from", dest="source", metavar="SOURCE", help="a [[sources]] name (default: the only one)"
    )
    backfill.add_argument(
        "--query",
        required=True,
        help="DICOM keywords, as a URL query: 'Modality=CT&StudyDate=20261101-20261130'",
    )
    target = backfill.add_mutually_exclusive_group()
    target.add_argument("--route", help="analyse as this route does")
    target.add_argument("--model", help="run this model on the series it accepts")
    backfill.add_argument("--rate", help="at most N new requests a minute: N/min (or N/h)")
    backfill.add_argument(
        "--window", help="make requests only inside this daily window, HH:MM-HH:MM local time"
    )
    backfill.add_argument(
        "--dry-run", action="store_true", help="list the studies it would ask for, ask nothing"
    )
    backfill.add_argument("--json", action="store_true", help="print the outcome as JSON")
    backfill.set_defaults(func=_backfill)

    requests = commands.add_parser("requests", help="studies asked of the sources")
    requests_commands = requests.add_subparsers(dest="requests_command", required=True)
    requests_show = requests_commands.add_parser(
        "show", help="one request: its progress, what is missing, its jobs"
    )
    _config_option(requests_show)
    requests_show.add_argument("request_id", type=int)
    requests_show.add_argument("--json", action="store_true", help="print JSON")
    requests_show.set_defaults(func=_requests_show)

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_upgrade = db_commands.add_parser("upgrade", help="migrate the schema to this version")
    _config_option(db_upgrade)
    db_upgrade.set_defaults(func=_db_upgrade)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML file (default: $DICOMNODE_CONFIG, else the embedded defaults)",
    )


def _serve(args: argparse.Namespace) -> int:
    from dicomnode.api.context import warn_readable_config
    from dicomnode.app import build_node, restrict_new_files
    from dicomnode.config import CONFIG_ENV, load_settings
    from dicomnode.errors import ConfigError

    if args.receiver_child:
        return _serve_receiver_child()
    settings = load_settings(args.config)
    warn_readable_config(args.config or os.environ.get(CONFIG_ENV) or None)
    if args.processes is not None:
        if not 1 <= args.processes <= 64:
            raise ConfigError(f"--processes {args.processes} must be 1 to 64")
        node_settings = settings.node.model_copy(update={"processes": args.processes})
        settings = settings.model_copy(update={"node": node_settings})
    restrict_new_files()
    # the children run args.child_command, which has the same builtin models
    node = build_node(
        settings,
        builtin_models=args.builtin_models,
        worker_processes=True,
        command=args.child_command,
    )
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    node.start()
    host, port = node.receiver.address
    print(
        f"dicomnode {__version__}: {settings.node.ae_title} listening on {host}:{port}, "
        f"storage {node.spool.root}"
        + (f", HTTP API on {node.api.url}" if node.api is not None else ""),
        flush=True,
    )
    stopping.wait()
    logger.info("Stopping", extra={"action": "shutdown"})
    node.stop()
    return 0


def _serve_receiver_child() -> int:
    """One extra receiver process of ``serve --processes``; it stops when the serve does."""
    from dicomnode.app import build_receiver_node, restrict_new_files
    from dicomnode.receive.processes import run_child

    def start(settings: Settings, released: Callable[[], None]) -> Callable[[], None]:
        restrict_new_files()
        node = build_receiver_node(settings)
        node.receiver.on_association_closed = released
        node.start()
        return node.stop

    def interrupted(*_: object) -> None:
        raise SystemExit(0)  # out of the wait on stdin; run_child then stops the receiver

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupted)
    return run_child(start)


def _studies_list(args: argparse.Namespace) -> int:
    from dicomnode.app import open_database
    from dicomnode.config import load_settings
    from dicomnode.db.index import list_studies

    database = open_database(load_settings(args.config), migrate=False)
    with database.sessions() as session:
        studies = list_studies(session, limit=args.limit, offset=args.offset)
    if args.json:
        print(json.dumps([asdict(s) for s in studies], default=_json_default, indent=2))
        return 0
    header = (
        "STUDY UID",
        "PATIENT ID",
        "DATE",
        "ACCESSION",
        "MODALITIES",
        "SERIES",
        "INSTANCES",
        "LAST RECEIVED",
    )
    rows = [
        (
            s.study_instance_uid,
            s.patient_id,
            s.study_date,
            s.accession_number,
            ",".join(s.modalities),
            str(s.series_count),
            str(s.instance_count),
            s.last_received_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
        for s in studies
    ]
    _print_table(header, rows)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from dicomnode.app import job_repository, open_database, restrict_new_files
    from dicomnode.config import WorkerSettings, load_settings
    from dicomnode.inference.device import resolve_device
    from dicomnode.pipeline import load_job_models
    from dicomnode.queue.periodic import Periodic, schedule_queue_maintenance
    from dicomnode.queue.processes import limit_memory
    from dicomnode.queue.worker import Worker

    if args.serve_child:
        return _worker_child(args)
    settings = load_settings(args.config)
    restrict_new_files()
    defaults = settings.workers[0] if settings.workers else WorkerSettings()
    names = args.models.split(",") if args.models else defaults.models
    device = str(resolve_device(args.device or defaults.device))  # a missing GPU fails here
    limit_memory(defaults.model_copy(update={"device": device}), args.worker_id or "")
    database = open_database(settings, migrate=False)
    models = load_job_models(
        settings, names, sessions=database.sessions, builtins=args.builtin_models
    )
    repository = job_repository(settings, database.sessions)
    worker = Worker(
        repository,
        models,
        device=device,
        worker_id=args.worker_id,
        storage_dir=settings.node.storage_dir,
    )
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    worker.load_models()
    periodic = Periodic()
    schedule_queue_maintenance(periodic, repository, purge=False)
    periodic.start()
    print(
        f"dicomnode {__version__}: worker {worker.worker_id} running "
        f"{','.join(sorted(models))} on {worker.device}",
        flush=True,
    )
    try:
        worker.run(stopping)
    finally:
        periodic.shutdown()
        database.engine.dispose()
    return 0


def _worker_child(args: argparse.Namespace) -> int:
    """One worker of a serve (``[[workers]] isolation = "process"``): it finishes the job in
    hand when the serve stops, and goes at once when the serve is gone."""
    import os

    from dicomnode.app import build_worker, job_repository, open_database, restrict_new_files
    from dicomnode.children import READY, Parent
    from dicomnode.queue.processes import (
        JOB_ENDED,
        WorkerAssignment,
        limit_memory,
        offer_to_oom_killer,
    )

    parent = Parent()
    assignment = WorkerAssignment.from_json(parent.assignment())
    settings, entry = assignment.settings, assignment.entry
    offer_to_oom_killer()  # out of memory, the kernel kills this process, not the serve
    limit_memory(entry, assignment.worker_id)  # before the models: their weights count too
    restrict_new_files()
    database = open_database(settings, migrate=False)
    worker = build_worker(
        settings,
        entry,
        job_repository(settings, database.sessions),
        builtin_models=args.builtin_models,
        worker_id=assignment.worker_id,
    )
    worker.on_job_end = lambda: parent.say(JOB_ENDED)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())

    def gone() -> None:
        logger.warning(
            "worker %s: its serve has gone; stopping now (a job in hand runs again once its "
            "lease expires)",
            worker.worker_id,
            extra={"action": "worker_orphaned", "worker_id": worker.worker_id},
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)

    parent.watch(stopping, on_gone=gone)
    worker.load_models()
    parent.say(READY)
    try:
        worker.run(stopping)
    finally:
        database.engine.dispose()
    return 0


def _jobs_repository(args: argparse.Namespace) -> JobRepository:
    from dicomnode.app import job_repository, open_database
    from dicomnode.config import load_settings

    settings = load_settings(args.config)
    return job_repository(settings, open_database(settings, migrate=False).sessions)


def _jobs_list(args: argparse.Namespace) -> int:
    from dicomnode import admin

    jobs, _total = admin.list_jobs(
        _jobs_repository(args),
        state=args.state,
        model=args.model,
        study=args.study,
        accession=args.accession,
        patient_id=args.patient_id,
        since=args.since,
        limit=args.limit,
        offset=args.offset,
        with_total=False,
    )
    if args.json:
        print(json.dumps([job.as_json() for job in jobs], indent=2))
        return 0
    header = ("ID", "STATE", "PRIORITY", "MODEL", "ROUTE", "ATTEMPTS", "UPDATED", "ERROR")
    rows = [
        (
            str(job.id),
            str(job.state),
            job.as_json()["priority_name"],
            job.model,
            job.route if job.mode == "live" else f"{job.route} (shadow)",
            f"{job.attempts}/{job.max_attempts}",
            job.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
            (job.error or "").splitlines()[0][:60] if job.error else "",
        )
        for job in jobs
    ]
    _print_table(header, rows)
    return 0


def _jobs_action(args: argparse.Namespace) -> int:
    from dicomnode import admin, audit
    from dicomnode.errors import InvalidQuery, JobNotFound

    repository = _jobs_repository(args)
    if args.jobs_action == "show":
        job = repository.get(args.job_id)
        if job is None:
            raise JobNotFound(f"no job {args.job_id}")
        return _jobs_show(admin.job_detail(repository.sessions, job), as_json=args.json)
    if args.jobs_action == "retry":
        job = repository.retry(args.job_id, actor=audit.cli_actor())
    elif args.jobs_action == "approve":
        job = repository.approve(args.job_id, actor=audit.cli_actor(), note=args.note)
    elif args.jobs_action == "reject":
        try:
            job = repository.reject(args.job_id, actor=audit.cli_actor(), reason=args.reason)
        except ValueError as exc:
            raise InvalidQuery(f"--reason {args.reason!r}: {exc}") from None
    else:
        job = repository.cancel(args.job_id, actor=audit.cli_actor())
    if args.json:
        print(json.dumps(job.as_json(), indent=2))
    else:
        print(f"job {job.id} {job.state}")
    return 0


def _jobs_show(values: dict[str, Any], *, as_json: bool) -> int:
    """One job: its values, then each stage with its time, what was sent where, its audit."""
    if as_json:
        print(json.dumps(values, indent=2))
        return 0
    stages, sends, events = values["stages"], values["sends"], values["audit"]
    told = values.get("notifications") or []
    skip = {"stages", "sends", "notifications", "audit", "result",
            *(f"{name}_at" for name in stages)}  # fmt: skip
    for key, value in values.items():
        if key not in skip:
            print(f"{key + ':':<20} {'' if value is None else value}")
    envelope = (values.get("result") or {}).get("envelope")
    if isinstance(envelope, dict):
        print(f"{'envelope:':<20} {_verdict_line(envelope)}")
    print("stages:")
    for name, at in stages.items():
        print(f"  {name:<10} {at or '-'}")
    print("sends:" if sends else "sends:              none")
    if sends:
        header = ("DESTINATION", "KIND", "STATE", "ATTEMPTS", "LAST ERROR")
        rows = [
            (s["destination"], s["kind"], s["state"], str(s["attempts"]),
             (s["last_error"] or "").splitlines()[0][:60] if s["last_error"] else "")
            for s in sends
        ]  # fmt: skip
        _print_table(header, rows, indent="  ")
    print("notifications:" if told else "notifications:      none")
    if told:
        _print_table(
            ("NOTIFICATION", "KIND", "EVENT", "STATE", "ATTEMPTS", "LAST ERROR"),
            [(n["notification"], n["kind"], n["event"], n["state"], str(n["attempts"]),
              (n["last_error"] or "").splitlines()[0][:60] if n["last_error"] else "")
             for n in told],
            indent="  ",
        )  # fmt: skip
    print("audit:" if events else "audit:              none")
    for event in events:
        detail = f" ({event['detail']})" if event["detail"] else ""
        print(f"  {event['at']}  {event['action']:<10} {event['actor']}{detail}")
    return 0


def _verdict_line(envelope: dict[str, Any]) -> str:
    """A job's envelope verdict in one line: inside, or outside, what the route did and why."""
    if envelope.get("inside", True):
        return "inside"
    done = {"refuse": "refused", "flag": "run and flagged"}.get(str(envelope.get("policy")), "")
    return f"OUTSIDE ({done}): {'; '.join(envelope.get('reasons') or ())}"


def _models_list(args: argparse.Namespace) -> int:
    from dicomnode.admin import model_summaries
    from dicomnode.config import load_settings

    models = model_summaries(load_settings(args.config), builtins=args.builtin_models)
    if args.json:
        print(json.dumps([asdict(m) for m in models], indent=2))
        return 0
    header = ("NAME", "KIND", "VERSION", "DIGEST", "WEIGHTS", "LEVEL", "ACCEPTS", "DEVICES")
    rows = [
        (
            m.name,
            m.kind,
            m.version,
            (m.digest or "-")[:12],
            "demo" if m.demo else m.source,
            m.level,
            _accepts(m),
            ",".join(m.devices) or "(no worker)",
        )
        for m in models
    ]
    _print_table(header, rows)
    return 0


def _trial(args: argparse.Namespace, out: Path) -> TrialRun | None:
    """Run the model once; None (the reason printed) when the model itself failed."""
    from dicomnode.config import load_settings
    from dicomnode.pipeline.trial import run_model

    settings = load_settings(args.config)
    try:
        return run_model(
            settings, args.name, args.files, out, device=args.device, builtins=args.builtin_models
        )
    except DicomNodeError:
        raise
    except Exception as exc:  # the model's own code: its error is the reason
        print(f"dicomnode: error: model {args.name!r} failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)  # fmt: skip
        return None


def _print_trial(run: TrialRun) -> None:
    findings = run.result.get("findings")
    count = f"{len(findings)} finding(s)" if isinstance(findings, list) else "findings not listed"
    print(f"model {run.model}: {len(run.inputs)} series in, {count}, "
          f"{len(run.objects)} object(s) out")  # fmt: skip
    for finding in findings or ():
        if isinstance(finding, dict):
            words = [str(finding.get("label", "?"))]
            for key in ("probability", "diameter_mm", "volume_mm3"):
                value = finding.get(key)
                if isinstance(value, int | float):
                    words.append(f"{key} {value:.3g}")
            print("  finding: " + ", ".join(words))
    for entry in run.objects:
        print(f"  {entry.get('kind', '?'):<4} {entry['path']}")


def _models_run(args: argparse.Namespace) -> int:
    run = _trial(args, args.out)
    if run is None:
        return 1
    if args.json:
        print(json.dumps({**run.result, "objects": list(run.objects)}, indent=2, default=str))
    else:
        _print_trial(run)
    return 0


def _models_compare(args: argparse.Namespace) -> int:
    from dicomnode import admin
    from dicomnode.app import open_database
    from dicomnode.config import load_settings

    settings = load_settings(args.config)
    sessions = open_database(settings, migrate=False).sessions
    numbers = admin.compare_routes(
        sessions, settings.node.storage_dir, args.live, args.shadow, args.since
    )
    if args.json:
        print(json.dumps(numbers, indent=2))
        return 0

    def show(value: float | None, percent: bool = False) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f}%" if percent else f"{value:.3f}"

    print(f"live {args.live!r} ({numbers['live_jobs']} jobs) vs shadow {args.shadow!r} "
          f"({numbers['shadow_jobs']} jobs): {numbers['inputs']} inputs both ran on")  # fmt: skip
    rows = [
        ("findings matched", str(numbers["matched"])),
        ("only live", str(numbers["only_live"])),
        ("only shadow", str(numbers["only_shadow"])),
        (f"mean Dice ({numbers['dice_pairs']} masks)", show(numbers["mean_dice"])),
        (f"grade agreement ({numbers['graded']} grades)", show(numbers["grade_agreement"], True)),
        ("Cohen's kappa", show(numbers["kappa"])),
        ("kappa, quadratic weights", show(numbers["weighted_kappa"])),
    ]
    _print_table(("MEASURE", "VALUE"), rows)
    return 0


def _models_check(args: argparse.Namespace) -> int:
    import tempfile

    from dicomnode.config import load_settings
    from dicomnode.pipeline.trial import (
        accepted_modalities,
        check_objects,
        dciodvfy_tool,
        uncoded_labels,
        write_phantom,
    )

    settings = load_settings(args.config)
    for label in uncoded_labels(settings, args.name):
        print(f"warning: label {label!r} has no code: neither [models.bundle_settings."
              f"{args.name}] labels nor SNOMED CT names it; coded in the node's local scheme, "
              "which no viewer knows")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dicomnode-check-") as scratch:
        if not args.files:
            modalities = accepted_modalities(settings, args.name)
            args.files = write_phantom(modalities, Path(scratch) / "phantom")
            print(f"input: a phantom of {len({f.parent for f in args.files})} series "
                  f"({args.files[0].parent.name})")  # fmt: skip
        run = _trial(args, args.out or Path(scratch) / "objects")
        if run is None:
            print(f"FAIL {args.name}: the run failed")
            return 1
        _print_trial(run)
        tool = dciodvfy_tool()
        print(f"checks: SOP class, study, UIDs; {'dciodvfy' if tool else 'no dciodvfy installed'}")
        checks = check_objects(run, dciodvfy=tool)
    bad = [c for c in checks if c.problems]
    for check in checks:
        print(f"  {'ok  ' if not check.problems else 'FAIL'} {check.kind:<4} {check.path.name}")
        for problem in check.problems:
            print(f"       {problem}")
    if not checks:
        print(f"FAIL {args.name}: it wrote no object to send")
        return 1
    print(f"{'FAIL' if bad else 'ok'} {args.name}: {len(checks) - len(bad)} of {len(checks)} "
          "object(s) valid")  # fmt: skip
    return 1 if bad else 0


def _accepts(model: ModelSummary) -> str:
    parts = [",".join(model.modalities) or "any modality"]
    if model.min_slices > 1:
        parts.append(f">= {model.min_slices} slices")
    if model.inputs:
        parts.append("series " + "+".join(model.inputs))
    return ", ".join(parts)


def _route_explain(args: argparse.Namespace) -> int:
    from dicomnode.config import load_settings
    from dicomnode.route_report import explain_files, report_lines
    from dicomnode.routing import Router

    settings = load_settings(args.config)
    router = Router.from_settings(settings)
    report = explain_files(
        router, args.files, calling_aet=args.calling_aet, envelopes=_envelopes(settings)
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    out, err = report_lines(report, router)
    for line in out:
        print(line)
    for line in err:
        print(line, file=sys.stderr)
    return 0


def _envelopes(settings: Settings) -> dict[str, tuple[Envelope, str]]:
    """Route name -> its model's acquisition envelope and the route's policy, for the routes
    whose model is a package, a bundle or a command this node has (a model that cannot be
    read is left out)."""
    from dicomnode.inference.registry import ModelRegistry

    registry = ModelRegistry.from_settings(settings)
    found: dict[str, tuple[Envelope, str]] = {}
    for route in settings.routes:
        command = settings.models.commands.get(route.model)
        if command is not None:
            if command.envelope is not None:
                found[route.name] = (command.envelope, str(route.envelope))
        elif route.model in registry:
            try:
                envelope = registry.spec(route.model).info.envelope
            except DicomNodeError:
                continue
            found[route.name] = (envelope, str(route.envelope))
    return found


def _send(args: argparse.Namespace) -> int:
    from dicomnode.receive.tls import client_context
    from dicomnode.send.scu import Destination, send_files

    if args.job is not None:
        if args.files or args.to:
            raise DicomNodeError("send: give either --job ID or FILES... --to AET@HOST:PORT")
        return _send_job(args)
    if not args.files or not args.to:
        raise DicomNodeError("send: FILES... and --to AET@HOST:PORT are required (or --job ID)")
    destination = Destination.parse(args.to)
    context = None
    if args.tls_ca or args.tls_cert:
        context = client_context(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    results = send_files(
        args.files,
        destination,
        calling_aet=args.calling_aet,
        ssl_context=context,
        timeout=args.timeout,
    )
    for result in results:
        status = f"0x{result.status:04X}" if result.status is not None else None
        if args.json:
            print(
                json.dumps(
                    {
                        "path": str(result.path),
                        "status": status,
                        "ok": result.ok,
                        "error": result.error,
                    }
                )
            )
        else:
            print(
                f"{'ok  ' if result.ok else 'FAIL'} {status or '------'} {result.path}"
                f"{'  ' + result.error if result.error else ''}"
            )
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} sent, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def _send_job(args: argparse.Namespace) -> int:
    from dicomnode import audit
    from dicomnode.app import open_database
    from dicomnode.config import load_settings
    from dicomnode.queue.sends import SendQueue

    settings = load_settings(args.config)
    for name in args.destination or ():
        settings.destination(name)  # an unknown name fails here, naming the known ones
    database = open_database(settings, migrate=False)
    targets = SendQueue(database.sessions).requeue(args.job, args.destination)
    audit.record_event(
        database.sessions,
        audit.cli_actor(),
        "resend",
        job_id=args.job,
        detail=f"to {', '.join(targets)}",
    )
    print(f"job {args.job}: results queued again for {', '.join(targets)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import tempfile
    from dataclasses import asdict

    from dicomnode.config import load_settings
    from dicomnode.demo import Api, describe, run_demo
    from dicomnode.send.scu import Destination

    settings = load_settings(args.config)
    local = "127.0.0.1" if settings.node.host in ("0.0.0.0", "::", "") else settings.node.host
    destination = Destination.parse(
        args.to or f"{settings.node.ae_title}@{local}:{settings.node.port}"
    )
    api_host = "127.0.0.1" if settings.api.host in ("0.0.0.0", "::", "") else settings.api.host
    token = args.token or settings.api.client_token("phi")  # the demo follows its studies
    api = Api(args.api or f"{settings.api.scheme}://{api_host}:{settings.api.port}", token)
    names = [name.strip() for name in args.studies.split(",") if name.strip()]
    say = (lambda _text: None) if args.json else print
    with tempfile.TemporaryDirectory(prefix="dicomnode-demo-") as scratch:
        folder = args.keep or Path(scratch)
        outcomes = run_demo(destination, api, folder, names=names, timeout_s=args.timeout, say=say)
    if args.json:
        print(json.dumps([asdict(o) for o in outcomes], indent=2, default=_json_default))
    else:
        for outcome in outcomes:
            print()
            print("\n".join(describe(outcome)))
    ended = all(job["state"] == "done" for o in outcomes for job in o.jobs)
    return 0 if ended and all(o.jobs for o in outcomes) else 1


def _analyze(args: argparse.Namespace) -> int:
    import time

    from dicomnode import audit
    from dicomnode.app import open_database
    from dicomnode.config import load_settings
    from dicomnode.domain import RequestState
    from dicomnode.fetch.requests import (
        RequestRepository,
        RequestSpec,
        default_source,
        known_models,
        parse_priority,
    )
    from dicomnode.queue import JobRepository

    settings = load_settings(args.config)
    spec = RequestSpec(
        source=args.source or default_source(settings),
        study_instance_uid=args.study,
        accession_number=args.accession,
        route=args.route,
        model=args.model,
        priority=parse_priority(args.priority) if args.priority else None,
        transaction_id=args.transaction_id,
    ).checked(settings, known_models(settings, list(args.builtin_models)) if args.model else None)
    database = open_database(settings, migrate=False)
    requests = RequestRepository(database.sessions)
    record, created = requests.submit(
        spec, client=audit.cli_actor(), max_attempts=settings.source(spec.source).max_attempts
    )
    if not args.json:
        print(f"request {record.id} {'made' if created else 'made before'}: {record.state}")
    if args.wait:
        deadline = time.monotonic() + args.timeout
        final = (RequestState.DONE, RequestState.FAILED)
        while (record := requests.get(record.id)).state not in final:
            if time.monotonic() > deadline:
                print(
                    f"dicomnode: request {record.id} is still {record.state} after "
                    f"{args.timeout:g} s (is `dicomnode serve` running with this source?)",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.5)
    return _request_show(JobRepository(database.sessions), record, as_json=args.json)


def _backfill(args: argparse.Namespace) -> int:
    from dicomnode.app import open_database
    from dicomnode.config import load_settings
    from dicomnode.fetch.backfill import Backfill, Window, parse_rate
    from dicomnode.fetch.query import StudyQuery
    from dicomnode.fetch.requests import RequestRepository, check_analysis, default_source
    from dicomnode.fetch.sources import open_source

    settings = load_settings(args.config)
    name = args.source or default_source(settings)
    models = None
    if args.model:
        from dicomnode.fetch.requests import known_models

        models = known_models(settings, list(args.builtin_models))
    check_analysis(settings, name, args.route, args.model, models)
    query = StudyQuery.parse(args.query)
    database = open_database(settings, migrate=False)
    run = Backfill(
        RequestRepository(database.sessions),
        open_source(settings, name, None),  # queries only: the node retrieves
        query,
        route=args.route,
        model=args.model,
        rate_per_min=parse_rate(args.rate) if args.rate else None,
        window=Window.parse(args.window) if args.window else None,
        max_attempts=settings.source(name).max_attempts,
    )
    if args.dry_run:
        studies = run.studies()
        if args.json:
            print(json.dumps([asdict(s) for s in studies], indent=2))
        else:
            for study in studies:
                print(f"{study.study_instance_uid}  {study.study_date}  "
                      f"{','.join(study.modalities)}  {study.description}")  # fmt: skip
            print(f"{len(studies)} studies would be asked for")
        return 0

    def made(request_id: int, study: Any) -> None:
        if not args.json:
            print(f"request {request_id}: study {study.study_instance_uid} ({study.study_date})")

    report = run.run(made)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(f"{report.found} studies match: {report.asked} requests made, "
              f"{report.already} made before")  # fmt: skip
    return 0


def _requests_show(args: argparse.Namespace) -> int:
    from dicomnode.fetch.requests import RequestRepository

    jobs = _jobs_repository(args)
    return _request_show(jobs, RequestRepository(jobs.sessions).get(args.request_id),
                         as_json=args.json)  # fmt: skip


def _request_show(jobs: JobRepository, record: Any, *, as_json: bool) -> int:
    """A request: its state, progress per series, and its jobs; 1 when it failed."""
    from dicomnode import admin

    values = admin.request_detail(jobs, record)
    if as_json:
        print(json.dumps(values, indent=2, default=_json_default))
        return 1 if values["state"] == "failed" else 0
    progress = values.get("progress") or {}
    attempts = f"attempt {values['attempts']}/{values['max_attempts']}"
    print(f"request {values['id']}: {values['state']} ({values['purpose']} from "
          f"{values['source']}, {attempts})")  # fmt: skip
    if progress:
        print(f"instances: {progress.get('received', 0)} of {progress.get('expected', 0)}")
        for series in progress.get("series", ()):
            missing = len(series.get("missing_instances") or ())
            print(f"  series {series['series_instance_uid']} ({series.get('modality') or '?'}): "
                  f"{series['received']}/{series['expected']}"
                  + (f", {missing} missing" if missing else ""))  # fmt: skip
    if values.get("error"):
        print(f"error: {values['error']}")
    for job in values["jobs"]:
        print(f"  job {job['id']}: {job['state']} ({job['model']}, route {job['route']})")
    return 1 if values["state"] == "failed" else 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from dicomnode.app import open_database, restrict_new_files
    from dicomnode.config import load_settings
    from dicomnode.db.migrate import current_revision

    restrict_new_files()
    database = open_database(load_settings(args.config), migrate=True)
    print(f"database at revision {current_revision(database.engine)}")
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, indent: str = "") -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        line = "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        print(indent + line.rstrip())


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
