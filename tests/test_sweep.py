"""`kdprune report`: grouping summary runs over seeds, the Pareto front, the files and the table."""

from __future__ import annotations

import statistics

import pytest

from kdprune import cli, runs, sweep

BASE = {"prune.criterion": "taylor", "prune.structured": True, "teacher.epochs": 20}


def _metrics(acc: float, params: float) -> dict[str, float]:
    m = {"finetuned.accuracy": acc, "finetuned.params": params, "finetuned.macs": params * 10,
         "finetuned.latency_ms_b256": params / 1000, "finetuned.params_vs_student": params / 36000,
         "finetuned.accuracy_drop_vs_student": 0.99 - acc, "student.distill_gain": 0.01}
    for ref, p in (("teacher", 200_000), ("student", 36_000)):
        m |= {f"{ref}.accuracy": 0.99, f"{ref}.params": p, f"{ref}.macs": p * 10, f"{ref}.latency_ms_b256": p / 1000}
    return m


def summary_run(params: dict, metrics: dict) -> None:
    """A summary run as evaluate leaves one: opened by the helper's own functions, its metrics, FINISHED."""
    import mlflow

    runs.open_run("evaluate", "summary", "sweep point", params, {}, None, None)
    mlflow.log_metrics(metrics)
    runs.finish("FINISHED")


@pytest.fixture
def sweep_store(mlflow_store: str) -> str:
    """Four summary runs: prune.amount 0.5 and 0.8, seeds 0 and 1 each."""
    for amount, seed, acc, params in ((0.5, 0, 0.98, 9000), (0.5, 1, 0.96, 9100), (0.8, 0, 0.90, 2000),
                                      (0.8, 1, 0.94, 2100)):
        summary_run({**BASE, "prune.amount": amount, "seed": seed}, _metrics(acc, params))
    return mlflow_store


def test_runs_are_grouped_over_seeds_with_mean_std_and_n(sweep_store):
    rows = sweep.group(sweep.summary_runs("kdprune"))
    assert [r["prune.amount"] for r in rows] == ["0.5", "0.8"]
    assert all(set(r) >= {"prune.amount", "n", "seeds"} and "prune.criterion" not in r for r in rows)
    assert [r["n"] for r in rows] == [2, 2] and rows[0]["seeds"] == "0 1"
    assert rows[0]["finetuned.accuracy.mean"] == pytest.approx(0.97)
    assert rows[1]["finetuned.accuracy.std"] == pytest.approx(statistics.stdev([0.90, 0.94]))
    assert rows[1]["finetuned.params.mean"] == pytest.approx(2050)


def test_a_seed_run_again_counts_once_by_its_latest_summary_run(sweep_store):
    """evaluate is never cached, so a setting run again with the same seed leaves a second summary run:
    n counts seeds, and the mean is over each seed's latest run."""
    summary_run({**BASE, "prune.amount": 0.5, "seed": 0}, _metrics(0.92, 9000))  # seed 0 again, later
    rows = sweep.group(sweep.summary_runs("kdprune"))
    assert [(r["n"], r["seeds"]) for r in rows] == [(2, "0 1"), (2, "0 1")]
    assert rows[0]["finetuned.accuracy.mean"] == pytest.approx((0.92 + 0.96) / 2)


def test_rows_read_in_the_order_of_the_swept_numbers(mlflow_store):
    """Sorted as text, teacher.epochs 5, 10 and 20 read 10, 20, 5."""
    for epochs in (20, 5, 10):
        summary_run({**BASE, "teacher.epochs": epochs, "seed": 0}, _metrics(0.9, 2000))
    assert [r["teacher.epochs"] for r in sweep.group(sweep.summary_runs("kdprune"))] == ["5", "10", "20"]


def test_counts_are_logged_whole_and_reported_as_counted(mlflow_store):
    """The summary run logged every metric to 6 significant digits: a ResNet-18's 11,173,962 params were
    reported as 11,174,000, a count no model has."""
    from kdprune import summary

    runs.open_run("evaluate", "summary", "counted", {**BASE, "seed": 0}, {}, None, None)
    try:
        summary.summarise({"finetuned.params": 11_173_962, "finetuned.accuracy": 0.912345678}, [], "|t|", "h")
    finally:
        runs.finish("FINISHED")
    (row,) = sweep.group(sweep.summary_runs("kdprune"))
    assert (row["finetuned.params.mean"], row["finetuned.accuracy.mean"]) == (11_173_962, 0.912346)
    assert "| 11,173,962 |" in sweep.table([row])


def test_the_champion_is_looked_up_under_the_name_evaluate_registered(mlflow_store, tmp_path, capsys):
    """evaluate.registered_model names the registered model as it is ("auto" alone stands for
    kdprune-<dataset>): a name containing "auto" is not rewritten."""
    summary_run({**BASE, "prune.amount": 0.5, "seed": 0, "evaluate.registered_model": "autokd-mnist"},
                _metrics(0.98, 9000))
    summary_run({**BASE, "prune.amount": 0.8, "seed": 0, "evaluate.registered_model": "auto", "data.name": "mnist"},
                _metrics(0.9, 2000))
    cli.main(["report", "--out", str(tmp_path / "reports")])
    out = capsys.readouterr().out
    assert "autokd-mnist: no champion yet" in out and "kdprune-mnist: no champion yet" in out
    assert "kdprune-mnistkd-mnist" not in out


def test_only_finished_summary_runs_count(sweep_store):
    import mlflow

    client = mlflow.MlflowClient(sweep_store)
    exp = client.get_experiment_by_name("kdprune")
    for kind, status in (("summary", "FAILED"), ("summary", "KILLED"), ("summary", None), ("stage", "FINISHED")):
        run = client.create_run(exp.experiment_id, tags={"pipeline.kind": kind})
        if status:
            client.set_terminated(run.info.run_id, status)
    assert len(sweep.summary_runs("kdprune")) == 4


def test_pareto_front():
    points = [(1.0, 0.90), (2.0, 0.95), (3.0, 0.94), (4.0, 0.99), (2.0, 0.93)]
    assert sweep.pareto_front(points) == [0, 1, 3]


def test_the_command_prints_one_row_per_setting_and_writes_three_files(sweep_store, tmp_path, capsys):
    import mlflow

    cli.main(["report", "--out", str(tmp_path / "reports"), "--log"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 0.")]
    assert len(rows) == 2 and all(" | 2 | " in r for r in rows)
    assert "0.9700 ± 0.0141" in rows[0]
    for name in ("sweep.md", "sweep.csv", "pareto.png"):
        assert (tmp_path / "reports" / name).stat().st_size > 0
    assert (tmp_path / "reports/pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "reports/sweep.csv").read_text().splitlines()[0].startswith("prune.amount,n,seeds,")
    logged = mlflow.MlflowClient(sweep_store).search_runs(
        [mlflow.MlflowClient(sweep_store).get_experiment_by_name("kdprune").experiment_id],
        "tags.`pipeline.kind` = 'report'")
    assert len(logged) == 1 and logged[0].info.status == "FINISHED"


def test_an_empty_experiment_is_a_clear_error(mlflow_store, capsys):
    from kdprune import store

    store.ensure_experiment()  # the store, with the pipeline's experiment and not this one
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--experiment", "nothing-here"])
    assert e.value.code == 2
    assert "has no experiment 'nothing-here'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["report"], ["doctor"]])
def test_a_store_that_is_not_there_or_cannot_be_opened_is_one_line_naming_it(command, tmp_path, monkeypatch,
                                                                              capsys):
    """A mistyped sqlite path is no new, empty store (MLflow made one, folders and all), and a store of a
    kind MLflow cannot open no traceback."""
    db = tmp_path / "no/such/mlflow.db"
    for uri, message in ((f"sqlite:///{db}", f"sqlite:///{db}: no store at {db} (a stage that tracks makes it)"),
                         ("bogus://x", "MLflow tracking store bogus://x: ")):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(SystemExit) as e:
            cli.main([*command, *(["--out", str(tmp_path / "reports")] if command == ["report"] else [])])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(f"kdprune: error: {message}"), err
    assert not (tmp_path / "no").exists() and not (tmp_path / "reports").exists()


def test_a_store_that_is_there_is_found_in_every_form_sqlalchemy_reads(tmp_path, monkeypatch):
    from kdprune import store

    (tmp_path / "my db.db").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    for uri in ("sqlite:///my%20db.db", f"sqlite:///{tmp_path}/my%20db.db?timeout=30", "sqlite+pysqlite:///my db.db",
                "sqlite://", "sqlite:///:memory:", "sqlite:///file:elsewhere.db?mode=ro&uri=true"):
        store.check_exists(uri)  # no error: there, in memory, or SQLite's own URI form
    with pytest.raises(Exception, match="no store at"):
        store.check_exists("sqlite:///my%20other.db")


def test_a_report_that_cannot_be_written_is_found_before_the_store_is_read_and_leaves_the_old_one(
        sweep_store, tmp_path, capsys, monkeypatch):
    out = tmp_path / "reports"
    cli.main(["report", "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "pareto.png"}
    summary_run({**BASE, "prune.amount": 0.3, "seed": 0}, _metrics(0.99, 20000))  # a report now would differ
    (out / "pareto.png").unlink()
    (out / "pareto.png").mkdir()
    read = []
    monkeypatch.setattr(sweep, "summary_runs", lambda *args: read.append(args) or [])
    (tmp_path / "a file").write_text("")
    for where, culprit, why in ((out, out / "pareto.png", "a folder, where the report writes a file"),
                                (tmp_path / "a file/reports", tmp_path / "a file", "not a folder")):
        with pytest.raises(SystemExit) as e:
            cli.main(["report", "--out", str(where)])
        assert e.value.code == 2 and read == []
        assert capsys.readouterr().err.splitlines()[-1] == f"kdprune: error: {culprit}: {why}"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_the_logged_report_is_a_run_of_the_experiment_it_reports_on(sweep_store, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "elsewhere")  # what the stages would log into
    cli.main(["report", "--experiment", "kdprune", "--out", str(tmp_path / "reports"), "--log"])
    client = mlflow.MlflowClient(sweep_store)
    assert client.get_experiment_by_name("elsewhere") is None
    (logged,) = client.search_runs([client.get_experiment_by_name("kdprune").experiment_id],
                                   "tags.`pipeline.kind` = 'report'")
    assert logged.data.params["experiment"] == "kdprune"


def test_a_single_run_has_n_1_and_no_spread(mlflow_store, tmp_path, capsys):
    summary_run({**BASE, "prune.amount": 0.5, "seed": 0}, _metrics(0.98, 9000))
    summary_run({**BASE, "prune.amount": 0.8, "seed": 0}, _metrics(0.9, 2000))
    cli.main(["report", "--out", str(tmp_path / "reports")])
    out = capsys.readouterr().out
    assert "±" not in out  # n = 1: a mean, not "± 0"
    rows = [line for line in out.splitlines() if line.startswith("| 0.")]
    assert [r.split(" | ")[1] for r in rows] == ["1", "1"]
    assert "| 0.5 | 1 | 0.9800 | 9,000 |" in rows[0]  # counts with separators, accuracies with 4 decimals
    assert "kdprune-digits: no champion yet" in out
