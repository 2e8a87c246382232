"""Both VTAB-1k averages in use, labelled: the mean of the three group means (NOAH's table) and the plain mean of the
19 tasks (V-PETL Bench); with tasks missing, the complete groups' means and which tasks are missing."""
import data
import plumbing


def accuracies():
    return {t: 40.0 + 3 * i for i, t in enumerate(data.VTAB_TASKS)}


def test_both_averages_when_all_19_tasks_are_there():
    acc = accuracies()
    groups = [sum(acc[t] for t in ts) / len(ts) for ts in data.VTAB_GROUPS.values()]
    line = data.vtab_averages(acc)
    assert f"mean of the 3 group means {sum(groups) / 3:.2f} (NOAH's)" in line
    assert f"mean of the 19 tasks {sum(acc.values()) / 19:.2f} (V-PETL Bench's)" in line
    assert sorted(t for ts in data.VTAB_GROUPS.values() for t in ts) == sorted(data.VTAB_TASKS)
    assert [len(ts) for ts in data.VTAB_GROUPS.values()] == [7, 4, 8]


def test_with_tasks_missing_the_complete_groups_and_the_missing_tasks():
    acc = accuracies()
    del acc["dtd"], acc["kitti"]
    line = data.vtab_averages(acc)
    mean = sum(acc[t] for t in data.VTAB_GROUPS["specialized"]) / 4
    assert f"complete groups: specialized {mean:.2f}" in line and "missing 2 of 19: dtd, kitti" in line
    assert "19 tasks" not in line


def test_the_table_prints_them_from_the_results_file(capsys):
    acc = accuracies()
    identity = dict(method="vpt", options={}, shots="all", protocol={}, backbone="b")
    done = {t: dict(status="ok", dataset=f"vtab1k:{t}", identity=identity, test_top1=a, row="vpt")
            for t, a in acc.items()}
    plumbing.vtab_lines(done, [done["cifar"]])
    assert capsys.readouterr().out.strip() == "vpt: " + data.vtab_averages(acc)
