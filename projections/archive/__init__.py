"""The log's archive: sealed ranges of the log as verified, hash-chained Parquet segments.

    config.py    ArchiveSettings: where the archive lives, how large a segment is
    segment.py   a segment's metadata, its file name, the content hash and the chain
    writer.py    records -> one segment file (temp name, fsync, rename), read back and verified
    verify.py    reading and checking segments: one file, the whole chain
    archiver.py  `archive run`: the log from after the last segment, in segments, each recorded
                 on the log as an `archive.segment.sealed` event
    reader.py    segments as fold batches (rebuild) and the files behind the query view
    retention.py retention classes (subject filters and their rule) and the default policy
    trim.py      `archive trim`: purge the log below the verified archive, class by class,
                 recorded as an `archive.log.trimmed` event
    cli.py       `bus archive run|list|verify|trim`

A segment holds each record's exact bytes, subject, NATS header block, sequence and stored time,
and beside them the columns the views fold (`projections.batch`), so a rebuild folds archived
ranges without decoding a record in Python.
"""
