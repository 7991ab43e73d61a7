"""How API commands print: rich tables for people, `--json` for scripts."""

import json
from collections.abc import Callable, Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

json_option = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON instead of a table.")


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Callable[[dict[str, Any]], Any]]]) -> None:
    """One row per item; each column is a header and how to get its cell from the item."""
    table = Table(*[header for header, _ in columns])
    for row in rows:
        table.add_row(*["" if cell(row) is None else str(cell(row)) for _, cell in columns])
    Console(width=200).print(table)


def print_fields(item: dict[str, Any]) -> None:
    """One `name: value` line per field (nested values as JSON)."""
    for name, value in item.items():
        shown = json.dumps(value) if isinstance(value, (dict, list)) else ("" if value is None else value)
        click.echo(f"{name + ':':<18} {shown}")


def print_rows(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Callable[[dict[str, Any]], Any]]],
               as_json: bool) -> None:
    """Rows as JSON when asked, else as a table."""
    if as_json:
        print_json(rows)
    else:
        print_table(rows, columns)


def print_item(item: dict[str, Any], as_json: bool) -> None:
    """One item as JSON when asked, else as its fields."""
    if as_json:
        print_json(item)
    else:
        print_fields(item)
