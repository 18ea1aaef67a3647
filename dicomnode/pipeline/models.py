"""The models a worker runs, by name: a pipeline for each model package the registry has, a
command model for each ``[models.commands.NAME]`` (:mod:`dicomnode.pipeline.commands`), and
the builtins a caller adds (job models without a package: the tests add ``echo``, which runs
without the inference runtime; production adds none)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from dicomnode.pipeline.job import ModelPipeline, PipelineSettings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from dicomnode.config import CommandModelSettings, ResultsSettings, RouteSettings, Settings
    from dicomnode.inference.registry import ModelRegistry
    from dicomnode.queue.worker import JobModel

#: name -> a factory of a job model that is no model package (the tests' models)
BuiltinModels = Mapping[str, Callable[[], "JobModel"]]


def available_models(
    registry: ModelRegistry,
    builtins: BuiltinModels | None = None,
    commands: Mapping[str, CommandModelSettings] | None = None,
) -> list[str]:
    return sorted({*registry.names(), *(builtins or {}), *(commands or {})})


def job_models(
    registry: ModelRegistry,
    names: Iterable[str] | None = None,
    *,
    sessions: Callable[[], Session] | None = None,
    database_url: str | None = None,
    routes: Sequence[RouteSettings] = (),
    strict: bool | None = None,
    results: ResultsSettings | None = None,
    builtins: BuiltinModels | None = None,
    commands: Mapping[str, CommandModelSettings] | None = None,
) -> dict[str, JobModel]:
    """The worker's models (not loaded yet) for ``names`` (None or empty: every model).

    Pipelines find their jobs' series in the index through ``sessions`` (a session factory)
    or, without one, a database opened from ``database_url`` on the first job. ``routes`` give
    study-level models the input names of their routes' ``completion.required_series``. With
    ``strict`` (default: when models are named), a model that fails to load stops the
    worker's start; otherwise the failure is logged and that model's jobs fail with it, while
    the others run. ``results`` configures the DICOM objects written from each job's findings
    (None: the defaults). ``commands``: the command models (``[models.commands]``) by name.
    UnknownModel names the models there are.
    """
    builtins = dict(builtins or {})
    commands = dict(commands or {})
    clash = sorted(set(registry.names()) & set(builtins))
    if clash:
        from dicomnode.errors import ModelPackageInvalid

        raise ModelPackageInvalid(
            f"model package(s) {', '.join(clash)} take the name of a builtin model"
        )
    clash = sorted((set(registry.names()) | set(builtins)) & set(commands))
    if clash:
        from dicomnode.errors import ModelPackageInvalid

        raise ModelPackageInvalid(
            f"command model(s) {', '.join(clash)} take the name of a model package or builtin "
            "model ([models.commands])"
        )
    wanted = list(dict.fromkeys(n.strip() for n in (names or ()) if n.strip()))
    if strict is None:
        strict = bool(wanted)
    everything = available_models(registry, builtins, commands)
    wanted = wanted or everything
    unknown = [name for name in wanted if name not in everything]
    if unknown:
        from dicomnode.inference.registry import unknown_model

        raise unknown_model(unknown, everything)
    settings = PipelineSettings(
        sessions=sessions,
        database_url=database_url,
        required_series={r.name: dict(r.completion.required_series) for r in routes},
        envelope_policy={r.name: r.envelope for r in routes},
        priors={r.name: dict(r.priors.match) for r in routes if r.priors is not None},
        seed=registry.seed,
        strict=strict,
        results=results,
    )
    out: dict[str, JobModel] = {}
    for name in wanted:
        if name in builtins:
            out[name] = builtins[name]()
        elif name in commands:
            from dicomnode.pipeline.commands import CommandModel

            out[name] = CommandModel(name, commands[name], settings)
        else:
            out[name] = ModelPipeline(
                registry.spec(name),
                functools.partial(registry.load, name),
                settings,
            )
    return out


def load_job_models(
    settings: Settings,
    names: Iterable[str] | None = None,
    *,
    sessions: Callable[[], Session] | None = None,
    strict: bool | None = None,
    builtins: BuiltinModels | None = None,
) -> dict[str, JobModel]:
    """The worker's models from the settings: ``[models]`` folders, bundles and commands, the
    routes."""
    from dicomnode.inference.registry import ModelRegistry

    return job_models(
        ModelRegistry.from_settings(settings),
        names,
        sessions=sessions,
        database_url=settings.node.resolved_database_url,
        routes=settings.routes,
        strict=strict,
        results=settings.results,
        builtins=builtins,
        commands=settings.models.commands,
    )
