#!/usr/bin/env python3
"""Reads a panscreen output directory the way an epidemiologist would, with DuckDB and
pyarrow, and prints what it found as JSON. Used by the end-to-end test."""

import json
import sys

import duckdb
import pyarrow.dataset as ds


def main(out: str) -> int:
    con = duckdb.connect()
    results = f"read_parquet('{out}/results/**/*.parquet', hive_partitioning = true)"
    total, flagged, regions = con.execute(
        f"select count(*), count(*) filter (where flagged), count(distinct region_code) from {results}"
    ).fetchone()
    by_region = con.execute(
        f"select region_code, scan_month, count(*) from {results} group by all order by all"
    ).fetchall()
    summary_screened = con.execute(f"select sum(screened) from read_parquet('{out}/summary/summary.parquet')").fetchone()[0]
    worklist = con.execute(f"select count(*) from read_parquet('{out}/worklist/worklist.parquet')").fetchone()[0]
    quarantine = con.execute(f"select reason, count(*) from read_parquet('{out}/quarantine/*.parquet') group by reason order by reason").fetchall()
    dataset = ds.dataset(f"{out}/results", format="parquet", partitioning="hive")
    print(json.dumps({
        "results": total,
        "flagged": flagged,
        "regions": regions,
        "partitions": len(by_region),
        "summary_screened": int(summary_screened),
        "worklist": worklist,
        "quarantine_reasons": {reason: count for reason, count in quarantine},
        "pyarrow_rows": dataset.count_rows(),
        "pyarrow_columns": dataset.schema.names,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
