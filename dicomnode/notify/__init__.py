"""Notifications: a job's outcome told to the clinical systems, beside its DICOM sends.

``notifier.py`` delivers the notification queue (:mod:`dicomnode.queue.notifications`), a thread
per ``[[notifications]]`` target, with the send queue's backoff and dead letter; one module per
protocol builds and delivers a message: ``webhook.py`` (a JSON POST from a safe template),
``hl7.py`` (HL7 v2.5 ORU^R01 over MLLP, the ACK read back) and ``fhir.py`` (an R4 transaction
Bundle of a DiagnosticReport and its Observations); ``message.py`` is what they all say.
"""
