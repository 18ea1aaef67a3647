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
