"""Summary tables: one value formatter, one CSV writer and one markdown table for every report."""
import csv
import io

from runner.files import atomic_write_text


def fmt(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def write_csv(path, columns, rows, cell=lambda key, value: fmt(value)) -> None:
    """`rows` (dicts) as a CSV of `columns`, each value written by `cell(column, value)`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: cell(k, row.get(k)) for k in columns} for row in rows)
    atomic_write_text(path, buffer.getvalue())


def markdown_table(columns, rows, cell=lambda key, value: fmt(value)) -> list:
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cell(k, row.get(k)) for k in columns) + " |" for row in rows])
