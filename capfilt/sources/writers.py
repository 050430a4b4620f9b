"""img2dataset's Parquet writer with capfilt's write id in every shard's footer, so that a
fetched shard's fingerprint (core/parquet.py) differs from any other write's.
Imported only when fetching: it subclasses an img2dataset class.
"""

from __future__ import annotations

from img2dataset.writer import ParquetSampleWriter

from capfilt.core.parquet import with_write_id


class WriteIdParquetSampleWriter(ParquetSampleWriter):
    """ParquetSampleWriter, its schema carrying a fresh write id."""

    def __init__(
        self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format
    ):
        super().__init__(
            shard_id,
            output_folder,
            save_caption,
            oom_shard_count,
            with_write_id(schema),
            encode_format,
        )
