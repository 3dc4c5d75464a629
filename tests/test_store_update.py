"""add-task: folding a new fine-tune into a store without the old checkpoints."""

from __future__ import annotations

import pytest

from tests.tinymodels import dense_vector, flat, make_family
from tvbasis.store import add_task, build_store


@pytest.mark.parametrize("method", ["cluster", "pca"])
def test_add_task(tmp_path, method):
    pre_p, fts, pre, sds = make_family(tmp_path, T=7, clusters=3)
    first = {k: fts[k] for k in list(fts)[:6]}
    store = build_store(pre_p, first, method, 3, tmp_path / "s")
    new = add_task(store, "task6", fts["task6"], pre_p)
    assert new.T == 7 and new.task_names[-1] == "task6"
    ref = flat(dense_vector(pre, sds[6]))
    measured = float((flat(new.reconstruct("task6").to_state_dict()) - ref).norm() / ref.norm())
    assert abs(measured - new.rel_errors["task6"]) < 1e-4
    if method == "cluster":
        assert new.manifest.tasks[-1].cluster == new.labels[0]  # task6 is planted with task0 (6 % 3 == 0)
        assert measured < 0.2
