"""Loaders for LaMP benchmark files, in the official and in the OPPU per-user format.

They read files that already exist locally; nothing is ever downloaded.

- Official LaMP: a questions file, a JSON list of ``{"id", "input", "profile": [{"id",
  ...fields, "date"?}]}``, and optionally an outputs file ``{"task": "LaMP_k", "golds":
  [{"id", "output"}]}``. Each question is its own user (the question id is the user id) with
  one query, as LaMP builds one profile per question.
- OPPU: a JSON list of users ``{"user_id"?, "profile": [...], "query": [{"id", "input",
  "gold"?}]}`` (``user_top_100_history.json``) with golds inline or in an outputs file of the
  LaMP shape (``user_top_100_history_label.json``). Users without ``user_id`` are named
  ``user{position}``.

Profile items must carry ``id`` and the task's profile fields (``tasks.TASKS``); numbers
become strings, ``null`` an empty string, extra keys are kept. Every field value must be a
JSON string, number or ``null``: a list, object or boolean would end up in prompts as a
Python repr, so it is refused. Bad input raises ``DataError`` naming the file, the record and
the field, never another exception. A user with an empty profile is skipped with a warning
and counted in ``TaskData.report["skipped"]["empty_profile"]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from perfit_probe._io import atomic_write_text
from perfit_probe.data.records import ProfileItem, Query, TaskData, User
from perfit_probe.data.splits import stable_rank
from perfit_probe.data.tasks import canonical_task_name, task_spec
from perfit_probe.errors import DataError

log = logging.getLogger(__name__)


def read_json(path: Path) -> object:
    """Parse a JSON file; ``DataError`` naming the file and position when it is malformed."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; pass the JSON file itself")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of over 4300 digits, absurd nesting
        raise DataError(f"{path}: unreadable JSON ({type(exc).__name__}: {str(exc)[:120]})") from None


def _text(value: object, where: str, name: str) -> str:
    """A field value as text: strings as they are, numbers as JSON writes them, ``null`` as "";
    ``DataError`` naming ``where`` and the field for a list, an object or a boolean."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = {list: "a list", dict: "an object", bool: "a boolean"}.get(type(value), type(value).__name__)
    raise DataError(f"{where}: field {name!r} must be a string or a number, got {kind}")


def _where(path: Path, index: int, record: object) -> str:
    rid = record.get("id", record.get("user_id")) if isinstance(record, dict) else None
    return f"{path}: record {index}" + (f" (id {rid!r})" if rid is not None else "")


def _field(record: dict, name: str, where: str) -> object:
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}")
    return record[name]


def _object(value: object, where: str) -> dict:
    """``value`` itself when it is a JSON object; otherwise a ``DataError`` naming ``where``."""
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _records(data: object, path: Path, what: str) -> list:
    """The top-level non-empty JSON list of ``what`` (questions, users) of ``path``."""
    if not isinstance(data, list) or not data:
        got = "an empty list" if isinstance(data, list) else type(data).__name__
        raise DataError(f"{path}: expected a non-empty JSON list of {what}, got {got}")
    return data


def _check_unique(ids: list[str], path: Path, what: str) -> None:
    """``DataError`` listing up to three ids that occur more than once."""
    if len(set(ids)) != len(ids):
        dup = sorted({q for q in ids if ids.count(q) > 1})[:3]
        raise DataError(f"{path}: duplicate {what} id(s) {dup}")


def parse_profile(items: object, fields: tuple[str, ...], where: str) -> list[ProfileItem]:
    """Profile items of one record; ``where`` names the record in error messages."""
    if not isinstance(items, list):
        raise DataError(f"{where}: field 'profile' must be a list, got {type(items).__name__}")
    profile = []
    for j, item in enumerate(items):
        item_where = f"{where}: profile item {j}"
        _object(item, item_where)
        item_id = _text(_field(item, "id", item_where), item_where, "id")
        item_where = f"{item_where} (id {item_id!r})"
        for name in fields:
            _field(item, name, item_where)
        values = {k: _text(v, item_where, k) for k, v in item.items() if k not in ("id", "date")}
        date = item.get("date")
        profile.append(ProfileItem(id=item_id, fields=values,
                                   date=None if date is None else _text(date, item_where, "date")))
    return profile


def read_outputs(path: Path) -> dict[str, str]:
    """Gold outputs by query id from a LaMP outputs file ``{"task", "golds": [{"id", "output"}]}``."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise DataError(f"{path}: expected an object with a 'golds' list "
                        '({"task": ..., "golds": [{"id": ..., "output": ...}]})')
    golds: dict[str, str] = {}
    for i, gold in enumerate(data["golds"]):
        where = f"{path}: gold {i}"
        _object(gold, where)
        gid = _text(_field(gold, "id", where), where, "id")
        if gid in golds:
            raise DataError(f"{where}: duplicate id {gid!r}")
        golds[gid] = _text(_field(gold, "output", f"{where} (id {gid!r})"), f"{where} (id {gid!r})", "output")
    return golds


def write_outputs(path: Path, task: str, outputs: Mapping[str, str]) -> None:
    """Write predictions or golds in the LaMP outputs shape (task written as ``LaMP_k``)."""
    golds = [{"id": qid, "output": out} for qid, out in outputs.items()]
    name = canonical_task_name(task).replace("-", "_")
    atomic_write_text(Path(path), json.dumps({"task": name, "golds": golds}, indent=1) + "\n")


def _check_golds(golds: dict[str, str], query_ids: list[str], outputs: Path, questions: Path) -> None:
    ids = set(query_ids)
    missing = [q for q in query_ids if q not in golds]
    extra = [g for g in golds if g not in ids]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} question id(s) without a gold (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} gold id(s) not among the questions (e.g. {extra[:3]})")
        raise DataError(f"{outputs}: ids do not match {questions}: {'; '.join(parts)}; "
                        "pass the outputs file of the same split")


def _select(users: list[User], n_users: int | None, seed: int) -> list[User]:
    if n_users is None or n_users >= len(users):
        return users
    keep = {u.id for u in sorted(users, key=lambda u: stable_rank(u.id, seed))[:n_users]}
    return [u for u in users if u.id in keep]


def _finish(task: str, users: list[User], empty: list[str], path: Path, fmt: str,
            n_users: int | None, seed: int) -> TaskData:
    spec = task_spec(task)
    if empty:
        log.warning("%s: skipped %d user(s) with an empty profile (e.g. %s)", path, len(empty), empty[:3])
    chosen = _select(users, n_users, seed)
    outside = 0
    if spec.labels is not None:
        outside = sum(q.output is not None and q.output not in spec.labels for u in chosen for q in u.queries)
        if outside:
            log.warning("%s: %d gold output(s) outside the %s label set", path, outside, spec.name)
    report = {
        "source": str(path), "format": fmt, "n_users": len(chosen),
        "n_queries": sum(len(u.queries) for u in chosen),
        "n_profile_items": sum(len(u.profile) for u in chosen),
        "n_users_in_file": len(users) + len(empty),
        "skipped": {"empty_profile": len(empty)}, "skipped_ids": {"empty_profile": empty[:20]},
        "golds_outside_labels": outside,
    }
    return TaskData(spec=spec, users=chosen, report=report)


def _questions(task: str, data: object, questions: Path, outputs: Path | None,
               n_users: int | None, seed: int) -> TaskData:
    spec = task_spec(task)
    data = _records(data, questions, "questions")
    golds = read_outputs(outputs) if outputs is not None else None
    users, empty, ids = [], [], []
    for i, record in enumerate(data):
        where = _where(questions, i, record)
        _object(record, where)
        qid = _text(_field(record, "id", where), where, "id")
        text = _text(_field(record, "input", where), where, "input")
        profile = parse_profile(_field(record, "profile", where), spec.profile_fields, where)
        ids.append(qid)
        output = (golds.get(qid) if golds is not None else
                  _text(record["output"], where, "output") if "output" in record else None)
        if not profile:
            empty.append(qid)
            continue
        users.append(User(id=qid, profile=profile, queries=[Query(id=qid, input=text, output=output)]))
    _check_unique(ids, questions, "question")
    if golds is not None:
        _check_golds(golds, ids, outputs, questions)
    return _finish(task, users, empty, questions, "lamp", n_users, seed)


def load_oppu(task: str, path: Path, outputs: Path | None = None, *,
              n_users: int | None = None, seed: int = 0) -> TaskData:
    """Load an OPPU per-user file (``{profile, query}`` per user) and optionally its golds."""
    path = Path(path)
    data = read_json(path)
    return _oppu(task, data, path, outputs, n_users, seed)


def _oppu(task: str, data: object, path: Path, outputs: Path | None,
          n_users: int | None, seed: int) -> TaskData:
    spec = task_spec(task)
    data = _records(data, path, "users")
    golds = read_outputs(outputs) if outputs is not None else None
    users, empty, query_ids, user_ids = [], [], [], set()
    for i, record in enumerate(data):
        where = _where(path, i, record)
        _object(record, where)
        uid = _text(record.get("user_id", f"user{i}"), where, "user_id")
        if uid in user_ids:
            raise DataError(f"{where}: duplicate user_id {uid!r}")
        user_ids.add(uid)
        profile = parse_profile(_field(record, "profile", where), spec.profile_fields, where)
        raw_queries = _field(record, "query", where)
        if isinstance(raw_queries, dict):
            raw_queries = [raw_queries]
        if not isinstance(raw_queries, list):
            raise DataError(f"{where}: field 'query' must be a list, got {type(raw_queries).__name__}")
        queries = []
        for j, raw in enumerate(raw_queries):
            q_where = f"{where}: query {j}"
            _object(raw, q_where)
            qid = _text(_field(raw, "id", q_where), q_where, "id")
            q_where = f"{q_where} (id {qid!r})"
            text = _text(_field(raw, "input", q_where), q_where, "input")
            inline = raw.get("gold", raw.get("output"))
            output = (golds.get(qid) if golds is not None else
                      None if inline is None else _text(inline, q_where, "gold" if "gold" in raw else "output"))
            query_ids.append(qid)
            queries.append(Query(id=qid, input=text, output=output))
        if not profile:
            empty.append(uid)
            continue
        if not queries:
            log.warning("%s: user %s has no queries", where, uid)
        users.append(User(id=uid, profile=profile, queries=queries))
    _check_unique(query_ids, path, "query")
    if golds is not None:
        _check_golds(golds, query_ids, outputs, path)
    return _finish(task, users, empty, path, "oppu", n_users, seed)


def load_lamp(task: str, path: Path, outputs: Path | None = None, *,
              n_users: int | None = None, seed: int = 0) -> TaskData:
    """Load a LaMP task from ``path``, detecting the format (records with ``query``: OPPU;
    otherwise the official questions format)."""
    path = Path(path)
    data = read_json(path)
    first = data[0] if isinstance(data, list) and data else None
    if isinstance(first, dict) and "query" in first:
        return _oppu(task, data, path, outputs, n_users, seed)
    return _questions(task, data, path, outputs, n_users, seed)
