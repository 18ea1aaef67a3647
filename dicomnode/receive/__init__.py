"""The DICOM server: its own Upper Layer (``pdu``, ``association``, ``dimse``) on pynetdicom's PDU
classes and context negotiation, C-ECHO and C-STORE, validation, the spool and the index writes,
the AE and host policy, TLS. It never loads the model runtime, so it starts fast."""
