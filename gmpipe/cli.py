"""The ``gmpipe`` command: run stages and the pipeline as Prefect flows, validate params, sample.

Every argument is checked where it is parsed (the types below), so a bad one is one line naming it and a non-zero
exit before any model is loaded; an error the user can fix anywhere later is one ``gmpipe: error:`` line too.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
from pathlib import Path

import yaml

from gmpipe import __version__
from gmpipe.config.compute import DEVICES
from gmpipe.config.params import ParamsError, load_params
from gmpipe.errors import GmpipeError
from gmpipe.registry import SAMPLERS
from gmpipe.stages import STAGES

# Bounds of the sampling arguments (steps and guidance as in the train_ldm section's sample_* keys).
MAX_IMAGES_PER_ROW = 1000
MAX_IMAGES = 10_000
MAX_STEPS = 1000
MAX_GUIDANCE = 50.0
SAMPLE_SUFFIXES = (".png", ".npz")


def _fail(message: str, code: int = 1) -> int:
    print(f"gmpipe: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


class OneLineParser(argparse.ArgumentParser):
    """argparse with one line per error (no usage block), naming the argument and where to find help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def int_between(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high} (got {value})")
        return value

    return parse


def finite_between(low: float, high: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a finite number between {low:g} and {high:g} (got {text})")
        return value

    return parse


def prompt(text: str) -> str:
    from gmpipe.data.captions import CaptionError, check_caption

    try:
        return check_caption(text)
    except CaptionError as exc:
        raise argparse.ArgumentTypeError(f"unusable prompt ({exc})") from None


def check_output(path: str) -> Path:
    """The --out file: a known suffix, not a folder, in a folder that exists (or can be made) and is writable.
    Checked before sampling, so a bad path costs nothing."""
    out = Path(path)
    if out.suffix.lower() not in SAMPLE_SUFFIXES:
        raise GmpipeError(f"--out {path}: give a .png (a grid) or .npz (uint8 arrays) file name")
    if out.is_dir():
        raise GmpipeError(f"--out {path}: is a folder; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise GmpipeError(f"--out {path}: cannot write in {out.parent} ({exc.strerror or exc})") from None
    return out


def cmd_check_params(args: argparse.Namespace) -> int:
    try:
        load_params(args.file)
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{args.file}: ok")
    return 0


# What `gmpipe stage` and `gmpipe pipeline` run on, installed by the `pipeline` extra; sampling, evaluation and
# check-params never import them.
PIPELINE_EXTRA = ("prefect", "dvc", "dvclive")


def _pipeline_extra_missing(command: str) -> str | None:
    """One line saying which extra to install when the orchestration packages are not installed, else None."""
    import importlib.util

    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    missing = [name for name in PIPELINE_EXTRA if not installed(name)]
    if not missing:
        return None
    return (f"'gmpipe {command}' runs stages through Prefect and DVC, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'gmpipe[pipeline]'")


def cmd_stage(args: argparse.Namespace) -> int:
    from flows.stage_client import run_in_server  # standard library only

    # Run by the pipeline's dvc repro: its stage server forks the stage (None: no server named, or it declined).
    served = run_in_server(["gmpipe", "stage", args.name, "--params", args.params, "--root", args.root])
    if served is not None:
        return served
    # No cyclic garbage collection while Prefect, the flow module and the stage's own modules load: collecting the
    # hundred thousand objects they make, again and again as they grow, cost 0.2-0.4 s of every stage (measured).
    # They are frozen before the stage runs with collection back on (_stage); on if _stage returns early.
    gc.disable()
    try:
        return _stage(args)
    finally:
        gc.enable()


def _stage(args: argparse.Namespace) -> int:
    if problem := _pipeline_extra_missing("stage"):
        return _fail(problem)
    try:
        load_params(Path(args.root) / args.params)
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return 2
    from flows import environment
    from flows.processes import exit_code, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            server = None
            # Unconfigured, Prefect reads its settings again only once, in use_api below, before the flow module's
            # imports set up its logging from them.
            if environment.configure(args.root, refresh=False):
                if problem := environment.unreachable_reason():
                    return _fail(problem)
            else:
                server = _project_server(environment.private_home())
            from gmpipe.stages.runner import stage_module

            stage_module(args.name)  # the stage's own imports (torch...) while a server that was just started starts
            if server is not None:
                environment.use_api(server.api_url())
            from flows.stages import run_stage

            # What the imports made lives as long as the process: later collections (the training loop's) skip it.
            gc.freeze()
            gc.enable()
            state = run_stage(args.name, args.params, args.root)
    except KeyboardInterrupt as interrupt:
        return _fail(f"stage '{args.name}' interrupted", exit_code(interrupt))
    except RuntimeError as exc:  # the project's Prefect server did not start; its log is named
        return _fail(str(exc))
    finally:
        # The process ends next: without this, collecting the objects of torch, transformers and diffusers at exit
        # takes seconds (3.3 s against 0.5 s after importing the train_vae stage, measured), which every stage run
        # through dvc and every Ctrl-C would wait for.
        gc.freeze()
    if state.is_failed():
        return _fail(f"stage '{args.name}' failed: {state.message}")
    return 0


def _project_server(home: Path):
    """With no Prefect API configured: the project's shared server, started now (without waiting) if none runs."""
    from flows.project_server import ProjectServer, idle_seconds

    server = ProjectServer(home).start()
    if server.started_here:
        print(f"gmpipe: no Prefect API configured; starting the project's Prefect server (log: {home / 'server.log'}); "
              f"it stops after {idle_seconds() / 60:g} idle minutes, or with 'gmpipe server stop'", flush=True)
    return server


def cmd_pipeline(args: argparse.Namespace) -> int:
    if problem := _pipeline_extra_missing("pipeline"):
        return _fail(problem)
    try:
        load_params(Path(args.root) / "params.yaml")
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return 2
    # dvc.yaml is checked before Prefect is imported (about 2 s), so that a wrong folder or stage fails at once.
    dvc_file = Path(args.root) / "dvc.yaml"
    if not dvc_file.is_file():
        return _fail(f"{dvc_file}: not found; run gmpipe pipeline from the project root (or pass --root)", 2)
    try:
        order = list(yaml.safe_load(dvc_file.read_text())["stages"])
    except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        return _fail(f"{dvc_file}: not a dvc.yaml with a 'stages' mapping; restore it from git", 2)
    unknown = sorted(set(args.stages) - set(order))
    if unknown:
        return _fail(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has {', '.join(order)}", 2)
    from flows import environment
    from flows.processes import exit_code, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            if environment.configure(args.root):
                problem = environment.unreachable_reason()
                return _fail(problem) if problem else _run_pipeline(args)
            if args.no_server:
                return _run_pipeline(args)
            from flows.project_server import ProjectServer
            from flows.server import local_server

            if shared := ProjectServer.running(environment.private_home()):
                environment.use_api(shared.api_url())
                print(f"gmpipe: no Prefect API configured; using the project's Prefect server at {shared.api_url()}",
                      flush=True)
                return _run_pipeline(args)

            log_file = Path(args.root) / environment.PRIVATE_HOME / "server.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            print(f"gmpipe: no Prefect API configured; starting a local server (log: {log_file}) ...", flush=True)
            with local_server(log_file=log_file) as api_url:
                environment.use_api(api_url)
                print(f"gmpipe: Prefect UI at {api_url.removesuffix('/api')} while the pipeline runs", flush=True)
                return _run_pipeline(args)
    except KeyboardInterrupt as interrupt:
        return _fail("pipeline interrupted; its stage was stopped", exit_code(interrupt))


def cmd_server(args: argparse.Namespace) -> int:
    from flows import project_server
    from flows.environment import PRIVATE_HOME

    home = Path(os.environ.get("PREFECT_HOME") or Path(args.root).resolve() / PRIVATE_HOME)
    record = project_server.status(home)
    if args.action == "status":
        print(f"the project's Prefect server runs at {record['api_url']} (keeper pid {record['pid']})" if record
              else f"no project Prefect server runs in {home}")
        return 0
    if project_server.stop_server(home):
        print(f"stopped the project's Prefect server at {record['api_url']}")
    else:
        print(f"no project Prefect server runs in {home}")
    return 0


def _run_pipeline(args: argparse.Namespace) -> int:
    from flows.pipeline import pipeline

    state = pipeline(stages=args.stages or None, root=args.root, force=args.force, return_state=True)
    if state.is_failed():
        return _fail(f"pipeline failed: {state.message}")
    print("| stage | outcome |")
    for stage, outcome in state.result().items():
        print(f"| {stage} | {outcome} |")
    return 0


def _writing_stage(model: Path) -> str:
    """The stage that writes a model folder: distill for the students (models/student/NAME), else train_ldm."""
    return "distill" if "student" in model.parts[:-1] else "train_ldm"


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from gmpipe.artifacts import atomic_file
    from gmpipe.device import resolve_device
    from gmpipe.eval.grids import save_grid
    from gmpipe.generator import load_generator

    out = check_output(args.out)
    device = resolve_device(args.device, key="--device")  # a device that is not there fails before anything loads
    model, stage = Path(args.model), _writing_stage(Path(args.model))
    if not model.is_dir():
        siblings = sorted(p.name for p in model.parent.iterdir() if p.is_dir()) if model.parent.is_dir() else []
        where = f"{model.parent} has {', '.join(siblings)}" if siblings and stage == "distill" else \
            "a trained model: models/ldm or models/student/NAME"
        return _fail(f"--model {args.model}: no such folder ({where}; the '{stage}' stage writes it)")
    generator = load_generator(model, autoencoder=args.vae, decoder=args.decoder, device=device, missing_stage=stage)
    rows = generator.conditioning.rows(classes=args.classes, prompts=args.prompts)
    if len(rows) * args.n > MAX_IMAGES:
        return _fail(f"-n {args.n}: {len(rows)} rows x {args.n} images is more than {MAX_IMAGES}; lower -n")
    requests = [row for row in rows for _ in range(args.n)]
    chosen = {"sampler": args.sampler, "steps": args.steps, "guidance": args.guidance}
    settings = {key: value for key, value in chosen.items() if value is not None}
    # Image i of the call takes seed seed + i: the same --seed gives the same images whatever their batches.
    seeds = [args.seed + i for i in range(len(requests))]
    images, nfe = generator.generate(requests, seeds, **settings)
    if out.suffix.lower() == ".npz":
        labels = np.array([r if isinstance(r, int) else -1 for r in requests])
        with atomic_file(out, "wb") as handle:
            np.savez(handle, images=images, labels=labels)
    else:
        save_grid(images, out, columns=args.n)
    described = ", ".join(f"{key}={value}" for key, value in generator.resolve_settings(settings).items())
    print(f"wrote {len(images)} images to {out} ({described}, {nfe} network evaluations per image)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="gmpipe",
        description="Train a latent generative model from images, as a DVC + Prefect pipeline.",
    )
    parser.add_argument("--version", action="version", version=f"gmpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check-params", help="validate a params file and exit (2 on problems)")
    check.add_argument("file", nargs="?", default="params.yaml", help="params file (default: params.yaml)")
    check.set_defaults(func=cmd_check_params)

    stage = sub.add_parser("stage", help="run one stage as a Prefect flow (what dvc.yaml calls)")
    stage.add_argument("name", choices=STAGES, help="stage to run")
    stage.add_argument("--params", default="params.yaml", help="params file, relative to --root")
    stage.add_argument("--root", default=".", help="project root (the DVC repo); default: here")
    stage.set_defaults(func=cmd_stage)

    pipe = sub.add_parser(
        "pipeline", help="run the stages in DVC order through one `dvc repro` as one Prefect flow",
        description="The selected stages run through one `dvc repro --single-item STAGE...`, so stages that are up "
        "to date are skipped; each has a task run in the pipeline's flow run, with the stage's own flow run inside. "
        "Reports to the Prefect API you configured (PREFECT_API_URL, your active profile, `prefect cloud login`); "
        "with none, uses the project's running Prefect server (`gmpipe server status`) or starts a local one on "
        "127.0.0.1 for the run. Ctrl-C stops the running stage (exit 130; SIGTERM: 143).",
    )
    pipe.add_argument("stages", nargs="*", help="stages to run (default: all)")
    pipe.add_argument("--force", action="store_true", help="rerun the selected stages even if up to date")
    pipe.add_argument("--no-server", action="store_true",
                      help="with no Prefect API configured, use Prefect's temporary per-process server")
    pipe.add_argument("--root", default=".", help="project root (the DVC repo); default: here")
    pipe.set_defaults(func=cmd_pipeline)

    server = sub.add_parser(
        "server", help="the project's shared Prefect server that `gmpipe stage` starts when no Prefect API is set",
        description="With no Prefect API configured, the first `gmpipe stage` starts a Prefect server on 127.0.0.1 "
        "for the project (database in .prefect/) and later stages reuse it; it stops itself after "
        "GMPIPE_SERVER_IDLE_MINUTES (default 10) minutes unused.")
    server.add_argument("action", choices=("status", "stop"), help="show where it runs, or stop it now")
    server.add_argument("--root", default=".", help="project root; default: here")
    server.set_defaults(func=cmd_server)

    sample = sub.add_parser("sample", help="write images from a trained model (a grid PNG or an .npz of uint8)")
    sample.add_argument("--model", default="models/ldm", help="trained denoiser folder (default: models/ldm)")
    sample.add_argument("--vae", default="models/vae", help="autoencoder folder (default: models/vae)")
    sample.add_argument("--decoder", help="small decoder folder (models/decoder, written by train_decoder) that "
                        "decodes the latents instead of the autoencoder's decoder (default: the autoencoder's)")
    sample.add_argument("--classes", type=int_between(0, 2**31 - 1), nargs="*",
                        help="class indices, one row each (default: all)")
    sample.add_argument("--prompts", type=prompt, nargs="*",
                        help="text prompts, one row each (text-conditional models)")
    sample.add_argument("-n", type=int_between(1, MAX_IMAGES_PER_ROW), default=8,
                        help=f"images per class or prompt, 1..{MAX_IMAGES_PER_ROW} (default: 8)")
    sample.add_argument("--sampler", choices=SAMPLERS.names, help="default: the model's own")
    sample.add_argument("--steps", type=int_between(1, MAX_STEPS),
                        help=f"sampler steps, 1..{MAX_STEPS} (default: the model's own)")
    sample.add_argument("--guidance", type=finite_between(0.0, MAX_GUIDANCE),
                        help=f"guidance weight w, 0..{MAX_GUIDANCE:g} (default: the model's own)")
    sample.add_argument("--seed", type=int_between(0, 2**63 - 1), default=0,
                        help="seed of the first image; image i takes seed + i (default: 0)")
    sample.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the networks run: auto (default: CUDA when present), cpu or cuda")
    sample.add_argument("--out", default="samples.png", help="output .png grid or .npz (default: samples.png)")
    sample.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except GmpipeError as exc:
        return _fail(str(exc), exc.exit_code)
    except MemoryError:
        return _fail("out of memory; ask for fewer or smaller outputs")
    except OSError as exc:  # a file the user named or gave: the message names it
        return _fail(str(exc) if exc.strerror is None else f"{exc.filename or 'a file'}: {exc.strerror}")
    except Exception as exc:
        if os.environ.get("GMPIPE_DEBUG"):
            raise
        # Never a traceback for the user; the type and message still say what broke, and where to look.
        return _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with GMPIPE_DEBUG=1 for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
