"""The many-task benchmark's sub-tasks, against the bundled TSV files read independently here."""

from __future__ import annotations

import csv
import sys

import pytest

from tvbasis.errors import UnknownTaskError
from tvbasis.eval.subtasks import chunks, hwu_groups
from tvbasis.eval.tasks import (
    DOMAINS,
    TASK_NAMES,
    _load_full,
    canonical_name,
    data_root,
    expand_task_names,
    load_task,
    subtask_groups,
    subtask_names,
)


def raw_labels(source: str, split: str) -> list[str]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(data_root() / source / "origin_data" / f"{split}.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    return [r[1].strip() for r in rows if len(r) >= 2 and r[1].strip()]


def test_between_32_and_48_subtasks_partitioning_each_source():
    names = subtask_names()
    assert 32 <= len(names) <= 48 and len(set(names)) == len(names)
    for src in TASK_NAMES:
        groups = subtask_groups(src)
        flat = [lab for g in groups for lab in g]
        assert len(flat) == len(set(flat)), src  # disjoint
        assert set(flat) == set(_load_full(src)[0]), src  # every label in exactly one sub-task
        assert all(len(g) >= 2 for g in groups)


def test_hwu_groups_are_whole_scenarios():
    groups = subtask_groups("hwu")
    scen = [{lab.split("_")[0] for lab in g} for g in groups]
    for i, a in enumerate(scen):
        for b in scen[i + 1:]:
            assert not a & b  # a scenario never spans two sub-tasks
    assert all(len(g) >= 6 for g in groups)
    assert hwu_groups(["a_x", "a_y", "b_z"], 2) == [("a_x", "a_y", "b_z")]


def test_chunks_are_consecutive_and_balanced():
    assert chunks(list("abcdefg"), 3) == [("a", "b", "c"), ("d", "e"), ("f", "g")]


@pytest.mark.parametrize("name", ["hwu-3", "20NG-1", "banking-2"])
def test_subtask_rows_are_exactly_its_labels(name):
    src, k = name.rsplit("-", 1)
    group = subtask_groups(src)[int(k) - 1]
    t = load_task(name, max_train=None, max_dev=None, max_test=None)
    assert t.label_names == group and t.domain == DOMAINS[src]
    want = sum(1 for lab in raw_labels(src, "dev") if lab in group)
    got = len(t["dev"])
    assert want - 5 <= got <= want  # rows whose text cleans to nothing are dropped (none or few)
    assert set(t["dev"].labels) <= set(range(len(group)))


def test_names():
    assert canonical_name("HWU-2") == "hwu-2"
    assert expand_task_names(["banking", "many", "hwu-1"])[:2] == ("banking", "20NG-1")
    assert len(expand_task_names(["many"])) == len(subtask_names())
    with pytest.raises(UnknownTaskError, match="sub-tasks"):
        canonical_name("hwu-99")
    with pytest.raises(UnknownTaskError):
        canonical_name("nosuch-1")


def test_bench_config_expands_many():
    from tvbasis.bench.bench import BenchConfig
    cfg = BenchConfig(tasks=("many",), Ms=(2, 8)).resolved()
    assert cfg.tasks == subtask_names()
    a, b = cfg.pairs[0]
    assert DOMAINS[a] != DOMAINS[b]  # negation controls still come from another domain
