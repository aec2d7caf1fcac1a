"""The command line: every role's --help, settings precedence (dataclass
default < TOML section < flag), and clear exits on bad config files and bad
values instead of tracebacks."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import iota
from iota.miner.service import MinerConfig
from iota.model.recipe import Recipe
from iota.node import config as settings
from iota.node.__main__ import main
from iota.orchestrator.config import OrchestratorConfig
from iota.validator import ValidatorConfig

BITTENSOR_FLAGS = ["--network", "--netuid", "--wallet-name", "--wallet-hotkey", "--wallet-path",
                   "--orchestrator-hotkeys"]
SOURCE = str(Path(iota.__file__).resolve().parent.parent)

HELP_FLAGS = {
    "": ["local", "orchestrator", "miner", "validator", "--config FILE.toml"],
    "local": ["--config", "--miners-per-stage", "--steps", "--dir", "--report", "--no-live", "--adversary",
              "--dim", "--n-layers", "--stages", "--compression", "--batch", "--seq-len", "--accumulate",
              "--merge-every", "--outer-lr", "--threads"],
    "orchestrator": ["--config", "--key", "--chain", *BITTENSOR_FLAGS, "--dir", "--host", "--port", "--dim",
                     "--stages", "--compression", "--samples", "--heartbeat", "--missed-heartbeats", "--lease-floor",
                     "--merge-floor", "--rebalance-gain", "--flag-memory"],
    "miner": ["--config", "--key", "--chain", *BITTENSOR_FLAGS, "--orchestrator", "--orchestrator-hotkey", "--host",
              "--port", "--merge-port", "--window", "--queue", "--timeout", "--ban-base", "--ban-max", "--merge-codec",
              "--flops", "--adversary"],
    "validator": ["--config", "--key", "--chain", *BITTENSOR_FLAGS, "--orchestrator", "--orchestrator-hotkey",
                  "--batches", "--timeout", "--audit-rate", "--score-every", "--score-window"],
}


def cli(*argv: str, cwd: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SOURCE, "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    return subprocess.Popen([sys.executable, "-m", "iota.node", *argv], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """The CLI runs of this module, started together (each one is mostly interpreter start-up)."""
    tmp = tmp_path_factory.mktemp("cli")
    started = {role: cli(*([role] if role else []), "--help") for role in HELP_FLAGS}
    started["bad-value"] = cli("orchestrator", "--key", "alice", "--chain", str(tmp / "chain.json"),
                               "--dir", str(tmp / "run"), "--n-layers", "2", "--stages", "3", cwd=tmp)
    results = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=120)
        results[name] = (process.returncode, out, err)
    return results


@pytest.mark.parametrize("role", list(HELP_FLAGS), ids=lambda r: r or "top")
def test_help_of_each_role(runs, role):
    code, out, err = runs[role]
    assert code == 0, err
    assert out.startswith(f"usage: python -m iota.node{' ' + role if role else ''}")
    for flag in HELP_FLAGS[role]:
        assert flag in out, (role, flag)
    if role == "local":
        assert "--samples" not in out  # `--steps` sets it
    shown = {"local": ("--compression COMPRESSION", Recipe().compression),  # dataclass defaults are shown
             "orchestrator": ("--heartbeat HEARTBEAT", OrchestratorConfig().heartbeat),
             "miner": ("--merge-codec MERGE_CODEC", MinerConfig().merge_codec),
             "validator": ("--audit-rate AUDIT_RATE", ValidatorConfig().audit_rate)}
    if role:
        flag, default = shown[role]
        after = out.split(flag, 2)[2]  # the option's description, past its usage line
        assert " ".join(after.split()).startswith(f"(default {default})"), after[:80]


def test_a_bad_value_exits_with_the_message_and_no_traceback(runs):
    code, out, err = runs["bad-value"]
    assert code == 1
    assert "bad Recipe settings: recipe.stages must be between 1 and n_layers (2), got 3" in err
    assert "Traceback" not in err


# -- precedence ------------------------------------------------------------------------------


def parser_for(*classes: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    for cls in classes:
        settings.add_fields(parser, cls)
    return parser


def test_default_then_toml_then_flag():
    parser = parser_for(Recipe)
    assert settings.build(Recipe, {}, parser.parse_args([])) == Recipe()

    section = {"dim": 64, "n_layers": 6, "compression": "32x", "lr": 0.01}
    from_file = settings.build(Recipe, section, parser.parse_args([]))
    assert (from_file.dim, from_file.n_layers, from_file.compression, from_file.lr) == (64, 6, "32x", 0.01)
    assert from_file.batch == Recipe().batch  # untouched fields keep their defaults

    args = parser.parse_args(["--dim", "96", "--lr", "1e-3", "--seq-len", "32", "--compression", "none"])
    both = settings.build(Recipe, section, args)
    assert (both.dim, both.lr, both.seq_len, both.compression) == (96, 1e-3, 32, "none")  # flags win
    assert both.n_layers == 6  # the file still counts where no flag was given
    assert isinstance(both.lr, float) and isinstance(both.dim, int)

    fixed = settings.build(Recipe, section, args, samples=7)
    assert fixed.samples == 7 and fixed.dim == 96


@pytest.mark.parametrize("cls,field,file_value,flag,flag_value", [
    (MinerConfig, "ban_max", 60.0, "--ban-max", 90.0),
    (MinerConfig, "merge_codec", "int4/b64", "--merge-codec", "int2/b32"),
    (OrchestratorConfig, "heartbeat", 2.0, "--heartbeat", 0.25),
    (ValidatorConfig, "score_window", 50, "--score-window", 10),
])
def test_precedence_for_each_role_config(cls, field, file_value, flag, flag_value):
    parser = parser_for(cls)
    default = getattr(cls(), field)
    assert getattr(settings.build(cls, {}, parser.parse_args([])), field) == default
    assert getattr(settings.build(cls, {field: file_value}, parser.parse_args([])), field) == file_value
    args = parser.parse_args([flag, str(flag_value)])
    assert getattr(settings.build(cls, {field: file_value}, args), field) == flag_value
    assert getattr(settings.build(cls, {}, args), field) == flag_value


def test_a_toml_file_with_several_sections(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[recipe]\ndim = 64\nstages = 3\ncompression = "fp32"\n\n'
                    '[miner]\nqueue = 3\nban_base = 0.5\n\n[orchestrator]\nheartbeat = 1.5\n', encoding="utf-8")
    toml = settings.read_toml(str(path))
    parser = parser_for(Recipe, OrchestratorConfig)
    args = parser.parse_args(["--stages", "2", "--lease-floor", "3"])
    recipe = settings.build(Recipe, toml["recipe"], args)
    assert (recipe.dim, recipe.stages, recipe.compression) == (64, 2, "fp32")
    orch = settings.build(OrchestratorConfig, toml["orchestrator"], args)
    assert (orch.heartbeat, orch.lease_floor, orch.lease_slack) == (1.5, 3.0, OrchestratorConfig().lease_slack)
    miner = settings.build(MinerConfig, toml["miner"], parser_for(MinerConfig).parse_args(["--queue", "5"]))
    assert (miner.queue, miner.ban_base, miner.ban_max) == (5, 0.5, MinerConfig().ban_max)
    assert settings.read_toml(None) == {}


# -- bad files and bad values ------------------------------------------------------------------


def test_an_unknown_toml_key_is_refused():
    with pytest.raises(SystemExit, match=r"unknown settings \['dimm', 'layers'\] for Recipe; known: \[.*'dim'"):
        settings.build(Recipe, {"dimm": 64, "layers": 2, "dim": 64}, parser_for(Recipe).parse_args([]))
    with pytest.raises(SystemExit, match=r"unknown settings \['window_size'\] for MinerConfig"):
        settings.build(MinerConfig, {"window_size": 2}, parser_for(MinerConfig).parse_args([]))


def test_an_unknown_toml_key_stops_the_cli(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[recipe]\nn_layer = 2\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"unknown settings \['n_layer'\] for Recipe"):
        main(["local", "--config", str(path)])


@pytest.mark.parametrize("content", [
    None,  # missing
    "directory",
    b"[recipe\ndim = 64\n",  # not TOML
    b"[recipe]\ndim = 64\ndim = 65\n",  # a key twice
    b"\xff\xfe[\x00r\x00e\x00c\x00",  # not UTF-8
], ids=["missing", "directory", "syntax", "duplicate-key", "not-utf8"])
def test_an_unreadable_or_invalid_toml_file_exits_clearly(tmp_path, content):
    path = tmp_path / "settings.toml"
    if content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        settings.read_toml(str(path))
    message = str(exc.value.code)
    assert message.startswith(f"cannot read the config file {path}: ")
    with pytest.raises(SystemExit, match="cannot read the config file"):
        main(["local", "--config", str(path)])


def test_a_section_that_is_not_a_table_exits_clearly(tmp_path):
    path = tmp_path / "flat.toml"
    path.write_text('recipe = "128x"\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"settings for Recipe must be a TOML table .*'128x'"):
        main(["local", "--config", str(path)])


@pytest.mark.parametrize("section,flags,message", [
    ({"stages": 5}, [], r"bad Recipe settings: recipe.stages must be between 1 and n_layers \(4\), got 5"),
    ({"n_layers": 2}, ["--stages", "3"], r"recipe.stages must be between 1 and n_layers \(2\), got 3"),
    ({"dim": "64"}, [], r"recipe.dim must be a positive integer, got '64'"),
    ({}, ["--batch", "0"], r"recipe.batch must be a positive integer, got 0"),
    ({"compression": "zip9"}, [], r"compression 'zip9' is neither a preset"),
])
def test_bad_recipe_values_exit_with_the_message(section, flags, message):
    with pytest.raises(SystemExit, match=message):
        settings.build(Recipe, section, parser_for(Recipe).parse_args(flags))


def test_bad_values_stop_the_cli_before_anything_starts(tmp_path):
    with pytest.raises(SystemExit, match=r"recipe.stages must be between 1 and n_layers \(4\), got 5"):
        main(["local", "--stages", "5", "--dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    with pytest.raises(SystemExit, match=r"bad OrchestratorConfig settings: .*heartbeat must be a positive"):
        settings.build(OrchestratorConfig, {"heartbeat": -1.0}, parser_for(OrchestratorConfig).parse_args([]))


def test_malformed_command_lines_are_usage_errors(capsys):
    for argv in ([], ["swarm"], ["local", "--dim", "wide"], ["miner", "--key", "a"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
    err = capsys.readouterr().err
    assert "invalid int value: 'wide'" in err
    assert "the following arguments are required: --orchestrator" in err  # --key/--chain: see test_chain_flags
