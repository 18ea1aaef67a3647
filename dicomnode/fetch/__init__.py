"""Studies in on demand: query/retrieve from the PACS (``[[sources]]``).

``dimse`` (C-FIND, then C-MOVE to our own AE or C-GET) and ``dicomweb`` (QIDO-RS, then WADO-RS)
speak to a source; every instance they bring is stored through the receiver's store (spool and
index, as a C-STORE is), with a peer that names the source. ``requests`` keeps the studies asked
for (``POST /api/requests``, ``dicomnode analyze``, ``backfill``, a route's priors); ``runner``
retrieves them, resumes what a failed attempt left missing, and only then makes their jobs.
"""
