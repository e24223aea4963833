"""`mimscale report COMPARE_DIR`: the league report of a `mimscale compare` directory.

The members' run directories are written with test_report's ``make_run`` (the project's own config,
MetricLogger and FLOPs writers); compare.json, teachers/<step>/cost.json and members/<name>/result.json
follow the compare contract. The league: ``mae`` (done), ``emae`` (done, charged a CLIP teacher: the
league does not care which objective paid for one), ``mae_small`` (unfinished: no result.json, 250 of
400 steps) and ``conmim`` (pending: nothing written yet, but its teacher already ran).
"""

from __future__ import annotations

import json
import shutil

import pytest
from test_report import CHROMIUM, DEFAULT_KNOBS, _chromium, _console_lines, _mae_default_flops, _parse, make_run

from mimscale.cli import main
from mimscale.report import load_league, render_league
from mimscale.report.league import markdown_table
from mimscale.telemetry import MetricLogger

TEACHER_H = 0.5
MEMBERS = [
    {"name": "mae", "objective": "mae", "overrides": [], "teachers": []},
    {"name": "emae", "objective": "emae", "overrides": [], "teachers": ["clip"]},
    {"name": "mae_small", "objective": "mae", "overrides": [], "teachers": []},
    {"name": "conmim", "objective": "conmim", "overrides": [], "teachers": ["clip"]},
]


def _plan(members: list[dict]) -> dict:
    return {
        "version": 1,
        "spec": "tiny_cpu",
        "recipe": "tiny_cpu",
        "overrides": ["model.arch=vit_micro", "train.epochs=2"],
        "budget": {"kind": "minutes", "value": 10.0},
        "knn_evals": 3,
        "linear": None,
        "members": members,
        "data": {"train": "fashion-mnist:train", "knn_train": "fashion-mnist:train", "knn_test": "fashion-mnist:test"},
    }


def _result(name: str, objective: str, linear: float | None, teacher_h: float, rd) -> dict:
    return {
        "name": name,
        "objective": objective,
        "status": "done",
        "calibrated_img_per_s": 16.0,
        "epochs_planned": 2.0,
        "budget": {"kind": "minutes", "value": 10.0},
        "train_minutes": 10.0,
        "linear_top1": linear,
        "teacher_cost": {"device_hours": teacher_h, "steps": {"clip": teacher_h} if teacher_h else {}},
        "summary": json.loads((rd / "summary.json").read_text()),
    }


@pytest.fixture(scope="module")
def league(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("compare")
    (root / "compare.json").write_text(json.dumps(_plan(MEMBERS)))
    (root / "teachers" / "clip").mkdir(parents=True)
    cost = {"step": "clip", "seconds": TEACHER_H * 3600, "device_hours": TEACHER_H, "world_size": 1, "what": "x"}
    (root / "teachers" / "clip" / "cost.json").write_text(json.dumps(cost))
    run = {name: root / "members" / name / "run" for name in ("mae", "emae", "mae_small")}
    common = dict(world=1, loss=(0.5, 1.0, 0.99))
    made = {
        "mae": make_run(
            run["mae"],
            "mae",
            DEFAULT_KNOBS,
            steps=400,
            sec_per_step=4.0,
            knn={0: 10.2, 100: 31.0, 200: 44.5, 300: 51.0, 400: 55.6},
            finished=True,
            **common,
        ),
        "emae": make_run(
            run["emae"],
            "emae",
            DEFAULT_KNOBS,
            steps=400,
            sec_per_step=11.0,
            knn={0: 10.2, 100: 42.0, 200: 56.5, 300: 60.1, 400: 61.8},
            finished=True,
            mfu=0.3,
            **common,
        ),
        "mae_small": make_run(
            run["mae_small"],
            "mae",
            [],
            steps=250,
            sec_per_step=1.5,
            knn={0: 10.2, 100: 50.0, 200: 58.0},
            finished=False,
            **common,
        ),
    }
    with MetricLogger(run["emae"], tensorboard=False, wandb="disabled") as log:  # as `mimscale eval linear` does
        log.log({"eval/linear_top1": 52.4}, step=400)
    results = {
        "mae": _result("mae", "mae", 48.3, 0.0, run["mae"]),
        "emae": _result("emae", "emae", None, 0.5, run["emae"]),
    }
    for name, res in results.items():
        (root / "members" / name / "result.json").write_text(json.dumps(res))
    assert main(["report", str(root)]) == 0
    return {"root": root, "made": made, "json": json.loads((root / "report.json").read_text())}


def _members(doc: dict) -> dict[str, dict]:
    return {m["name"]: m for m in doc["league"]["members"]}


def test_target_is_the_lowest_best_of_the_finished_members(league):
    doc = league["json"]["league"]
    assert doc["target"] == pytest.approx(55.6)  # min(55.6, 61.8); the unfinished 58.0 does not count
    m = _members(league["json"])
    assert [m[n]["status"] for n in ("mae", "emae", "mae_small", "conmim")] == ["done", "done", "unfinished", "pending"]
    assert m["conmim"]["run"] is None and m["conmim"]["knn_final"] is None


def test_time_to_target_per_member(league):
    m, made = _members(league["json"]), league["made"]
    assert m["mae"]["ttt_step"] == 400 and m["mae"]["ttt_h"] == pytest.approx(dict(made["mae"]["logged"])[400])
    assert m["emae"]["ttt_step"] == 200 and m["emae"]["ttt_h"] == pytest.approx(dict(made["emae"]["logged"])[200])
    assert m["mae_small"]["ttt_step"] == 200
    assert m["mae_small"]["ttt_h"] == pytest.approx(dict(made["mae_small"]["logged"])[200])
    assert m["conmim"]["ttt_h"] is None
    assert m["emae"]["ttt_total_h"] == pytest.approx(m["emae"]["ttt_h"] + TEACHER_H)
    assert m["mae"]["ttt_total_h"] == pytest.approx(m["mae"]["ttt_h"])


def test_finals_costs_and_throughput(league):
    m, made = _members(league["json"]), league["made"]
    assert m["mae"]["knn_final"] == 55.6 and m["emae"]["knn_final"] == 61.8 and m["mae_small"]["knn_final"] == 58.0
    assert m["emae"]["knn_best"] == 61.8
    assert m["mae"]["linear_top1"] == 48.3  # result.json
    assert m["emae"]["linear_top1"] == 52.4  # no value in result.json: the run's eval/linear_top1
    for name in ("mae", "emae", "mae_small"):
        assert m[name]["train_h"] == pytest.approx(made[name]["logged"][-1][1])
        assert m[name]["mem_peak_gb"] == pytest.approx(made[name]["peak"])
    assert m["emae"]["teacher_h"] == TEACHER_H and m["mae"]["teacher_h"] == 0.0
    assert m["conmim"]["teacher_h"] == TEACHER_H  # pending: from teachers/clip/cost.json
    assert m["emae"]["total_h"] == pytest.approx(m["emae"]["train_h"] + TEACHER_H)
    assert m["mae"]["total_h"] == pytest.approx(m["mae"]["train_h"]) and m["conmim"]["total_h"] is None
    assert m["mae"]["mfu"] is None and m["emae"]["mfu"] == pytest.approx(0.3)
    assert m["mae"]["img_per_s"] == pytest.approx(64 / 4.0 * 0.97)


def test_flops_relative_to_the_mae_member(league):
    doc, m, made = league["json"]["league"], _members(league["json"]), league["made"]
    assert "'mae'" in doc["flops_reference"]
    assert m["mae"]["flops_ratio"] == pytest.approx(1.0)
    assert m["emae"]["flops_ratio"] == pytest.approx(made["emae"]["flops"] / made["mae"]["flops"])
    assert m["mae_small"]["flops_ratio"] == pytest.approx(made["mae_small"]["flops"] / made["mae"]["flops"])
    assert m["conmim"]["flops_ratio"] is None


def test_without_an_mae_member_flops_are_relative_to_mae_default_knobs(league, tmp_path):
    root = tmp_path / "compare"
    shutil.copytree(league["root"], root)
    (root / "compare.json").write_text(json.dumps(_plan(MEMBERS[1:2])))
    lg = load_league(root)
    assert "default knobs" in lg.flops_reference and [m.name for m in lg.members] == ["emae"]
    assert lg.members[0].flops_ratio == pytest.approx(league["made"]["emae"]["flops"] / _mae_default_flops())
    assert lg.target == pytest.approx(61.8)  # the only finished member's best
    assert load_league(root, target=40.0).members[0].ttt_step == 100  # --target replaces the league's own


def test_rankings_with_and_without_teacher_cost(league):
    doc = league["json"]["league"]
    assert doc["rank_knn"] == ["emae", "mae", "mae_small", "conmim"]  # unfinished members last, unranked
    assert doc["rank_with_teacher"] == ["mae", "emae", "mae_small", "conmim"]  # emae's 0.5 h CLIP turns it


def test_html_tables_are_ranked_without_js(league):
    text = (league["root"] / "report.html").read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    page = _parse(text)
    assert [r["data-run"] for r in page.tables["league"]] == ["1", "0", "2", "3"]
    assert [r["data-run"] for r in page.tables["league-teacher"]] == ["0", "1", "2", "3"]
    for needle in ("budget 10 training minutes per member", "vit_micro/4 @32px", "fashion-mnist:test", "55.60%"):
        assert needle in text
    assert "pending" in text and "unfinished" in text
    finals = text[text.index('<svg id="plot-finals"') : text.index("</svg>", text.index('<svg id="plot-finals"'))]
    assert finals.count('class="dot"') == 5  # kNN of three members, linear of two


def test_unreadable_compare_json_is_one_error_line(tmp_path, capsys):
    for content, match in (("{oops", "unreadable"), ("[]", "not a `mimscale compare` plan")):
        (tmp_path / "compare.json").write_text(content)
        assert main(["report", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mimscale: error:") and "compare.json" in err[0] and match in err[0]


def test_a_compare_dir_is_reported_alone(league, tmp_path, capsys):
    assert main(["report", str(league["root"]), str(league["root"] / "members" / "mae" / "run")]) == 2
    assert "on its own" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"needs Debian's chromium at {CHROMIUM} (CI installs it)")
def test_league_in_headless_chromium(league, tmp_path):
    p = _chromium((league["root"] / "report.html").as_uri(), tmp_path / "profile", "--dump-dom")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _console_lines(p.stderr) == [], "JS errors / console output in the report"
    dom = _parse(p.stdout)
    assert dom.attrs["html"][0].get("data-report-ready") == "1", "the report's script did not run to its end"
    assert len(dom.tables["league"]) == len(dom.tables["league-teacher"]) == len(MEMBERS)
    assert [c["data-run"] for c in dom.charts["plot-league"]["curves"]] == ["0", "1", "2"]
    small = [dom.charts[f"plot-member-{i}"] for i in range(len(MEMBERS))]
    assert [len(c["curves"]) for c in small] == [1, 1, 1, 0]
    labels = [c["tick_labels"] for c in small]
    assert len(labels[0]) >= 6 and all(lab == labels[0] for lab in labels), labels  # shared axes
    # readable at a normal window width (1280 px): each small multiple is drawn at least at its own size, so
    # its 11.5 px tick labels stay >= 11 px on screen (the chart scales with its width: viewBox 480 wide)
    sizes = {a["id"]: a.get("data-rendered") for a in dom.attrs["svg"] if a.get("id", "").startswith("plot-member-")}
    assert len(sizes) == len(MEMBERS) and all(sizes.values()), sizes
    widths = [int(v.split("x")[0]) for v in sizes.values()]
    assert min(widths) >= 0.96 * 480 and max(widths) <= 1280, sizes


def test_markdown_table_ranks_finished_members_in_minutes(league):
    lines = (league["root"] / "league.md").read_text().splitlines()
    rows = [line.split(" | ") for line in lines[2:6]]
    assert [(r[0].strip("| "), r[1]) for r in rows] == [
        ("1", "emae"),
        ("2", "mae"),
        ("unfinished", "mae_small"),
        ("pending", "conmim"),
    ]
    assert rows[0][2] == "61.80 %" and rows[0][3] == "52.40 %" and rows[1][3] == "48.30 %"  # every number: a unit
    assert rows[0][5] == f"{TEACHER_H * 60:.1f} min"  # the teacher column, in device-minutes
    assert rows[0][8] == "10.00 min (+0.0 %) |" and "(budget 10 min)" in lines[0]  # achieved minutes, deviation
    assert lines[-2].startswith("Target (to target): kNN top-1 55.60%") and lines[-1].startswith("Budget held")


# ------------------------------------------------------------------------------- seeds and the target rule

SEED_KNN = {  # final kNN per seed: a and b overlap (within the noise), c is clearly above both
    "a": [60.0, 61.0, 62.0],
    "b": [60.5, 61.5, 62.5],
    "c": [70.0, 70.2, 70.4],
}


def _seeded_league(root, knn_init: float = 10.0, seeds: int = 3, done: int | None = None, knn=None) -> None:
    """A compare directory with ``seeds`` seeds per member (seed k >= 1 in members/<name>/seed<k>/); the
    last member has only ``done`` seeds complete when given."""
    from mimscale.report.league import seed_dir

    knn = knn or SEED_KNN
    members = [{"name": n, "objective": "mae", "overrides": [], "teachers": []} for n in knn]
    (root / "compare.json").write_text(json.dumps({**_plan(members), "seeds": seeds}))
    for name, finals in knn.items():
        for k, final in enumerate(finals[:seeds]):
            sd = seed_dir(root, name, k)
            finished = done is None or name != "c" or k < done
            steps = 60 if finished else 30
            knn = {0: knn_init, 30: final - 5.0 - k, 60: final} if finished else {0: knn_init, 30: final - 5.0}
            make_run(
                sd / "run",
                "mae",
                [],
                world=1,
                steps=steps,
                sec_per_step=1.0 + k,
                knn=knn,
                finished=finished,
                loss=(0.5, 1.0, 0.99),
            )
            if finished:
                res = _result(name, "mae", 40.0 + k, 0.0, sd / "run")
                (sd / "result.json").write_text(json.dumps({**res, "train_minutes": 9.9 + 0.1 * k}))


def test_seeds_mean_std_each_value_and_ranking_by_the_mean(tmp_path):
    _seeded_league(tmp_path)
    lg = load_league(tmp_path)
    m = {x.name: x for x in lg.members}
    assert lg.seeds == 3 and all(x.finished and x.seeds_done == 3 for x in lg.members)
    assert m["a"].knn_final_seeds == [60.0, 61.0, 62.0]
    assert m["a"].knn_final == pytest.approx(61.0) and m["a"].knn_final_std == pytest.approx(1.0)
    assert m["c"].knn_final == pytest.approx(70.2) and m["c"].knn_final_std == pytest.approx(0.2)
    assert m["a"].linear_top1 == pytest.approx(41.0) and m["a"].linear_std == pytest.approx(1.0)
    assert m["a"].train_minutes == pytest.approx(10.0) and m["a"].train_minutes_std == pytest.approx(0.1)
    assert lg.rank_knn == ["c", "b", "a"]  # by the mean
    assert m["a"].noise_peers == ["b"] and m["b"].noise_peers == ["a"] and m["c"].noise_peers == []
    # the target: the lowest best of any finished seed (a's seed 0: 60.0); each seed reaches it, the mean is shown
    assert lg.target == pytest.approx(60.0)
    hours = [s.ttt_h for s in m["c"].seed_runs]
    assert all(h is not None for h in hours) and m["c"].ttt_h == pytest.approx(sum(hours) / 3)  # type: ignore[arg-type]
    md = markdown_table(lg)
    assert "| 1 | c | 70.20 ± 0.20 % (70.00, 70.20, 70.40) | 41.00 ± 1.00 % |" in md
    assert "| 2 | b | 61.50 ± 1.00 % (60.50, 61.50, 62.50) |" in md and "| 3 | a | 61.00 ± 1.00 %" in md
    assert "| 10.00 ± 0.10 min (" in md and " %) | b |" in md and "Welch" in md  # the worst seed's deviation
    assert abs(m["a"].budget_dev) == pytest.approx(0.01) and lg.budget_dev == pytest.approx(0.01)  # 9.9 / 10.1 min
    assert "Budget held: every finished run within 1.0 % of its budget (training minutes)." in md
    html = render_league(lg)
    assert "70.20 ± 0.20 %" in html and "seeds&nbsp;70.00,&nbsp;70.20,&nbsp;70.40" in html and "Welch" in html


def test_a_flop_budget_is_checked_in_mae_equivalent_epochs(tmp_path):
    """With a ``mae_epochs`` budget, what a run used is the MAE-equivalent epochs it trained (epochs x its FLOPs
    per image / MAE's), not its minutes: a run that trained 3 % more than the budget shows +3.0 %."""
    _seeded_league(tmp_path)
    trained = load_league(tmp_path).members[0].seed_runs[0].run.mae_equiv_epochs  # type: ignore[union-attr]
    assert trained and trained > 0
    plan = json.loads((tmp_path / "compare.json").read_text())
    plan["budget"] = {"kind": "mae_epochs", "value": trained / 1.03}
    (tmp_path / "compare.json").write_text(json.dumps(plan))
    lg = load_league(tmp_path)
    a = next(x for x in lg.members if x.name == "a")
    assert a.budget_used == pytest.approx(trained) and a.budget_dev == pytest.approx(0.03)
    md = markdown_table(lg)
    assert f"| {trained:.4g} MAE-eq. epochs (+3.0 %); 10.00 ± 0.10 min |" in md
    assert "within 3.0 % of its budget (MAE-eq. epochs trained)" in md
    assert "used " in render_league(lg) and "+3.0&nbsp;%" in render_league(lg)


def test_two_leagues_side_by_side_rank_agreement_and_swaps_with_their_noise(tmp_path):
    """The README's two data sets: one table, each league's rank, Kendall's tau, and the pairs ordered
    differently with whether each swap is inside the noise."""
    from mimscale.report.league import side_by_side
    from mimscale.report.stats import kendall_tau

    assert (
        kendall_tau(["a", "b", "c"], ["a", "b", "c"]) == 1.0 and kendall_tau(["a", "b", "c"], ["c", "b", "a"]) == -1.0
    )
    assert kendall_tau(["a", "b", "c"], ["b", "a", "c"]) == pytest.approx(1 / 3) and kendall_tau(["a"], ["a"]) is None
    (tmp_path / "f").mkdir()
    (tmp_path / "m").mkdir()
    _seeded_league(tmp_path / "f")  # c > b > a (a, b within the noise)
    _seeded_league(tmp_path / "m", knn={"a": [80.0, 80.5, 81.0], "b": [60.5, 61.5, 62.5], "c": [70.0, 70.2, 70.4]})
    f, m = load_league(tmp_path / "f"), load_league(tmp_path / "m")
    md = side_by_side([("Fashion-MNIST", f), ("MNIST", m)])
    lines = md.splitlines()
    assert lines[0] == (
        "| objective | Fashion-MNIST kNN top-1 | rank | MNIST kNN top-1 | rank | Fashion-MNIST linear top-1 "
        "| MNIST linear top-1 |"
    )
    assert lines[2] == "| c | 70.20 ± 0.20 % | 1 | 70.20 ± 0.20 % | 2 | 41.00 ± 1.00 % | 41.00 ± 1.00 % |"
    assert lines[4].startswith("| a | 61.00 ± 1.00 % | 3 | 80.50 ± 0.50 % | 1 |")
    note = lines[-1]
    assert note.startswith("kNN rankings, Fashion-MNIST vs MNIST: Kendall's tau -0.33, pairs ordered differently: ")
    assert "c / a (outside the noise on both)" in note and "b / a (within the noise on Fashion-MNIST)" in note
    assert side_by_side([("F", f), ("F again", f)]).splitlines()[-1].endswith("Kendall's tau +1.00, the same order.")


def test_unfinished_seed_keeps_the_member_unranked(tmp_path):
    _seeded_league(tmp_path, done=2)
    lg = load_league(tmp_path)
    c = next(x for x in lg.members if x.name == "c")
    assert c.status == "unfinished" and c.seeds_done == 2 and lg.rank_knn[-1] == "c" and c.noise_peers == []
    assert "unfinished (2/3 seeds)" in markdown_table(lg)
    live = render_league(lg, refresh=5)  # `mimscale report --watch 5 DIR` while a member trains
    assert '<meta http-equiv="refresh" content="5">' in live and "(live: 8 of 9 runs done)</title>" in live
    (tmp_path / "all").mkdir()
    _seeded_league(tmp_path / "all")
    assert "http-equiv" not in render_league(load_league(tmp_path / "all"), refresh=5)  # all done: static


def test_no_common_target_at_or_below_random_init(tmp_path):
    """The issue's case: the lowest best kNN of the finished members equals the random-init kNN."""
    _seeded_league(tmp_path, knn_init=60.0, seeds=1)
    lg = load_league(tmp_path)
    assert lg.target is None and lg.init_best == 60.0 and lg.rank_with_teacher == []
    assert lg.target_source.startswith("no common target") and "60.00%" in lg.target_source
    assert all(x.ttt_h is None for x in lg.members)
    assert "Target: none. No common target" in markdown_table(lg)
    html = render_league(lg)
    assert 'id="no-common-target"' in html and 'id="league-teacher"' not in html
    assert load_league(tmp_path, target=61.0).target == 61.0  # --target still sets one
