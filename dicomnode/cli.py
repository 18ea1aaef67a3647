"""``dicomnode``: serve | studies | send | db (more commands arrive with their components)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from dicomnode import __version__
from dicomnode.errors import DicomNodeError

logger = logging.getLogger("dicomnode.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from dicomnode import log

    log.configure(args.log_level)
    try:
        return int(args.func(args) or 0)
    except DicomNodeError as exc:
        print(f"dicomnode: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomnode", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the node (receiver) until stopped")
    _config_option(serve)
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
    worker.set_defaults(func=_worker)

    jobs = commands.add_parser("jobs", help="the job queue")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    jobs_list = jobs_commands.add_parser("list", help="list jobs, newest first")
    _config_option(jobs_list)
    jobs_list.add_argument("--state", help="only these states, comma-separated")
    jobs_list.add_argument("--model")
    jobs_list.add_argument("--study", metavar="STUDY_UID")
    jobs_list.add_argument("--limit", type=int, default=50)
    jobs_list.add_argument("--offset", type=int, default=0)
    jobs_list.add_argument("--json", action="store_true", help="print JSON")
    jobs_list.set_defaults(func=_jobs_list)
    for action, help_text in (
        ("show", "one job in full"),
        ("retry", "queue a failed or cancelled job again"),
        ("cancel", "cancel an unfinished job"),
    ):
        command = jobs_commands.add_parser(action, help=help_text)
        _config_option(command)
        command.add_argument("job_id", type=int)
        command.add_argument("--json", action="store_true", help="print JSON")
        command.set_defaults(func=_jobs_action, jobs_action=action)

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

    send = commands.add_parser("send", help="send DICOM files with C-STORE")
    send.add_argument("files", nargs="+", type=Path, help="files or folders")
    send.add_argument("--to", required=True, metavar="AET@HOST:PORT")
    send.add_argument("--calling-aet", default="DICOMNODE")
    send.add_argument("--tls-ca", help="CA file that signed the peer's certificate (enables TLS)")
    send.add_argument("--tls-cert", help="our certificate, for peers that verify senders")
    send.add_argument("--tls-key", help="our private key")
    send.add_argument("--timeout", type=float, default=60.0)
    send.add_argument("--json", action="store_true", help="print one JSON result per file")
    send.set_defaults(func=_send)

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
    from dicomnode.app import build_node, restrict_new_files
    from dicomnode.config import load_settings

    settings = load_settings(args.config)
    restrict_new_files()
    node = build_node(settings)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    node.start()
    host, port = node.receiver.address
    print(
        f"dicomnode {__version__}: {settings.node.ae_title} listening on {host}:{port}, "
        f"storage {node.spool.root}",
        flush=True,
    )
    stopping.wait()
    logger.info("Stopping", extra={"action": "shutdown"})
    node.stop()
    return 0


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
    from dicomnode.app import open_database, restrict_new_files
    from dicomnode.config import WorkerSettings, load_settings
    from dicomnode.inference.device import resolve_device
    from dicomnode.inference.registry import load_job_models
    from dicomnode.queue import JobRepository
    from dicomnode.queue.periodic import Periodic, schedule_queue_maintenance
    from dicomnode.queue.worker import Worker

    settings = load_settings(args.config)
    restrict_new_files()
    defaults = settings.workers[0] if settings.workers else WorkerSettings()
    names = args.models.split(",") if args.models else defaults.models
    device = str(resolve_device(args.device or defaults.device))  # a missing GPU fails here
    database = open_database(settings, migrate=False)
    models = load_job_models(settings, names, sessions=database.sessions)
    repository = JobRepository(database.sessions, settings.queue)
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


def _jobs_repository(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from dicomnode.app import open_database
    from dicomnode.config import load_settings
    from dicomnode.queue import JobRepository

    settings = load_settings(args.config)
    return JobRepository(open_database(settings, migrate=False).sessions, settings.queue)


def _jobs_list(args: argparse.Namespace) -> int:
    states = [s.strip() for s in args.state.split(",")] if args.state else None
    try:
        jobs = _jobs_repository(args).list(
            state=states, model=args.model, study=args.study, limit=args.limit, offset=args.offset
        )
    except ValueError as exc:  # an unknown state
        raise DicomNodeError(str(exc)) from exc
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
            job.route,
            f"{job.attempts}/{job.max_attempts}",
            job.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
            (job.error or "").splitlines()[0][:60] if job.error else "",
        )
        for job in jobs
    ]
    _print_table(header, rows)
    return 0


def _jobs_action(args: argparse.Namespace) -> int:
    from dicomnode.queue import JobNotFound

    repository = _jobs_repository(args)
    if args.jobs_action == "show":
        job = repository.get(args.job_id)
        if job is None:
            raise JobNotFound(f"no job {args.job_id}")
    elif args.jobs_action == "retry":
        job = repository.retry(args.job_id)
    else:
        job = repository.cancel(args.job_id)
    values = job.as_json()
    if args.json:
        print(json.dumps(values, indent=2))
    elif args.jobs_action == "show":
        for key, value in values.items():
            print(f"{key + ':':<20} {'' if value is None else value}")
    else:
        print(f"job {job.id} {job.state}")
    return 0


def _route_explain(args: argparse.Namespace) -> int:
    from pydicom import dcmread
    from pydicom.dataset import Dataset

    from dicomnode.config import load_settings
    from dicomnode.routing import Outcome, Router, SeriesFacts
    from dicomnode.send.scu import expand

    router = Router.from_settings(load_settings(args.config))
    series: dict[str, dict[str, Dataset]] = {}  # Series Instance UID -> SOP Instance UID -> header
    errors = []
    for path in expand(args.files):
        try:
            ds = dcmread(path, stop_before_pixels=True)
            uid = str(ds.get("SeriesInstanceUID") or "").strip()
            sop = str(ds.get("SOPInstanceUID") or "").strip() or str(path)
        except Exception as exc:  # whatever is wrong with one file is reported, not a crash
            error = f"not readable: {exc or type(exc).__name__}"
            errors.append({"path": str(path), "error": error})
            continue
        if not uid:
            errors.append({"path": str(path), "error": "has no Series Instance UID"})
            continue
        series.setdefault(uid, {}).setdefault(sop, ds)
    reports = []
    for uid, instances in series.items():
        facts = SeriesFacts.from_datasets(list(instances.values()), calling_aet=args.calling_aet)
        decision = router.route(facts)
        routes = [
            {
                "name": r.name,
                "model": r.model,
                "destinations": list(r.destinations),
                "priority": r.priority.name.lower(),
                "level": r.level,
            }
            for r in decision.routes
        ]
        reports.append(
            {
                "series_instance_uid": uid,
                "modality": facts.attributes.get("Modality", ""),
                "series_description": facts.attributes.get("SeriesDescription", ""),
                "slices": facts.slices,
                "calling_aet": facts.calling_aet,
                "decision": {"basis": decision.basis, "routes": routes},
                "rules": [asdict(rule) for rule in router.explain(facts)],
            }
        )
    if args.json:
        print(json.dumps({"series": reports, "errors": errors}, indent=2))
        return 0
    marks = {Outcome.MATCH: "yes", Outcome.NO_MATCH: "no", Outcome.PENDING: "?"}
    width = max((len(rule.name) for rule in router.rules), default=0)
    for report in reports:
        description = f" {report['series_description']!r}" if report["series_description"] else ""
        print(
            f"series {report['series_instance_uid']}: {report['modality'] or '?'}{description}, "
            f"{report['slices']} instance(s)"
        )
        for route in report["decision"]["routes"]:
            print(
                f"  -> {route['name']}: model {route['model']}, priority {route['priority']}, "
                f"to {', '.join(route['destinations']) or '(no destinations)'} "
                f"[{report['decision']['basis']}]"
            )
        if not report["decision"]["routes"]:
            print("  -> no route matches: the series is skipped")
        for rule in report["rules"]:
            state = "chosen" if rule["chosen"] else "-"
            # the failing conditions follow, one a line: not repeated in the headline
            failed = "; ".join(
                c["text"] for c in rule["conditions"] if c["outcome"] == Outcome.NO_MATCH
            )
            headline = rule["reason"].removesuffix(f": {failed}") if failed else rule["reason"]
            print(f"  {state:<6}  {rule['route']:<{width}}  {headline}")
            for condition in rule["conditions"]:
                mark = marks[condition["outcome"]]
                print(f"  {'':<6}  {'':<{width}}    {mark:<3} {condition['text']}")
    if not router.rules:
        print("no routes are configured ([[routes]] in the config file)")
    for error in errors:
        print(f"dicomnode: {error['path']}: {error['error']}", file=sys.stderr)
    print(f"{len(reports)} series, {len(errors)} file(s) not read", file=sys.stderr)
    return 0


def _send(args: argparse.Namespace) -> int:
    from dicomnode.receive.tls import client_context
    from dicomnode.send.scu import Destination, send_files

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


def _db_upgrade(args: argparse.Namespace) -> int:
    from dicomnode.app import open_database, restrict_new_files
    from dicomnode.config import load_settings
    from dicomnode.db.migrate import current_revision

    restrict_new_files()
    database = open_database(load_settings(args.config), migrate=True)
    print(f"database at revision {current_revision(database.engine)}")
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
