"""LaMP and OPPU loaders: fixture round trips and clear errors on bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from perfit_probe.data import load_task
from perfit_probe.data.lamp import load_lamp, load_oppu, read_outputs, write_outputs
from perfit_probe.data.tasks import LAMP_TASKS, TASKS, canonical_task_name
from perfit_probe.errors import DataError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "lamp"


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("task", LAMP_TASKS)
def test_questions_round_trip(task):
    questions = FIXTURES / f"{task}_questions.json"
    outputs = FIXTURES / f"{task}_outputs.json"
    raw = json.loads(questions.read_text())
    golds = {g["id"]: g["output"] for g in json.loads(outputs.read_text())["golds"]}
    data = load_task(task, path=questions, outputs=outputs)
    assert data.spec is TASKS[task]
    assert [u.id for u in data.users] == [r["id"] for r in raw]
    for user, record in zip(data.users, raw):
        assert len(user.queries) == 1
        query = user.queries[0]
        assert (query.id, query.input, query.output) == (record["id"], record["input"], golds[record["id"]])
        assert [item.id for item in user.profile] == [p["id"] for p in record["profile"]]
        for item, p in zip(user.profile, record["profile"]):
            assert dict(item.fields) == {k: str(v) for k, v in p.items() if k not in ("id", "date")}
            assert item.date == p.get("date")
            assert all(isinstance(v, str) for v in item.fields.values())
    assert data.report["n_queries"] == len(raw)
    assert data.report["golds_outside_labels"] == 0


def test_oppu_round_trip():
    path = FIXTURES / "OPPU-2M_user_history.json"
    raw = json.loads(path.read_text())
    golds = read_outputs(FIXTURES / "OPPU-2M_user_history_label.json")
    data = load_task("LaMP-2M", path=path, outputs=FIXTURES / "OPPU-2M_user_history_label.json")
    assert data.report["format"] == "oppu"
    assert [u.id for u in data.users] == [r["user_id"] for r in raw]
    for user, record in zip(data.users, raw):
        assert [(q.id, q.input, q.output) for q in user.queries] == \
            [(q["id"], q["input"], golds[q["id"]]) for q in record["query"]]
        assert [dict(i.fields) for i in user.profile] == \
            [{k: v for k, v in p.items() if k != "id"} for p in record["profile"]]


def test_oppu_inline_golds_and_missing_user_id(tmp_path):
    path = _write(tmp_path / "u.json", [{"profile": [{"id": "1", "text": "t", "score": 4}],
                                         "query": {"id": "q", "input": "x", "gold": 5}}])
    data = load_oppu("LaMP-3", path)
    assert data.users[0].id == "user0"
    assert data.users[0].queries[0].output == "5"


def test_outputs_round_trip(tmp_path):
    golds = {"a": "3", "b": "sci-fi"}
    write_outputs(tmp_path / "o.json", "lamp-2m", golds)
    assert read_outputs(tmp_path / "o.json") == golds
    assert json.loads((tmp_path / "o.json").read_text())["task"] == "LaMP_2M"


def test_task_names():
    assert canonical_task_name("lamp_3") == "LaMP-3"
    assert canonical_task_name("LAMP-2m") == "LaMP-2M"
    assert canonical_task_name("MovieLens") == "movielens"
    with pytest.raises(DataError, match="unknown task 'LaMP-9'"):
        load_task("LaMP-9")
    with pytest.raises(DataError, match="ambiguous"):
        load_task("LaMP-2", path=FIXTURES / "LaMP-2M_questions.json")
    with pytest.raises(DataError, match="needs path="):
        load_task("LaMP-3")


def test_label_sets():
    assert TASKS["LaMP-1"].labels == ("[1]", "[2]")
    assert len(TASKS["LaMP-2M"].labels) == len(set(TASKS["LaMP-2M"].labels)) == 15
    assert len(TASKS["LaMP-2N"].labels) == len(set(TASKS["LaMP-2N"].labels)) == 15
    assert TASKS["LaMP-3"].labels == ("1", "2", "3", "4", "5")
    assert all(TASKS[t].labels is None for t in ("LaMP-4", "LaMP-5", "LaMP-7"))


def test_malformed_json(tmp_path):
    path = tmp_path / "q.json"
    path.write_text('[{"id": "1", "input": "x",')
    with pytest.raises(DataError, match=r"q\.json: malformed JSON at line 1"):
        load_task("LaMP-3", path=path)
    with pytest.raises(DataError, match="file not found"):
        load_task("LaMP-3", path=tmp_path / "missing.json")
    with pytest.raises(DataError, match="non-empty JSON list of questions, got dict"):
        load_task("LaMP-3", path=_write(tmp_path / "d.json", {"id": 1}))
    with pytest.raises(DataError, match="got an empty list"):
        load_task("LaMP-3", path=_write(tmp_path / "e.json", []))
    with pytest.raises(DataError, match=r"record 0: expected an object, got str"):
        load_task("LaMP-3", path=_write(tmp_path / "s.json", ["oops"]))


@pytest.mark.parametrize("field", ["id", "input", "profile"])
def test_missing_question_field(tmp_path, field):
    record = {"id": "7", "input": "x", "profile": [{"id": "1", "text": "t", "score": "2"}]}
    del record[field]
    path = _write(tmp_path / "q.json", [record])
    with pytest.raises(DataError, match=rf"q\.json: record 0.*missing field '{field}'"):
        load_task("LaMP-3", path=path)


def test_missing_profile_field_names_item(tmp_path):
    path = _write(tmp_path / "q.json", [{"id": "7", "input": "x", "profile": [
        {"id": "1", "text": "t", "score": "2"}, {"id": "2", "text": "u"}]}])
    with pytest.raises(DataError, match=r"record 0 \(id '7'\): profile item 1 \(id '2'\): missing field 'score'"):
        load_task("LaMP-3", path=path)


def test_outputs_ids_must_match(tmp_path):
    questions = FIXTURES / "LaMP-3_questions.json"
    missing = _write(tmp_path / "o.json", {"task": "LaMP_3", "golds": [{"id": "400", "output": "5"}]})
    with pytest.raises(DataError, match=r"o\.json: ids do not match .*without a gold"):
        load_task("LaMP-3", path=questions, outputs=missing)
    golds = json.loads((FIXTURES / "LaMP-3_outputs.json").read_text())
    golds["golds"].append({"id": "999", "output": "2"})
    extra = _write(tmp_path / "o2.json", golds)
    with pytest.raises(DataError, match=r"not among the questions \(e\.g\. \['999'\]\)"):
        load_task("LaMP-3", path=questions, outputs=extra)
    bad = _write(tmp_path / "o3.json", {"task": "LaMP_3", "golds": [{"id": "400"}]})
    with pytest.raises(DataError, match=r"gold 0 \(id '400'\): missing field 'output'"):
        load_task("LaMP-3", path=questions, outputs=bad)


def test_empty_profile_skipped_and_reported(tmp_path, caplog):
    path = _write(tmp_path / "q.json", [
        {"id": "1", "input": "x", "profile": []},
        {"id": "2", "input": "y", "profile": [{"id": "a", "text": "t", "score": "3"}]},
    ])
    with caplog.at_level(logging.WARNING):
        data = load_lamp("LaMP-3", path)
    assert [u.id for u in data.users] == ["2"]
    assert data.report["skipped"]["empty_profile"] == 1
    assert data.report["skipped_ids"]["empty_profile"] == ["1"]
    assert "empty profile" in caplog.text


def test_duplicate_question_ids(tmp_path):
    rec = {"id": "1", "input": "x", "profile": [{"id": "a", "text": "t", "score": "3"}]}
    path = _write(tmp_path / "q.json", [rec, rec])
    with pytest.raises(DataError, match="duplicate question id"):
        load_lamp("LaMP-3", path)


def test_n_users_and_max_queries_are_deterministic():
    path = FIXTURES / "LaMP-3_questions.json"
    a = load_task("LaMP-3", path=path, n_users=2, seed=5)
    b = load_task("LaMP-3", path=path, n_users=2, seed=5)
    assert [u.id for u in a.users] == [u.id for u in b.users]
    assert len(a.users) == 2
    picks = {tuple(u.id for u in load_task("LaMP-3", path=path, n_users=1, seed=s).users) for s in range(20)}
    assert len(picks) > 1  # the seed matters
    oppu = load_task("LaMP-2M", path=FIXTURES / "OPPU-2M_user_history.json", max_queries=1)
    assert [len(u.queries) for u in oppu.users] == [1, 1]
