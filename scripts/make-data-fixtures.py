#!/usr/bin/env python3
"""Write the corpus fixtures of crates/data/tests/fixtures/ with the libraries that write
the real files: Parquet by pyarrow (as the Hugging Face Hub's Parquet conversions, FineWeb
and FineWeb-Edu are written), zstd JSONL by python-zstandard (as SlimPajama and DCLM are).

Every Parquet file holds the same documents as docs.jsonl, so the tests can check that each
format gives the same tokens. Run from the repository root (needs pyarrow and zstandard):

    python3 scripts/make-data-fixtures.py
"""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

OUT = "crates/data/tests/fixtures"

# Documents in corpus order. None is a null row, "" and whitespace-only rows are empty
# documents: readers skip all three and count them.
TEXTS = [
    "The first document: plain ASCII text about the quick brown fox.",
    "Unicode survives: caf\u00e9, na\u00efve, \u65e5\u672c\u8a9e, and an emoji \U0001F600.",
    None,
    "A literal <|endoftext|> inside a document is ordinary text, not a boundary.",
    "",
    "Several\nlines\n\nwith blank lines between paragraphs.\n",
    "   \n\t ",
    "Row seven sits in the fourth row group when groups hold two rows.",
    "Short.",
    "The last document closes the file without a trailing newline",
]
# Bytes of a binary column: invalid UTF-8 (a Latin-1 e-acute, a stray continuation
# byte, a truncated sequence at the end) besides valid text.
RAW = [
    b"caf\xe9 au lait",
    b"valid bytes only",
    None,
    b"\xff\xfe leading garbage",
    b"cut short \xe2\x82",
    b"ok again",
]


def write_jsonl(path, field, rows):
    """One JSON object per line; invalid UTF-8 bytes are written raw inside the string, as
    in scraped corpora (a JSON parser over the raw bytes would refuse them)."""
    with open(path, "wb") as f:
        for i, v in enumerate(rows):
            if isinstance(v, bytes):
                f.write(b'{"id": %d, "%s": "' % (i, field.encode()))
                f.write(v)
                f.write(b'"}\n')
            else:
                f.write(json.dumps({"id": i, field: v}).encode() + b"\n")


def table(text_type=pa.string()):
    return pa.table(
        {
            "id": pa.array(range(len(TEXTS)), pa.int64()),
            "text": pa.array(TEXTS, text_type),
            "url": pa.array([f"https://example.org/{i}" for i in range(len(TEXTS))]),
        }
    )


def main():
    os.makedirs(OUT, exist_ok=True)
    write_jsonl(f"{OUT}/docs.jsonl", "text", TEXTS)
    write_jsonl(f"{OUT}/raw.jsonl", "raw", RAW)

    # Several row groups of two rows and tiny data pages (several pages per column chunk),
    # dictionary-encoded strings: the reader must stream all of them.
    kw = dict(row_group_size=2, data_page_size=64, use_dictionary=True)
    pq.write_table(table(), f"{OUT}/docs.snappy.parquet", compression="snappy", **kw)
    pq.write_table(table(), f"{OUT}/docs.gzip.parquet", compression="gzip", **kw)
    # large_string (64-bit offsets in Arrow, as the Hub's datasets often have), zstd, plain.
    pq.write_table(
        table(pa.large_string()),
        f"{OUT}/docs.zstd.parquet",
        compression="zstd",
        use_dictionary=False,
        row_group_size=4,
    )
    pq.write_table(
        pa.table({"raw": pa.array(RAW, pa.binary())}),
        f"{OUT}/raw.parquet",
        row_group_size=4,
    )

    # Bad files.
    pq.write_table(
        pa.table({"id": pa.array([1, 2], pa.int64()), "content": ["a", "b"]}),
        f"{OUT}/bad-no-text.parquet",
    )
    pq.write_table(pa.table({"text": pa.array([1, 2], pa.int64())}), f"{OUT}/bad-int-text.parquet")
    pq.write_table(
        pa.table({"text": pa.array([["a", "b"], ["c"]], pa.list_(pa.string()))}),
        f"{OUT}/bad-list-text.parquet",
    )
    pq.write_table(table(), f"{OUT}/bad-brotli.parquet", compression="brotli")
    with open(f"{OUT}/docs.snappy.parquet", "rb") as f:
        whole = f.read()
    with open(f"{OUT}/bad-truncated.parquet", "wb") as f:
        f.write(whole[: len(whole) // 2])

    # zstd JSONL: two frames back to back (as appending writers and `cat a.zst b.zst`
    # make them), the second with a content checksum.
    with open(f"{OUT}/docs.jsonl", "rb") as f:
        lines = f.read().splitlines(keepends=True)
    half = len(lines) // 2
    first = zstandard.ZstdCompressor(level=3).compress(b"".join(lines[:half]))
    second = zstandard.ZstdCompressor(level=19, write_checksum=True).compress(
        b"".join(lines[half:])
    )
    with open(f"{OUT}/docs.jsonl.zst", "wb") as f:
        f.write(first + second)
    with open(f"{OUT}/bad-corrupt.jsonl.zst", "wb") as f:
        f.write(first[: len(first) // 2] + b"\x00garbage\x00" * 4)


if __name__ == "__main__":
    main()
