"""After training, on the built-in data: clean, retrain (cRT), export to torchvision, import of the
original MoPro layout, and the HTML report (rendered by a headless Chromium).

One short MoPro run on a small fixture with planted noise (30 % flipped labels, 10 % OOD images)
is shared by every test (session scope).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

from tests.conftest import DEMO, REPO, TINY, TRAINED, one_line, run_cli, trained_settings

NOISE, OOD = TRAINED.noise, TRAINED.ood
CLASSES, PER_CLASS = TRAINED.classes, TRAINED.train_per_class
DATA = TRAINED  # the session's trained run (tests/conftest.py: trained_data, trained_run), shared with test_transfer


def cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=REPO, timeout=timeout, threads=2)


def one_line_error(result, *words: str) -> str:
    """Exit 2 and one `error: ...` line on stderr (CliRunner: in its output) holding every word."""
    return one_line(result, 2, *words, prefix="error: ")


run_settings = trained_settings


@pytest.fixture(scope="session")
def data(trained_data) -> dict[str, Path]:
    return trained_data


@pytest.fixture(scope="session")
def run(trained_run) -> Path:
    return trained_run


@pytest.fixture(scope="session")
def ckpt(trained_ckpt) -> Path:
    return trained_ckpt


@pytest.fixture(scope="session")
def cleaned(ckpt) -> Path:
    result = cli("clean", ckpt, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    return ckpt.parent / "clean"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- clean --------------------------------------------------------------------------------------

def test_clean_finds_the_planted_noise_better_than_chance(cleaned: Path, data) -> None:
    """Chance baselines: flagging samples at random, at the rate clean flags them, has precision =
    the share of wrong web labels (0.4 here: 30 % flipped + 10 % OOD) and recall = the flagged share;
    marking as OOD at random has OOD precision = the planted OOD share (0.1).

    One 14-epoch run of a tiny model on 300 images is a noisy measurement: over run seeds 0-3 (same
    data) precision was 0.57-0.85, recall 0.69-0.80, flipped found 0.70-0.82, OOD found 0.27-0.63
    and OOD precision 0.19-0.26, so the margins below are what held on every seed, not one run's."""
    summary = json.loads((cleaned / "summary.json").read_text())
    records = read_jsonl(cleaned / "labels.jsonl")
    assert len(records) == summary["samples"] == CLASSES * PER_CLASS
    assert [r["index"] for r in records] == sorted(r["index"] for r in records)
    assert sum(summary["counts"].values()) == summary["samples"]
    for r in records:
        assert r["status"] in ("kept", "relabelled", "ood")
        assert (r["label"] is None) == (r["status"] == "ood")
        assert (r["status"] == "relabelled") == (r["label"] is not None and r["label"] != r["web_label"])
        assert 0 <= r["score_cls"] <= 1 and 0 <= r["score_proto"] <= 1 and "truth" in r
    pc = summary["per_class"]
    assert [a + b + c for a, b, c in zip(pc["kept"], pc["relabelled_away"], pc["ood"])] == pc["web"]
    t = summary["truth"]
    print("clean vs planted truth:", json.dumps({k: round(v, 3) for k, v in t.items()}))  # pytest -s shows it
    assert t["chance_precision"] == pytest.approx(NOISE + OOD, abs=0.01)
    assert t["precision"] >= t["chance_precision"] + 0.15, t
    assert t["recall"] >= t["chance_recall"] + 0.15, t
    assert t["recall"] >= 0.6 and t["flipped_found"] >= 0.6, t
    assert t["ood_found"] >= 0.25 and t["ood_precision"] >= 1.5 * OOD, t  # OOD marks well above chance


def test_clean_applies_the_training_rule(cleaned: Path, ckpt: Path) -> None:
    """An independent pass (eval view -> logits, prototype logits -> noise.correct_labels) agrees."""
    from mopro_fast.data import build_eval_loader
    from mopro_fast.core.losses import prototype_logits
    from mopro_fast.core.noise import correct_labels
    from mopro_fast.after.trained import load_trained

    trained = load_trained(ckpt)
    cfg = trained.cfg
    loader = build_eval_loader("torch", shards=Path(cfg.data.shards), split="train", batch_size=cfg.loader.batch_size,
                               resolution=cfg.loader.eval_resolution, resize=cfg.loader.eval_resize, workers=0,
                               rank=0, world_size=1, device="cpu", channels_last=cfg.run.channels_last)
    status = {}
    with torch.no_grad():
        for batch in loader:
            logits, z = trained.net(batch.image)
            new, kept = correct_labels(logits, prototype_logits(z, trained.prototypes, cfg.mopro.temperature),
                                       batch.label, cfg.mopro.alpha, cfg.mopro.pseudo_threshold, trained.num_classes)
            for i, y, n, k in zip(batch.index.tolist(), batch.label.tolist(), new.tolist(), kept.tolist()):
                status[i] = "ood" if not k else ("relabelled" if n != y else "kept")
    written = {r["index"]: r["status"] for r in read_jsonl(cleaned / "labels.jsonl")}
    assert written == status


def test_clean_under_torchrun_matches_one_process(cleaned: Path, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp-clean"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           "-m", "mopro_fast.cli", "clean", str(ckpt), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    one, two = read_jsonl(cleaned / "labels.jsonl"), read_jsonl(out / "labels.jsonl")
    assert [(r["index"], r["key"], r["label"], r["status"]) for r in one] == \
           [(r["index"], r["key"], r["label"], r["status"]) for r in two]
    assert max(abs(a["score_cls"] - b["score_cls"]) for a, b in zip(one, two)) < 1e-3
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_clean_bad_input_is_one_line(ckpt: Path, tmp_path: Path) -> None:
    from mopro_fast.cli import main

    runner = CliRunner()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpt.read_bytes()[:4096])
    no_shards = tmp_path / "empty"
    no_shards.mkdir()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["config"]["mopro"]["enabled"] = False
    state["model"]["prototypes.weight"] = torch.zeros_like(state["model"]["prototypes.weight"])
    ce = tmp_path / "ce.pt"
    torch.save(state, ce)
    for args, words in (([str(tmp_path / "nope.pt")], "no such checkpoint"), ([str(broken)], "unreadable"),
                        ([str(ckpt), "--data", str(no_shards)], "manifest.json"),
                        ([str(ckpt), "loader.batch_sise=3"], "did you mean loader.batch_size"),
                        ([str(ce)], "no prototypes")):
        result = runner.invoke(main, ["clean", *args])
        one_line_error(result, words)


# ---- retrain (cRT) ------------------------------------------------------------------------------

def test_crt_recipe_is_the_papers() -> None:
    from mopro_fast.config import ConfigError, load_crt_config

    c = load_crt_config(REPO / "recipes" / "crt.yaml").crt
    assert (c.epochs, c.lr, c.milestones, c.gamma, c.weight_decay, c.balance_power) == (15, 0.01, [5, 10], 0.1, 0, 0.5)
    with pytest.raises(ConfigError, match="crt.lrr: unknown key.*did you mean crt.lr"):
        load_crt_config(REPO / "recipes" / "crt.yaml", ["crt.lrr=1"])
    with pytest.raises(ConfigError, match="crt.milestones"):
        load_crt_config(REPO / "recipes" / "crt.yaml", ["crt.epochs=4"])


def test_class_balanced_sampling_and_schedule() -> None:
    from mopro_fast.config import CrtConfig
    from mopro_fast.after.crt import balanced_weights, lr_at_epoch

    labels = torch.tensor([0] * 400 + [1] * 100 + [2] * 25)  # class sizes 400, 100, 25
    w = balanced_weights(labels, 3, 0.5)
    assert torch.allclose(w[[0, 400, 500]], torch.tensor([400, 100, 25], dtype=torch.float64) ** -0.5)
    draws = torch.multinomial(w, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    share = torch.bincount(labels[draws], minlength=3).double() / 200_000
    expected = torch.tensor([400, 100, 25], dtype=torch.float64) ** 0.5  # n_c * n_c^-0.5
    assert torch.allclose(share, expected / expected.sum(), atol=0.01)
    c = CrtConfig()
    assert [lr_at_epoch(c, e) for e in (0, 4, 5, 9, 10, 14)] == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])


def test_retrain_changes_only_the_classifier(ckpt: Path, cleaned: Path, tmp_path: Path) -> None:
    out = tmp_path / "crt"
    result = cli("retrain", ckpt, "--labels", cleaned, "--out", out, "crt.epochs=3", "crt.milestones=[1,2]",
                 "crt.batch_size=32", "crt.lr=0.05", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    before = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    after = torch.load(out / "crt.pt", map_location="cpu", weights_only=False)["model"]
    assert before.keys() == after.keys()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["query.classifier.bias", "query.classifier.weight"]  # encoder, BN stats, heads bit-identical
    summary = json.loads((out / "summary.json").read_text())
    excluded = sum(r["status"] == "ood" for r in read_jsonl(cleaned / "labels.jsonl"))
    assert summary["excluded"] == excluded and summary["samples"] == CLASSES * PER_CLASS - excluded
    assert [e["lr"] for e in summary["epochs"]] == pytest.approx([0.00625, 0.000625, 0.0000625])
    assert set(summary["eval"]) == {"val", "imagenet-val"}
    again = cli("eval", out / "crt.pt")  # the new checkpoint evaluates to what retrain reported
    assert again.returncode == 0, again.stderr[-3000:]
    for split, r in json.loads(again.stdout)["eval"].items():
        assert r["top1"] == pytest.approx(summary["eval"][split]["after"]["top1"])


def test_retrain_refuses_labels_from_other_data(ckpt: Path, cleaned: Path, tmp_path: Path) -> None:
    from mopro_fast.cli import main

    runner = CliRunner()
    other = tmp_path / "other"
    shutil.copytree(cleaned, other)
    summary = json.loads((other / "summary.json").read_text())
    summary["fingerprint"] = "0" * 64
    (other / "summary.json").write_text(json.dumps(summary))
    bad_label = tmp_path / "bad-label"
    bad_label.mkdir()
    (bad_label / "labels.jsonl").write_text(json.dumps({"index": 0, "web_label": 0, "label": 99}) + "\n")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "labels.jsonl").write_text("{not json\n")
    for labels, words in ((other, "other shards"), (bad_label, "label 99"), (garbage, "labels.jsonl:1"),
                          (tmp_path / "none", "no such labels file")):
        result = runner.invoke(main, ["retrain", str(ckpt), "--labels", str(labels), "--no-progress"])
        one_line_error(result, words)
    under_torchrun = runner.invoke(main, ["retrain", str(ckpt), "--labels", str(cleaned)], env={"WORLD_SIZE": "2"})
    assert under_torchrun.exit_code == 2 and "one process" in under_torchrun.output, under_torchrun.output


# ---- export / import ----------------------------------------------------------------------------

def test_export_loads_into_torchvision_with_the_same_features(ckpt: Path, tmp_path: Path) -> None:
    from mopro_fast.after.trained import load_trained

    net = load_trained(ckpt).net
    x = torch.randn(4, 3, 64, 64)
    plain, with_fc = tmp_path / "rn18.pt", tmp_path / "rn18-fc.pt"
    for out, extra in ((plain, []), (with_fc, ["--with-classifier"])):
        result = cli("export", ckpt, out, "--to", "torchvision", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    model = torchvision.models.resnet18()
    missing, unexpected = model.load_state_dict(torch.load(plain, weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), net.features(x), atol=1e-5)
        classifier = torchvision.models.resnet18(num_classes=CLASSES)
        classifier.load_state_dict(torch.load(with_fc, weights_only=True))  # strict: nothing missing
        assert torch.allclose(classifier.eval()(x), net(x)[0], atol=1e-5)


def test_export_refuses_the_small_stem(ckpt: Path, tmp_path: Path) -> None:
    from mopro_fast.cli import main

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["config"]["model"]["small_stem"] = True
    small = tmp_path / "small.pt"
    torch.save(state, small)
    result = CliRunner().invoke(main, ["export", str(small), str(tmp_path / "out.pt")])
    one_line_error(result, "small_stem")
    assert not (tmp_path / "out.pt").exists()


def original_layout(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MoPro state dict written in salesforce/MoPro's layout, key by key (the test's own map)."""
    heads = {"classifier.": "classifier.", "projection.0.": "fc1.", "projection.2.": "fc2."}
    out = {}
    for key, value in model.items():
        if key == "queue.keys":
            out["module.queue"] = value.t().clone()  # theirs: d x L
        elif key == "queue.ptr":
            out["module.queue_ptr"] = value.reshape(1).clone()
        elif key == "prototypes.weight":
            out["module.prototypes"] = value.clone()
        else:
            branch, rest = key.split(".", 1)
            branch = {"query": "module.encoder_q.", "key": "module.encoder_k."}[branch]
            if rest.startswith("encoder."):
                out[branch + rest[len("encoder."):]] = value.clone()
            else:
                head = next(h for h in heads if rest.startswith(h))
                out[branch + heads[head] + rest[len(head):]] = value.clone()
    return out


def test_import_of_the_original_layout_gives_the_same_logits(ckpt: Path, data, run: Path, tmp_path: Path) -> None:
    from mopro_fast.core.mopro import MoPro
    from mopro_fast.after.trained import load_trained
    from mopro_fast.training.resume import init_from

    ours = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    original = tmp_path / "MoPro_epoch90.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": original_layout(ours), "optimizer": {}}, original)
    imported = tmp_path / "imported.pt"
    settings = run_settings(data, tmp_path / "ft", epochs=14)
    result = cli("import", original, imported, "--recipe", TINY, *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["arch"] == "resnet18"

    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = load_trained(ckpt), load_trained(imported)
        assert torch.equal(a.net(x)[0], b.net(x)[0]) and torch.equal(a.prototypes, b.prototypes)
    state = torch.load(imported, map_location="cpu", weights_only=False)
    assert all(torch.equal(state["model"][k], v) for k, v in ours.items())
    assert state["optimizer"] is None and state["imported_from"]["epoch"] == 90

    evaluated = cli("eval", imported)  # eval works from it, with the numbers of the run it came from
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    final = json.loads((run / "summary.json").read_text())["eval"]
    for split, r in json.loads(evaluated.stdout)["eval"].items():
        assert r["top1"] == pytest.approx(final[split]["top1"])

    # Fine-tuning starts from it (train --init): same weights, fresh classifier for another class count.
    from mopro_fast.core.model import MoProNet

    same = MoPro(MoProNet(CLASSES, "resnet18", 128, 64), CLASSES, 128, 128)
    assert "fresh" not in init_from(imported, same)
    assert all(torch.equal(same.state_dict()[k], v) for k, v in ours.items())
    other = MoPro(MoProNet(CLASSES + 1, "resnet18", 128, 64), CLASSES + 1, 128, 128)
    note = init_from(imported, other)
    assert "query.classifier.weight" in note and "prototypes.weight" in note
    assert torch.equal(other.state_dict()["query.encoder.conv1.weight"], ours["query.encoder.conv1.weight"])


def test_import_refuses_what_is_not_the_original_layout(ckpt: Path, tmp_path: Path) -> None:
    from mopro_fast.cli import main

    runner = CliRunner()
    stray = tmp_path / "stray.pth.tar"
    sd = original_layout(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
    sd["module.something_else"] = torch.zeros(1)
    torch.save({"state_dict": sd}, stray)
    plain = tmp_path / "plain.pt"
    torch.save({"epoch": 1}, plain)
    for src, words in ((stray, "'something_else'"), (plain, "no state_dict"), (ckpt, "already a mopro-fast checkpoint")):
        result = runner.invoke(main, ["import", str(src), str(tmp_path / "x.pt"), "--recipe", str(DEMO)])
        one_line_error(result, words)


# ---- report -------------------------------------------------------------------------------------

def test_report_is_one_page_that_chromium_renders(run: Path, cleaned: Path, tmp_path: Path) -> None:
    result = cli("report", run, "--gallery", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    page = Path(result.stdout.strip())
    text = page.read_text()
    assert page == run / "report" / "report.html"
    assert text.count("<img src='data:image/png;base64,") == 5  # 3 curves, noise per epoch, class counts
    assert text.count("<img src='data:image/jpeg;base64,") >= 12  # the galleries
    assert "src='http" not in text and "src=\"http" not in text and "file://" not in text  # self-contained
    for png in ("noise_epochs.png", "class_counts.png"):
        assert (run / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does): no render check")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'chrome'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    page.as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000
    from PIL import Image, ImageStat

    image = Image.open(shot).convert("L")
    assert image.size == (1200, 2000)
    assert ImageStat.Stat(image).stddev[0] > 20  # not blank: text, plots and thumbnails


def test_commands_explain_themselves() -> None:
    from mopro_fast.cli import main

    runner = CliRunner()
    for command, words in (("clean", "labels.jsonl"), ("retrain", "frozen"), ("export", "torchvision"),
                           ("import", "salesforce/MoPro"), ("report", "self-contained")):
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0 and words in result.output, (command, result.output)
