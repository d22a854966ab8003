"""`specllava query` and `specllava stats`: SQL and a summary over a caption run's output table.

    specllava query OUTPUT "SELECT status, count(*) FROM captions GROUP BY status"
    specllava query s3://b/captions "SELECT id, caption FROM captions LIMIT 5" --format json --s3-endpoint URL
    specllava stats OUTPUT [--plot accepted.png] [--json]

The table (OUTPUT/data/*.parquet) is opened as a pyarrow dataset and registered in DuckDB as
`captions`, so local and s3:// outputs work alike and DuckDB needs no extension or credentials of
its own (pyarrow reads S3 with the usual AWS env/config). The connection is read-only: external
access is disabled and its configuration locked once `captions` is registered, so SQL cannot
write files (COPY), read other ones, ATTACH, install/load extensions or change settings.
Columns: workers/schema.py.
"""
from __future__ import annotations

import argparse
import io
import json
import sys

from jobs.common import COUNT, UserError

FORMATS = ("table", "csv", "json", "jsonl")


def add_parser(subparsers) -> None:
    q = subparsers.add_parser(
        "query", help="DuckDB SQL over a caption output (table `captions`)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run DuckDB SQL over a caption run's output table, registered as `captions`.",
        epilog="columns: id (the input's id column), caption, status (ok/error), error, new_tokens,\n"
               "  target_forwards, mean_accepted, accepted_lengths (list), draft_tokens, tree_nodes_mean, decode_s\n"
               "examples:\n"
               "  specllava query OUT \"SELECT status, count(*) FROM captions GROUP BY status\"\n"
               "  specllava query OUT \"SELECT id, error FROM captions WHERE status <> 'ok'\" --format csv")
    q.add_argument("output", help="the run's --output (local dir or s3:// prefix)")
    q.add_argument("sql", help='SQL over the table `captions`, e.g. "SELECT count(*) FROM captions"')
    q.add_argument("--s3-endpoint", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    q.add_argument("--format", default="table", choices=FORMATS, help="output format (default table)")
    q.add_argument("--max-width", type=COUNT, default=60, help="truncate table cells to this many characters "
                   "(0 = no limit; default 60)")
    q.set_defaults(func=query_command)

    s = subparsers.add_parser("stats", help="rows ok/error, caption length, accepted length, tokens/s",
                              description="summary of a caption output and its runs (_run.json)")
    s.add_argument("output", help="the run's --output (local dir or s3:// prefix)")
    s.add_argument("--s3-endpoint", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    s.add_argument("--plot", metavar="FILE.png", help="write a histogram of accepted lengths per step")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=stats_command)


def open_output(output: str, s3_endpoint: str | None = None):
    """The output table as a pyarrow dataset (UserError if there is none)."""
    import pyarrow.dataset as pads

    from pipeline.commit import committed_units, unit_name
    from pipeline.layout import DATA_DIR
    from workers import storage

    try:
        fs, root = storage.resolve(output, s3_endpoint)
        data = f"{root.rstrip('/')}/{DATA_DIR}"
        # Committed units only (one listing): never a temporary or a foreign file.
        files = [f"{data}/{unit_name(u)}" for u in sorted(committed_units(fs, data))]
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {output}: {' '.join(str(exc).split())[:300]}") from None
    if not files:
        raise UserError(f"{output} has no output table (no {output.rstrip('/')}/{DATA_DIR}/unit-*.parquet); "
                        "is it the --output of a caption run?")
    return pads.dataset(files, filesystem=fs, format="parquet")


READ_ONLY = ("`specllava query` is read-only: it reads the table `captions` and nothing else "
             "(no COPY, no other files, ATTACH, extensions or settings)")


def _read_only_connection(dataset):
    """A DuckDB connection that sees `dataset` as `captions` and nothing outside it.

    The dataset is registered first (DuckDB scans the pyarrow object; pyarrow does the reading,
    local or S3), then external access is switched off (COPY, read_csv/read_parquet/glob of any
    path, ATTACH, INSTALL/LOAD, Python replacement scans) and the configuration locked, so no SQL
    statement can switch it back on.
    """
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        con.register("captions", dataset)
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def _is_refused(exc) -> bool:
    """A statement the read-only connection refused (rather than a mistake in the SQL)."""
    import duckdb

    return isinstance(exc, duckdb.PermissionException) or "configuration has been locked" in str(exc)


def run_sql(output: str, sql: str, s3_endpoint: str | None = None):
    """Run `sql` with the output registered as `captions` on a read-only connection; returns a
    pyarrow Table."""
    import duckdb

    dataset = open_output(output, s3_endpoint)
    con = _read_only_connection(dataset)
    try:
        relation = con.sql(sql)
        if relation is None:  # a statement without a result (CREATE VIEW, ...)
            import pyarrow as pa
            return pa.table({})
        fetch = getattr(relation, "to_arrow_table", None) or relation.fetch_arrow_table  # duckdb 2.x / 1.x
        return fetch()
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if _is_refused(exc):
            raise UserError(f"not allowed: {READ_ONLY}; DuckDB said: {first}") from None
        raise UserError(f"SQL error: {first}") from None
    finally:
        con.close()


def _cell(value, width: int) -> str:
    text = "" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
    text = " ".join(text.split())
    return text if width <= 0 or len(text) <= width else text[: width - 1] + "…"


def print_rows(header: list[str], rows: list[list], width: int = 0, out=None) -> None:
    """An aligned text table."""
    out = out or sys.stdout
    cells = [[_cell(v, width) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    for row in [header, ["-" * w for w in widths], *cells]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")


def write_table(table, fmt: str, width: int = 60, out=None) -> None:
    out = out or sys.stdout
    if fmt == "csv":
        import pyarrow.csv as pacsv
        sink = io.BytesIO()
        pacsv.write_csv(table, sink)
        out.write(sink.getvalue().decode())
        return
    rows = table.to_pylist()
    if fmt == "json":
        out.write(json.dumps(rows, default=str, ensure_ascii=False, indent=1) + "\n")
    elif fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
    else:
        print_rows(table.column_names, [list(r.values()) for r in rows], width, out)
        out.write(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})\n")


def query_command(args) -> int:
    table = run_sql(args.output, args.sql, args.s3_endpoint)
    try:
        write_table(table, args.format, args.max_width)
    except Exception as exc:  # noqa: BLE001 - e.g. CSV of a nested column
        import pyarrow as pa
        if isinstance(exc, (pa.ArrowInvalid, pa.ArrowNotImplementedError)):
            raise UserError(f"cannot write the result as {args.format}: {str(exc).splitlines()[0]}") from None
        raise
    return 0


STATS_SQL = """
SELECT count(*) AS rows,
       count(DISTINCT {id}) AS unique_ids,
       count(*) FILTER (WHERE status = 'ok') AS ok,
       count(*) FILTER (WHERE status <> 'ok') AS error,
       avg(length(caption)) FILTER (WHERE status = 'ok') AS caption_chars_mean,
       CAST(median(length(caption)) FILTER (WHERE status = 'ok') AS DOUBLE) AS caption_chars_median,
       avg(new_tokens) FILTER (WHERE status = 'ok') AS new_tokens_mean,
       CAST(sum(new_tokens) FILTER (WHERE status = 'ok') AS BIGINT) AS new_tokens,
       CAST(sum(target_forwards) FILTER (WHERE status = 'ok') AS BIGINT) AS target_forwards,
       count(*) FILTER (WHERE status = 'ok' AND draft_tokens = 0 AND target_forwards > 1) AS undrafted
FROM captions
"""


def compute_stats(output: str, s3_endpoint: str | None = None) -> dict:
    from decoding.stats import mean_accepted_length
    from pipeline.manifest import read_manifest

    dataset = open_output(output, s3_endpoint)
    id_column = dataset.schema.names[0]  # the output's first column is the input's id column
    row = run_sql(output, STATS_SQL.format(id=f'"{id_column}"'), s3_endpoint).to_pylist()[0]
    hist = run_sql(output, "SELECT l AS accepted, count(*) AS steps FROM "
                   "(SELECT unnest(accepted_lengths) AS l FROM captions WHERE status = 'ok') "
                   "GROUP BY l ORDER BY l", s3_endpoint).to_pylist()
    errors = run_sql(output, "SELECT error, count(*) AS n FROM captions WHERE status <> 'ok' "
                     "GROUP BY error ORDER BY n DESC, error LIMIT 5", s3_endpoint).to_pylist()
    ok = row["ok"] or 0
    tokens, forwards = row.pop("new_tokens") or 0, row.pop("target_forwards") or 0
    stats = {**row,
             "caption_chars_mean": _round(row["caption_chars_mean"]),
             "caption_chars_median": _round(row["caption_chars_median"]),
             "new_tokens_mean": _round(row["new_tokens_mean"]),
             "mean_accepted": _round(mean_accepted_length(tokens, forwards, ok), 4),
             "accepted_histogram": {int(h["accepted"]): int(h["steps"]) for h in hist},
             "top_errors": [{"error": e["error"], "rows": e["n"]} for e in errors]}
    try:
        manifest = read_manifest(output, s3_endpoint) or {}
    except (OSError, ValueError):
        manifest = {}
    runs = [r for r in manifest.get("runs", []) if r.get("wall_s")]
    wall = sum(r["wall_s"] for r in runs)
    stats.update(input_rows=manifest.get("input", {}).get("rows"), status=manifest.get("status"),
                 runs=len(manifest.get("runs", [])),
                 tokens_per_s=round(sum(r.get("new_tokens") or 0 for r in runs) / wall, 2) if wall else None,
                 images_per_s=round(sum(r.get("rows") or 0 for r in runs) / wall, 3) if wall else None,
                 tree_budget=[{"run": n, **report} for n, run in enumerate(manifest.get("runs", []), start=1)
                              for report in run.get("tree_budget") or []])
    return stats


def _round(value, digits: int = 2):
    return None if value is None else round(float(value), digits)


def stats_command(args) -> int:
    stats = compute_stats(args.output, args.s3_endpoint)
    if args.plot:
        from jobs.charts import bar_chart
        try:
            bar_chart(stats["accepted_histogram"], args.plot,
                      title=f"tokens accepted per verify step ({stats['ok']} ok rows)",
                      x_label="accepted length (tokens per target forward)", y_label="verify steps (count)")
        except OSError as exc:
            raise UserError(f"cannot write --plot {args.plot}: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps(stats))
        return 0
    total = stats["input_rows"]
    complete = "" if total is None else (f" of {total} input rows" + (
        " (complete)" if stats["unique_ids"] == stats["rows"] == total else " (incomplete: `specllava resume`)"))
    print(f"output          {args.output}  [{stats['status'] or 'no _run.json'}; {stats['runs']} run(s)]")
    print(f"rows            {stats['rows']}{complete}: {stats['ok']} ok, {stats['error']} error")
    print(f"caption length  mean {stats['caption_chars_mean']} chars, median {stats['caption_chars_median']}, "
          f"mean {stats['new_tokens_mean']} tokens")
    print(f"mean accepted   {stats['mean_accepted']} tokens per target forward (verify step)")
    if stats["undrafted"]:   # the tree budget chose no drafting where these rows decoded: say so
        print(f"drafting        {stats['undrafted']} of {stats['ok']} ok rows were decoded by the target alone "
              "(no drafted token: the tree budget chose no drafting at their batch sizes, or one token was left; "
              "`--tree-budget off` always drafts)")
    hist = stats["accepted_histogram"]
    if hist:
        print("accepted/step   " + "  ".join(f"{k}:{v}" for k, v in sorted(hist.items())))
    print(f"throughput      {stats['tokens_per_s']} tokens/s, {stats['images_per_s']} images/s "
          "(rows decoded / wall time of the runs)")
    from pipeline.manifest import budget_lines

    for report in stats["tree_budget"]:
        first, *again = budget_lines([report])
        print(f"tree budget     run {report['run']}, {first.removeprefix('tree budget of ')}")
        for line in again:
            print(f"                {line.strip()}")
    for err in stats["top_errors"]:
        print(f"error x{err['rows']:<6} {err['error']}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0
