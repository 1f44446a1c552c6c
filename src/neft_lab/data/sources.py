"""Where examples come from: local line-aligned files or JSONL, the Hugging Face hub, or the embedded grammar.

Every reader fails with a `DataError` that names the file (and line) and says how to fix it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from neft_lab.data.examples import Example
from neft_lab.errors import DataError

logger = logging.getLogger(__name__)


def regular_file(path: Path) -> Path:
    """`path` if it is a regular file (through symlinks); else a one-line DataError saying what it is. A FIFO
    blocked forever and a symlink to /dev/zero filled the memory; a folder or a symlink loop was a traceback."""
    import errno
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DataError(
                f"{path} is a loop of symbolic links: point it (or the setting naming it) at a real data file"
            ) from None
        raise DataError(
            f"{path} cannot be read ({err.strerror}): check the path and its permissions"
        ) from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path} is a folder, not a file: point the setting at the data file inside it")
    if not stat.S_ISREG(mode):
        what = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "special"
        )
        raise DataError(
            f"{path} is not a regular file ({what}): give a data file on disk (copy the data into one)"
        )
    return path


def _loads(text: str, where: str) -> Any:
    """json.loads, with a record nested thousands of levels deep refused in one line (not a RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(f"{where} is nested too deeply to be a data record: give flat JSON records") from None


def read_text(path: Path) -> str:
    """A UTF-8 text file's content (a byte-order mark dropped); a missing or non-UTF-8 file is a DataError."""
    regular_file(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except OSError as err:
        raise DataError(
            f"{path} cannot be read ({err.strerror}): check the path and its permissions"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path} line {line}, column {column} is not valid UTF-8 (byte 0x{raw[err.start]:02x}). "
            f"Re-encode the file as UTF-8, e.g. `iconv -f GB18030 -t UTF-8 {path.name}` for Chinese text."
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def read_lines(path: Path) -> list[str]:
    """Read a UTF-8 text file as one segment per line (no trailing newline kept)."""
    text = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line.rstrip("\r") for line in lines]
    if not lines:
        raise DataError(f"{path} is empty: it must hold one segment per line")
    if not any(line.strip() for line in lines):
        raise DataError(
            f"{path} is empty: its {len(lines)} line(s) are all blank; it must hold one segment per line"
        )
    return lines


def data_folder(folder: str | Path, key: str) -> Path:
    """A data folder that must exist; `key` names the setting that points at it."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise DataError(f"data folder {path} {state}: point {key} at the folder that holds the split files")
    return path


def text_at(record: dict[str, Any], dotted: str, where: str, fix: str | None = None) -> str:
    """The text at a (dotted) field of a record; `fix` says which setting names the field."""
    value = value_at(record, dotted, where, fix)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{dotted}' is {type(value).__name__}, expected text")
    return value


def value_at(record: dict[str, Any], dotted: str, where: str, fix: str | None = None) -> Any:
    """The value at a (dotted) field of a record (`a.b`: `record["a"]["b"]`); a missing field raises a
    DataError naming `where`, the record's fields and `fix` (which setting names the field)."""
    value: Any = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{where} has no field '{dotted}' (fields: {keys}). "
                + (fix or "Set task.data.source_field / task.data.target_field to the right names.")
            )
        value = value[key]
    return value


def read_parallel(source_file: Path, target_file: Path) -> list[Example]:
    """Two line-aligned files: line i of the source translates to line i of the target."""
    sources, targets = read_lines(source_file), read_lines(target_file)
    if len(sources) != len(targets):
        raise DataError(
            f"{source_file} has {len(sources)} lines but {target_file} has {len(targets)}: "
            "parallel files must be line-aligned, one segment per line (check for stray newlines inside a segment)."
        )
    return [Example(s, t, f"{source_file}:{i + 1}") for i, (s, t) in enumerate(zip(sources, targets))]


def read_jsonl(path: Path, source_field: str, target_field: str) -> list[Example]:
    examples = []
    for i, line in enumerate(read_lines(path)):
        if not line.strip():
            continue
        where = f"{path} line {i + 1}"
        try:
            record = _loads(line, where)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where} is not valid JSON ({err.msg}): each line must be one JSON object"
            ) from None
        examples.append(
            Example(text_at(record, source_field, where), text_at(record, target_field, where), where)
        )
    if not examples:
        raise DataError(f"{path} holds no records")
    return examples


def read_local_split(
    folder: str | Path, split: str, source_lang: str, target_lang: str, source_field: str, target_field: str
) -> list[Example]:
    """`<split>.<src>` + `<split>.<tgt>` if present, else `<split>.jsonl`."""
    folder = data_folder(folder, f"task.data.{split}_dir (or task.data.data_dir)")
    source_file, target_file = folder / f"{split}.{source_lang}", folder / f"{split}.{target_lang}"
    jsonl = folder / f"{split}.jsonl"
    if os.path.lexists(source_file) or os.path.lexists(target_file):
        return read_parallel(source_file, target_file)
    if os.path.lexists(jsonl):
        return read_jsonl(jsonl, source_field, target_field)
    present = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_file())[:12]) or "nothing"
    raise DataError(
        f"no '{split}' data in {folder}: expected {source_file.name} + {target_file.name} (line-aligned) "
        f"or {jsonl.name}; found {present}."
    )


def read_hub_split(
    path: str, name: str | None, split: str, source_field: str, target_field: str, limit: int | None
) -> list[Example]:
    """A split of a Hugging Face dataset (needs network or a populated HF cache)."""
    import datasets

    spec = f"{split}[:{limit}]" if limit else split
    try:
        dataset = datasets.load_dataset(path, name, split=spec)
    except Exception as err:  # the hub raises many types; all mean "not reachable or not there"
        raise DataError(
            f"could not load {path}{'/' + name if name else ''} split '{split}' from the Hugging Face hub ({err}). "
            "Offline? Point task.data.data_dir (or train_dir/test_dir) at local files instead."
        ) from err
    return [
        Example(
            text_at(row, source_field, f"{path}[{split}][{i}]"),
            text_at(row, target_field, f"{path}[{split}][{i}]"),
            f"{path}[{split}][{i}]",
        )
        for i, row in enumerate(dataset)
    ]


# ---- instruction records (task kind "instruction") ---------------------------------------------------------
def data_file(path: str | Path, key: str, what: str) -> Path:
    """A data file that must exist; `key` names the setting that points at it, `what` the records it holds."""
    file = Path(path).expanduser()
    if not file.is_file():
        state = "is a folder, not a file" if file.is_dir() else "does not exist"
        if file.is_dir() or not os.path.lexists(file):
            raise DataError(f"{key}={file} {state}: point {key} at a JSONL file of {what}")
        regular_file(file)  # a FIFO, a device, a symlink loop: says which
    return file


def read_records(path: Path) -> list[tuple[dict[str, Any], str]]:
    """The JSON objects of a JSONL file (one per line), or of a `.json` file holding one array of them
    (Stanford Alpaca's `alpaca_data.json`), each with where it is (`file line N`) for error messages."""
    text = read_text(path) if path.suffix == ".json" else ""
    if text.lstrip().startswith("["):
        try:
            rows = _loads(text, str(path))
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
        records = [(row, f"{path} record {i + 1}") for i, row in enumerate(rows)]
    else:
        records = []
        for i, line in enumerate(read_lines(path)):
            if not line.strip():
                continue
            where = f"{path} line {i + 1}"
            try:
                records.append((_loads(line, where), where))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{where} is not valid JSON ({err.msg}): each line must be one JSON object"
                ) from None
    for record, where in records:
        if not isinstance(record, dict):
            raise DataError(f"{where} is a JSON {type(record).__name__}, expected an object (one record)")
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def read_instruction_file(
    path: Path, instruction_field: str, input_field: str | None, output_field: str
) -> list[Example]:
    """Alpaca-style records: an instruction, an optional input (empty or null: none) and the output to learn.

    `source` is the user's message (instruction, then the input after a blank line), `target` the output;
    `meta` keeps instruction and input apart for the plain template, which places them in separate sections.
    """
    examples = []
    for record, where in read_records(path):
        instruction = text_at(record, instruction_field, where, _fix("instruction_field", "the instruction"))
        output = text_at(record, output_field, where, _fix("output_field", "the response to learn"))
        extra = ""
        if input_field:
            fix = _fix("input_field", "the input") + " (task.data.input_field=null: the records have none)"
            extra = value_at(record, input_field, where, fix)
            if extra is None:
                extra = ""
            if not isinstance(extra, str):
                raise DataError(f"{where}: field '{input_field}' is {type(extra).__name__}, expected text")
        source = f"{instruction}\n\n{extra}" if extra else instruction
        examples.append(Example(source, output, where, {"instruction": instruction, "input": extra}))
    return examples


def read_ifeval_file(path: Path, prompt_field: str) -> list[Example]:
    """IFEval rows (the format of its `input_data.jsonl`): a prompt, the ids of the instructions it contains
    and each one's arguments. They have no reference output: `target` is empty."""
    examples = []
    for number, (record, where) in enumerate(read_records(path), 1):
        prompt = text_at(record, prompt_field, where, _fix("test_prompt_field", "the prompt"))
        fix = (
            "IFEval test rows need prompt, instruction_id_list and kwargs (the format of IFEval's "
            "input_data.jsonl); for a test file of instruction/input/output records set task.data.test_prompt_field=null"
        )
        ids = value_at(record, "instruction_id_list", where, fix)
        kwargs = value_at(record, "kwargs", where, fix)
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise DataError(
                f"{where}: instruction_id_list must be a non-empty list of instruction ids, got {ids!r}"
            )
        if (
            not isinstance(kwargs, list)
            or len(kwargs) != len(ids)
            or not all(isinstance(k, dict) for k in kwargs)
        ):
            raise DataError(
                f"{where}: kwargs must be a list of {len(ids)} objects, one per instruction id, got {kwargs!r}"
            )
        meta = {
            "instruction": prompt,
            "input": "",
            "key": record.get("key", number),
            "instruction_id_list": ids,
            "kwargs": kwargs,
        }
        examples.append(Example(prompt, "", where, meta))
    return examples


def _fix(setting: str, what: str) -> str:
    return f"Set task.data.{setting} to the name of the field that holds {what}."
