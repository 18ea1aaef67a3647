"""One job's stages, from its series in the index to the DICOM objects the send queue takes:
gather the inputs (``inputs``), run the model (``dicomnode.inference``), write the masks,
findings and result objects (``outputs``). :class:`ModelPipeline` is what the worker runs for
a model; :func:`job_models` makes one per model a worker takes.

Nothing here is imported by the receiver: a worker imports it when it starts.
"""

from dicomnode.pipeline.job import ModelPipeline, PipelineSettings
from dicomnode.pipeline.models import available_models, job_models, load_job_models

__all__ = [
    "ModelPipeline",
    "PipelineSettings",
    "available_models",
    "job_models",
    "load_job_models",
]
