"""Markdown tables for the benchmark reports, and writing a report beside its figures."""

import json
from pathlib import Path


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def write_report(output: Path, parts: list[str], figures: dict) -> None:
    """The report's Markdown sections to `output` (.md) and its figures to the .json beside it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n\n".join(parts) + "\n")
    output.with_suffix(".json").write_text(json.dumps(figures, indent=2, default=float) + "\n")
    print(f"\nwritten: {output}")
