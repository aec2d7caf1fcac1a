"""python -m iota.node {local,orchestrator,miner,validator}

  local         the whole swarm on this machine: trains a small model on the
                Python standard library's source, with a live view and a
                dashboard. Start here:  python -m iota.node local
  orchestrator  the control plane of a run (state in DIR/orchestrator.sqlite)
  miner         serve one pipeline stage for an orchestrator
  validator     evaluate the merged model for an orchestrator

Settings come from defaults, then `--config FILE.toml` (sections [recipe],
[orchestrator], [miner], [validator], [local]), then flags.

Each of orchestrator, miner and validator says who it is in one of two ways:
  --key NAME --chain FILE          a dev hotkey //NAME on a LocalChain JSON file
  --netuid N --wallet-name NAME    a Bittensor wallet's hotkey on subnet N
    [--network finney|test|local|ws://...] [--wallet-hotkey H] [--wallet-path DIR]
    [--orchestrator-hotkeys SS58,...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from iota.miner.service import MinerConfig
from iota.miner.worker import ADVERSARIES
from iota.model.recipe import COMPRESSION_PRESETS, Recipe
from iota.node import config as settings
from iota.node.local import LocalSwarm, report
from iota.orchestrator.config import OrchestratorConfig
from iota.validator import ValidatorConfig

if TYPE_CHECKING:
    from bittensor import Client, Subtensor

    from iota.node.roles import Identity

LOCAL_FLAGS = ("--key", "--chain")
BITTENSOR_FLAGS = ("--network", "--netuid", "--wallet-name", "--wallet-hotkey", "--wallet-path",
                   "--orchestrator-hotkeys")


def common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML file of settings")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in this process (0: torch's default)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)


def node_identity(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "identity", "who this node is: --key and --chain, or a Bittensor wallet on a subnet (--netuid, "
                    "--wallet-name, ...); exactly one of the two")
    group.add_argument("--key", help="dev key name: the hotkey is //NAME (local swarms and tests)")
    group.add_argument("--chain", help="a LocalChain JSON file that registers every node")
    group.add_argument("--network", help="the Bittensor network: finney, test, local or a ws:// or wss:// URL "
                                         "(default finney)")
    group.add_argument("--netuid", type=int, help="the subnet the swarm runs on")
    group.add_argument("--wallet-name", help="the wallet (as btcli keeps it) whose hotkey this node signs with")
    group.add_argument("--wallet-hotkey", help="the wallet's hotkey name (default: default)")
    group.add_argument("--wallet-path", help="the wallets directory (default: $BT_WALLET_PATH or "
                                             "~/.bittensor/wallets)")
    group.add_argument("--orchestrator-hotkeys", metavar="SS58[,SS58...]",
                       help="the hotkeys the subnet's orchestrators sign with: the chain gives them the "
                            "orchestrator role (with --orchestrator-hotkey and, for an orchestrator, its own "
                            "hotkey)")


def _given(args: argparse.Namespace, flags: tuple[str, ...]) -> list[str]:
    return [flag for flag in flags if getattr(args, flag[2:].replace("-", "_"), None) is not None]


def identity(args: argparse.Namespace, *, subtensor: Subtensor | Client | None = None) -> Identity:
    """Who this node is, from --key/--chain or the Bittensor flags; SystemExit if they name neither or both.

    `subtensor` replaces the SDK client --network would give (tests).
    """
    from iota.node import roles

    local, bittensor = _given(args, LOCAL_FLAGS), _given(args, BITTENSOR_FLAGS)
    if local and bittensor:
        raise SystemExit("give either --key and --chain (a LocalChain) or --netuid and --wallet-name (a Bittensor "
                         f"subnet), not both; got {', '.join(local + bittensor)}")
    if local:
        if len(local) < 2:
            missing = next(flag for flag in LOCAL_FLAGS if flag not in local)
            raise SystemExit(f"--key and --chain go together; {local[0]} was given without {missing}")
        return roles.local_identity(args.key, args.chain)
    if not bittensor:
        raise SystemExit("say who this node is: give either --key and --chain (a LocalChain) or --netuid and "
                         "--wallet-name (a Bittensor subnet; --network defaults to finney)")
    if args.netuid is None:
        raise SystemExit(f"--netuid is required with {bittensor[0]}: the subnet the swarm runs on")
    if args.netuid < 0:
        raise SystemExit(f"--netuid must be >= 0, got {args.netuid}")
    if args.wallet_name is None:
        raise SystemExit(f"--wallet-name is required with {bittensor[0]}: the wallet whose hotkey this node "
                         "signs with (see also --wallet-hotkey and --wallet-path)")
    orchestrators = [h.strip() for h in (args.orchestrator_hotkeys or "").split(",") if h.strip()]
    if getattr(args, "orchestrator_hotkey", None):
        orchestrators.append(args.orchestrator_hotkey)
    return roles.bittensor_identity(args.netuid, args.network, args.wallet_name, args.wallet_hotkey or "default",
                                    args.wallet_path, orchestrators, orchestrator=args.role == "orchestrator",
                                    subtensor=subtensor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m iota.node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    roles = parser.add_subparsers(dest="role", required=True, metavar="{local,orchestrator,miner,validator}")

    local = roles.add_parser("local", help="run a whole swarm on this machine",
                             description="Start an orchestrator, stages x miners-per-stage miners and a validator "
                                         "as processes on loopback, train, and report.")
    common(local)
    local.add_argument("--miners-per-stage", type=int, default=None, help="(default 2)")
    local.add_argument("--steps", type=int, dest="samples", help="samples (batches) to train on (default 1000)")
    local.add_argument("--dir", help="where the run keeps its database, weights and logs (default: a new temp dir)")
    local.add_argument("--report", help="write a JSON report of the run here")
    local.add_argument("--no-live", action="store_true", help="print progress lines instead of a live view")
    local.add_argument("--adversary", choices=ADVERSARIES,
                       help="make the first miner cheat this way (a demo of the validator); "
                            "random_backward needs 3 or more stages (it puts the cheat on stage 1)")
    settings.add_fields(local, Recipe, skip=("samples",))

    orch = roles.add_parser("orchestrator", help="the control plane of a run")
    common(orch)
    node_identity(orch)
    orch.add_argument("--dir", required=True, help="holds orchestrator.sqlite and the merged weights")
    orch.add_argument("--host", default="127.0.0.1")
    orch.add_argument("--port", type=int, default=8700)
    settings.add_fields(orch, Recipe)
    settings.add_fields(orch, OrchestratorConfig)

    miner = roles.add_parser("miner", help="serve one pipeline stage")
    common(miner)
    node_identity(miner)
    miner.add_argument("--orchestrator", required=True, help="the orchestrator's URL")
    miner.add_argument("--orchestrator-hotkey", help="(default: the chain's only orchestrator)")
    settings.add_fields(miner, MinerConfig)

    validator = roles.add_parser("validator", help="evaluate the merged model")
    common(validator)
    node_identity(validator)
    validator.add_argument("--orchestrator", required=True)
    validator.add_argument("--orchestrator-hotkey")
    settings.add_fields(validator, ValidatorConfig)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.role == "local":
        run_local(args)
        return

    from iota.node import roles as run

    node = identity(args)
    run.setup_process(args.threads, args.log_level)
    toml = settings.read_toml(args.config)
    if args.role == "orchestrator":
        given = {f: getattr(args, f) for f in Recipe().to_dict() if getattr(args, f, None) is not None}
        recipe = settings.build(Recipe, toml.get("recipe", {}), args) if given or "recipe" in toml else None
        asyncio.run(run.orchestrator(args.dir, node, recipe,
                                     settings.build(OrchestratorConfig, toml.get("orchestrator", {}), args),
                                     args.host, args.port, args.parent_pid))
    elif args.role == "miner":
        asyncio.run(run.miner(args.orchestrator, node, args.orchestrator_hotkey,
                              settings.build(MinerConfig, toml.get("miner", {}), args), args.parent_pid))
    else:
        asyncio.run(run.validator(args.orchestrator, node, args.orchestrator_hotkey,
                                  settings.build(ValidatorConfig, toml.get("validator", {}), args), args.parent_pid))


def run_local(args: argparse.Namespace) -> None:
    toml = settings.read_toml(args.config)
    recipe = settings.build(Recipe, toml.get("recipe", {}), args)
    if args.compression and args.compression not in COMPRESSION_PRESETS:
        print(f"compression {args.compression}: a codec spec used both ways, no bottleneck")
    options = toml.get("local", {})
    miners_per_stage = args.miners_per_stage or options.get("miners_per_stage", 2)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="iota-local-"))
    cores = os.cpu_count() or 1
    if args.adversary == "random_backward" and recipe.stages < 3:
        raise SystemExit("--adversary random_backward cheats on the gradients a middle stage sends back: "
                         "give --stages 3 or more")
    swarm = LocalSwarm(directory, recipe, miners_per_stage=miners_per_stage,
                       threads=args.threads or max(1, cores // (recipe.stages * miners_per_stage)),
                       orchestrator_settings=toml.get("orchestrator", {}), miner_settings=toml.get("miner", {}),
                       adversaries={0: args.adversary} if args.adversary else {},
                       miner_stages={0: 1} if args.adversary == "random_backward" else {})
    print(f"iota local swarm: {recipe.stages} stages x {miners_per_stage} miners + 1 validator, "
          f"a {recipe.dim}-wide {recipe.n_layers}-layer model, {recipe.samples} samples of "
          f"{recipe.tokens_per_sample()} tokens, compression {recipe.compression}; run directory {directory}")
    started = time.monotonic()
    try:
        swarm.start()
        print(f"dashboard: {swarm.url}/   (logs in {directory / 'logs'})")
        state = follow(swarm, live=not args.no_live and sys.stdout.isatty())
        seconds = time.monotonic() - started
        swarm.wait_validator(timeout=60.0)
        state = swarm.state()
    except KeyboardInterrupt:
        print("stopping every node")
        swarm.stop()
        raise SystemExit(130) from None
    finally:
        swarm.stop()
    result = report(swarm, state, seconds)
    summary = {k: result[k] for k in ("first_loss", "last_loss", "final_val_loss", "tokens", "tokens_per_second",
                                      "compression_ratio", "wire_bytes_per_token", "merges_done", "miners_lost")}
    print(json.dumps(summary, indent=2))
    print(f"merged model exported to {directory / 'export'}")
    if args.report:
        Path(args.report).write_text(json.dumps(result, indent=1))
        print(f"report written to {args.report}")


def follow(swarm: LocalSwarm, *, live: bool) -> dict:
    """Poll the orchestrator, replace dead miners, and show progress until the run is finished."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    last_print = 0.0
    with Live(console=console, refresh_per_second=2, transient=False) if live else _nothing() as view:
        while True:
            swarm.supervise()
            try:
                state = swarm.state()
            except OSError:
                time.sleep(0.5)
                continue
            if live:
                view.update(progress_table(state, swarm))
            elif time.monotonic() - last_print > 5:
                console.print(progress_line(state))
                last_print = time.monotonic()
            if swarm.finished(state):
                if not live:
                    console.print(progress_line(state))
                return state
            time.sleep(0.5)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _recent_loss(state: dict) -> float | None:
    losses = [loss for _, loss in state["losses"][-10:]]
    return sum(losses) / len(losses) if losses else None


def progress_line(state: dict) -> str:
    loss = _recent_loss(state)
    val = state["evals"][-1]["val_loss"] if state["evals"] else None
    ratio = state["compression_ratio"]
    wire = sum(state["traffic"][k] for k in ("activations", "gradients", "allreduce"))
    return (f"{state['status']}: {state['samples']['done']}/{state['samples']['total']} samples, "
            f"loss {loss if loss is None else round(loss, 3)}, val {val if val is None else round(val, 3)}, "
            f"{state['tokens_per_second']:.0f} tokens/s, miners per stage {[len(s['miners']) for s in state['stages']]}, "
            f"compression {'-' if ratio is None else f'{ratio:.0f}x'}, {wire / 1e6:.1f} MB on the wire, "
            f"{sum(m['outcome'] == 'merged' for m in state['merges'])} merges")


def progress_table(state: dict, swarm: LocalSwarm):
    from rich.table import Table

    table = Table(title=f"iota local swarm · {swarm.url}/", show_header=False)
    loss = _recent_loss(state)
    val = state["evals"][-1]["val_loss"] if state["evals"] else None
    ratio = state["compression_ratio"]
    traffic = state["traffic"]
    table.add_row("status", state["status"])
    table.add_row("samples", f"{state['samples']['done']} / {state['samples']['total']}")
    table.add_row("train loss (last 10)", "-" if loss is None else f"{loss:.3f}")
    table.add_row("val loss (merged model)", "-" if val is None else f"{val:.3f}")
    table.add_row("tokens/s", f"{state['tokens_per_second']:.0f}")
    table.add_row("miners per stage", " ".join(str(len(s["miners"])) for s in state["stages"]))
    table.add_row("stage versions", " ".join(str(s["version"]) for s in state["stages"]))
    table.add_row("compression vs bf16", "-" if ratio is None else f"{ratio:.1f}x")
    table.add_row("on the wire", f"activations {traffic['activations'] / 1e6:.2f} MB, gradients "
                  f"{traffic['gradients'] / 1e6:.2f} MB, all-reduce {traffic['allreduce'] / 1e6:.2f} MB")
    table.add_row("merges", str(sum(m["outcome"] == "merged" for m in state["merges"])))
    table.add_row("miners lost / replaced", f"{len(swarm.lost)} / {len(swarm.replaced)}")
    flagged = {f["hotkey"]: f["reason"] for f in state["flags"]}
    table.add_row("flagged by validators", ", ".join(f"{h[:8]}… {r}" for h, r in flagged.items()) or "none")
    return table


if __name__ == "__main__":
    main()
