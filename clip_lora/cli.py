"""``clip-lora``: train, evaluate and reproduce CLIP-LoRA from the command line.

clip-lora demo                                   # synthetic data, tiny model, CPU, ~1-2 min
clip-lora train --dataset dtd --root $DATA --shots 16 --seed 1   # OpenAI's weights (--pretrained openai)
clip-lora eval --run runs/dtd/ViT-B-16/16shots/seed1
clip-lora reproduce --root $DATA                                # 11 datasets x 5 shots x 3 seeds
torchrun --nproc_per_node 4 -m clip_lora.cli train ...         # multi-GPU (or multi-process CPU)
clip-lora make-synthetic --output data/                        # CoOp-format generated dataset
clip-lora datasets                                             # expected folder layouts
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

# The demo's model: open_clip's CLIP architecture at toy width/depth, so a random init
# learns the synthetic task on a laptop CPU in about a minute.  Written to the run folder
# as an open_clip model-config JSON and passed as ``--model <path>``.
DEMO_MODEL_NAME = "clip-lora-tiny"
DEMO_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PAPER_SHOTS = (1, 2, 4, 8, 16)
PAPER_SEEDS = (1, 2, 3)


def write_demo_model_config(folder: str) -> str:
    """Write the demo model's open_clip config JSON into ``folder``; returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{DEMO_MODEL_NAME}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(DEMO_MODEL_CONFIG, f, indent=1)
    return path


# --------------------------------------------------------------------------- arguments


def _pretrained(value: str) -> str | None:
    return None if value.lower() in ("", "none", "random") else value


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _positive_float(value: str) -> float:
    import math

    x = float(value)
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return x


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ViT-B-16", help="open_clip name (ViT-B-16, ViT-B-32, ViT-L-14) or config JSON")
    g.add_argument(
        "--pretrained",
        type=_pretrained,
        default="openai",
        help="weights: 'openai' (the paper; default), another open_clip tag, a local checkpoint path "
        "(e.g. OpenAI's ViT-B-16.pt), or 'none' for a random init (warns loudly)",
    )
    g.add_argument(
        "--activation",
        default="auto",
        choices=("auto", "quickgelu", "gelu"),
        help="MLP activation; auto: what the weights were trained with (QuickGELU for OpenAI's)",
    )
    g.add_argument(
        "--allow-activation-mismatch",
        action="store_true",
        help="build an --activation the weights were not trained with (otherwise an error)",
    )
    g.add_argument(
        "--image-size", type=_positive_int, default=None, help="override the input size (small CPU runs only)"
    )
    g.add_argument("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"))
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True, help="fused kernels or plain LoRA")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .config import ENCODERS, PARAMS, POSITIONS, SCALINGS

    _add_model_args(p)
    g = p.add_argument_group("LoRA (paper defaults)")
    g.add_argument("--r", type=int, default=2)
    g.add_argument("--alpha", type=float, default=1.0)
    g.add_argument("--dropout", type=float, default=0.25)
    g.add_argument("--scaling", default="alpha/sqrt(r)", choices=SCALINGS)
    g.add_argument("--encoder", default="both", choices=ENCODERS)
    g.add_argument("--params", nargs="+", default=["q", "k", "v"], choices=PARAMS)
    g.add_argument("--position", default="all", choices=POSITIONS)
    g = p.add_argument_group("optimisation (paper defaults)")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999])
    g.add_argument("--eta-min", type=float, default=1e-6, help="cosine schedule floor")
    g.add_argument("--batch-size", type=int, default=32, help="global batch (split across processes)")
    g.add_argument("--iters-per-shot", type=int, default=500, help="total iterations = this x shots")
    g.add_argument("--iterations", type=int, default=None, help="total iterations (overrides --iters-per-shot)")
    g.add_argument(
        "--logit-scale",
        type=_positive_float,
        default=None,
        help="loss temperature (default: 100 on CLIP models, the model's own logit_scale.exp() on others)",
    )
    g.add_argument("--template", default="a photo of a {}.")
    g = p.add_argument_group("run")
    g.add_argument("--eval-batch-size", type=int, default=128)
    g.add_argument("--workers", type=int, default=4, help="data-loading worker processes")
    g.add_argument("--checkpoint-every", type=int, default=500, help="iterations between checkpoints (0: none)")
    g.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot evaluation before training")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument(
        "--compile",
        action="store_true",
        help=(
            "torch.compile the towers (CUDA graphs on a GPU): compiling first, then faster "
            "steps (H100, ViT-B/16, ImageNet: 0.48x the eager step); worth it for runs of thousands of steps"
        ),
    )


def _train_config(args: argparse.Namespace, dataset: str, shots: int, seed: int, output: str):
    from .config import LoRAConfig
    from .train import TrainConfig

    return TrainConfig(
        dataset=dataset,
        root=args.root,
        output=output,
        shots=shots,
        seed=seed,
        model=args.model,
        pretrained=args.pretrained,
        activation=args.activation,
        allow_activation_mismatch=args.allow_activation_mismatch,
        image_size=args.image_size,
        lora=LoRAConfig(
            r=args.r,
            alpha=args.alpha,
            dropout=args.dropout,
            scaling=args.scaling,
            encoder=args.encoder,
            params=tuple(args.params),
            position=args.position,
        ),
        fused=args.fused,
        lr=args.lr,
        weight_decay=args.weight_decay,
        betas=tuple(args.betas),
        eta_min=args.eta_min,
        batch_size=args.batch_size,
        iters_per_shot=args.iters_per_shot,
        iterations=args.iterations,
        precision=args.precision,
        logit_scale=args.logit_scale,
        template=args.template,
        eval_batch_size=args.eval_batch_size,
        num_workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        zero_shot=not args.no_zero_shot,
        progress=not args.no_progress,
        compile=args.compile,
    )


def run_folder(base: str, dataset: str, model: str, shots: int, seed: int) -> str:
    from .data import canonical_name

    model_tag = os.path.splitext(os.path.basename(model))[0]
    return os.path.join(base, canonical_name(dataset), model_tag, f"{shots}shots", f"seed{seed}")


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# --------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    output = args.output or run_folder("runs", args.dataset, args.model, args.shots, args.seed)
    metrics = train(_train_config(args, args.dataset, args.shots, args.seed, output), force=args.force)
    if _is_main():
        zs = metrics.get("zero_shot_accuracy")
        done = "  already finished, not retrained (--force retrains)" if metrics.get("already_finished") else ""
        print(
            f"{metrics.get('display_name', args.dataset)} {args.shots}-shot seed {args.seed}: "
            + (f"zero-shot {zs:.2f}% -> " if zs is not None else "")
            + f"{metrics['accuracy']:.2f}%  (run folder: {output}){done}"
        )
    return 0


def evaluate_run(run: str, *, root: str | None = None, batch_size: int | None = None, workers: int = 2) -> dict:
    """Rebuild a finished run's model from its ``config.json``, load its adapter, re-evaluate."""
    from .adapters import load_adapter
    from .data import load_dataset
    from .evaluate import evaluate
    from .train import ADAPTER_FILE, TrainConfig, build_model, init_distributed

    cfg_path = os.path.join(run, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: --run must be a folder written by `clip-lora train`")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = TrainConfig.from_dict(json.load(f))
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{cfg_path} is not a valid run configuration ({type(e).__name__}: {e}); "
            "restore it or retrain the run with `clip-lora train`"
        ) from None
    if root:
        cfg.root = root
    _, _, device, _ = init_distributed()
    model, preprocess_val, tokenizer = build_model(cfg, device)
    load_adapter(model, os.path.join(run, ADAPTER_FILE), fused=cfg.fused)
    data = load_dataset(cfg.dataset, cfg.root)
    return evaluate(
        model,
        data.test,
        data.classnames,
        transform=preprocess_val,
        tokenizer=tokenizer,
        device=device,
        precision=cfg.precision,
        batch_size=batch_size or cfg.eval_batch_size,
        num_workers=workers,
        template=cfg.template,
    ).to_dict()


def cmd_eval(args: argparse.Namespace) -> int:
    if args.run:
        result = evaluate_run(args.run, root=args.root, batch_size=args.batch_size, workers=args.workers)
        label = args.run
    else:
        if not (args.dataset and args.root):
            raise SystemExit("eval: give --run RUN_FOLDER, or --dataset and --root (plus --adapter, or zero-shot)")
        import torch

        from .adapters import load_adapter
        from .data import load_dataset
        from .evaluate import evaluate
        from .train import RANDOM_INIT_WARNING, create_checked_model

        if args.pretrained is None:
            print(RANDOM_INIT_WARNING, file=sys.stderr)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        kwargs = {"force_image_size": args.image_size} if args.image_size else {}
        torch.manual_seed(args.seed)
        model, _, preprocess_val, tokenizer = create_checked_model(
            args.model,
            args.pretrained,
            lora=None,
            fused=args.fused,
            activation=args.activation,
            allow_activation_mismatch=args.allow_activation_mismatch,
            **kwargs,
        )
        if args.adapter:
            load_adapter(model, args.adapter, fused=args.fused, check_model=not args.ignore_model_mismatch)
        data = load_dataset(args.dataset, args.root)
        result = evaluate(
            model.to(device),
            data.test,
            data.classnames,
            transform=preprocess_val,
            tokenizer=tokenizer,
            device=device,
            precision=args.precision,
            batch_size=args.batch_size or 128,
            num_workers=args.workers,
            progress=True,
        ).to_dict()
        label = f"{args.dataset} ({'adapter ' + args.adapter if args.adapter else 'zero-shot'})"
    print(f"{label}: accuracy {result['accuracy']:.2f}% ({result['correct']}/{result['total']})")
    if args.output:
        from .train import write_json

        write_json(args.output, result)
    return 0


def results_table(base: str, datasets: Sequence[str], model: str, shots: Sequence[int], seeds: Sequence[int]):
    """Mean accuracy over seeds, laid out like the paper: one row per shot count (plus
    zero-shot), one column per dataset, the average last.  Returns (markdown, csv, missing runs)."""
    from .data import display_name

    columns = [display_name(d) for d in datasets] + ["Average"]
    rows: list[tuple[str, list[float | None]]] = []
    missing = []

    def mean_over_seeds(dataset: str, k: int, key: str) -> float | None:
        accs = []
        for seed in seeds:
            path = os.path.join(run_folder(base, dataset, model, k, seed), "metrics.json")
            if not os.path.isfile(path):
                if key == "accuracy":
                    missing.append(path)
                continue
            with open(path, encoding="utf-8") as f:
                value = json.load(f)[key]
            if value is not None:
                accs.append(value)
        return sum(accs) / len(accs) if accs and (key != "accuracy" or len(accs) == len(seeds)) else None

    # Zero-shot CLIP does not depend on shots or seed; take it from the first finished run.
    zero = []
    for d in datasets:
        zero.append(next((v for k in shots if (v := mean_over_seeds(d, k, "zero_shot_accuracy")) is not None), None))
    rows.append(("0 (zero-shot)", zero))
    for k in shots:
        rows.append((f"{k} shot" + ("s" if k > 1 else ""), [mean_over_seeds(d, k, "accuracy") for d in datasets]))
    for _, values in rows:
        values.append(sum(values) / len(values) if values and all(v is not None for v in values) else None)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    md = ["| shots | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    md += [f"| {name} | " + " | ".join(fmt(v) for v in values) + " |" for name, values in rows]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["shots", *columns])
    writer.writerows([[name, *("" if v is None else f"{v:.2f}" for v in values)] for name, values in rows])
    return "\n".join(md) + "\n", buf.getvalue(), missing


def cmd_reproduce(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from .data import PAPER_DATASETS, canonical_name
    from .train import init_distributed, train, write_json

    datasets = list(PAPER_DATASETS) if args.datasets == ["all"] else [canonical_name(d) for d in args.datasets]
    if not args.table_only:
        # One process group for all runs under torchrun (train() reuses it).
        _, _, _, created = init_distributed()
        try:
            for d in datasets:
                for k in args.shots:
                    for seed in args.seeds:
                        out = run_folder(args.output, d, args.model, k, seed)
                        if os.path.isfile(os.path.join(out, "metrics.json")):
                            continue  # finished earlier: reproduce is restartable
                        train(_train_config(args, d, k, seed, out))
                        if dist.is_initialized():
                            dist.barrier()  # every rank sees the same finished runs before moving on
        finally:
            if created:
                dist.destroy_process_group()
    if not _is_main():
        return 0
    md, table_csv, missing = results_table(args.output, datasets, args.model, args.shots, args.seeds)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.md"), "w", encoding="utf-8") as f:
        f.write(md)
    with open(os.path.join(args.output, "results.csv"), "w", encoding="utf-8") as f:
        f.write(table_csv)
    write_json(os.path.join(args.output, "missing_runs.json"), missing)
    print(md + f"\n(mean top-1 accuracy over seeds {list(args.seeds)}; written to {args.output}/results.md and .csv)")
    if missing:
        print(f"{len(missing)} runs have no metrics yet (see missing_runs.json)", file=sys.stderr)
    return 0


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from .data import make_synthetic

    folder = make_synthetic(
        args.output,
        num_classes=args.classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        test_per_class=args.test_per_class,
        image_size=args.image_size,
        seed=args.seed,
    )
    print(f"wrote {folder} (use: --dataset synthetic --root {args.output})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """make-synthetic + a short training + re-evaluation of the saved adapter, on CPU."""
    import time

    import torch

    from .config import LoRAConfig
    from .data import make_synthetic
    from .train import TrainConfig, train

    # On CPU the plain PyTorch LoRA is the fast path; the fused kernels are for GPUs.
    fused = torch.cuda.is_available() if args.fused is None else args.fused
    t0 = time.perf_counter()
    data_root = os.path.join(args.output, "data")
    make_synthetic(data_root, num_classes=6, train_per_class=16, test_per_class=20, image_size=32, seed=0)
    model = args.model or write_demo_model_config(args.output)
    run = os.path.join(args.output, "run")
    cfg = TrainConfig(
        dataset="synthetic",
        root=data_root,
        output=run,
        shots=args.shots,
        seed=1,
        model=model,
        pretrained=args.pretrained,
        image_size=args.image_size,
        lora=LoRAConfig(),
        # A random init starts far from the task: the paper's lr (2e-4, for pretrained
        # CLIP over 500 x shots iterations) would need thousands of steps here.
        lr=args.lr,
        iterations=args.iterations,
        fused=fused,
        num_workers=0,
        checkpoint_every=0,
    )
    metrics = train(cfg, force=True)  # a demo always trains, whatever an earlier demo left
    again = evaluate_run(run, workers=0)
    chance = 100.0 / len(metrics["classnames"])
    print(
        f"\ndemo: {len(metrics['classnames'])} classes (chance {chance:.1f}%), {args.shots} shots, "
        f"{metrics['iterations']} iterations in {metrics['train_seconds']:.0f}s\n"
        f"  zero-shot accuracy {metrics['zero_shot_accuracy']:.1f}% -> after CLIP-LoRA {metrics['accuracy']:.1f}%\n"
        f"  loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}\n"
        f"  reloaded adapter re-evaluates to {again['accuracy']:.1f}% "
        f"({'identical' if again['accuracy'] == metrics['accuracy'] else 'DIFFERENT'})\n"
        f"  run folder: {run} (metrics.json, adapter.safetensors, few_shot.json, train.log)\n"
        f"  total {time.perf_counter() - t0:.0f}s"
    )
    return 0 if again["accuracy"] == metrics["accuracy"] else 1


def cmd_datasets(args: argparse.Namespace) -> int:
    from .data import LAYOUTS, PAPER_DATASETS, display_name

    print("Expected layout under --root $DATA (CoOp's DATASETS.md); split files from CoOp:\n")
    for key in [*PAPER_DATASETS, "synthetic", "folder"]:
        print(f"  {key:15s} ({display_name(key)}): {LAYOUTS[key]}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-lora", description="CLIP-LoRA few-shot adaptation with fused LoRA kernels."
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="one dataset x shots x seed (torchrun for several processes)")
    p.add_argument("--dataset", required=True, help="e.g. imagenet, dtd, eurosat, synthetic, folder")
    p.add_argument("--root", required=True, help="data root ($DATA), or the folder itself for --dataset folder")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", default=None, help="run folder (default runs/<dataset>/<model>/<k>shots/seed<s>)")
    p.add_argument("--force", action="store_true", help="retrain a finished run folder from the start")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy of a trained run, an adapter file, or zero-shot CLIP")
    p.add_argument("--run", default=None, help="a run folder written by `train` (rebuilds its model and adapter)")
    p.add_argument("--dataset", default=None)
    p.add_argument("--root", default=None)
    p.add_argument("--adapter", default=None, help="adapter file (.safetensors, or the official code's .pt)")
    p.add_argument("--seed", type=int, default=1, help="seed of a random-init model (must match training)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--output", default=None, help="write the result as JSON here")
    p.add_argument(
        "--ignore-model-mismatch",
        action="store_true",
        help="load --adapter even if it was saved for another model architecture (shapes are still checked)",
    )
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("reproduce", help="datasets x shots x seeds, then the paper's table (Markdown + CSV)")
    p.add_argument("--root", required=True)
    p.add_argument("--datasets", nargs="+", default=["all"], help="'all' (the 11) or a list")
    p.add_argument("--shots", type=int, nargs="+", default=list(PAPER_SHOTS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(PAPER_SEEDS))
    p.add_argument("--output", default="runs/reproduce")
    p.add_argument("--table-only", action="store_true", help="only collect finished runs into the table")
    _add_train_args(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("make-synthetic", help="write a small coloured-shapes dataset in the CoOp layout")
    p.add_argument("--output", required=True, help="data root; the dataset goes to <output>/synthetic")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--train-per-class", type=int, default=16)
    p.add_argument("--val-per-class", type=int, default=4)
    p.add_argument("--test-per-class", type=int, default=10)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser("demo", help="end to end on CPU in about a minute: synthetic data, train, re-evaluate")
    p.add_argument("--output", default="clip_lora_demo")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--model", default=None, help="default: a tiny CLIP-architecture config written to --output")
    p.add_argument("--pretrained", type=_pretrained, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument(
        "--fused", action=argparse.BooleanOptionalAction, default=None, help="default: fused on GPU, plain on CPU"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("datasets", help="print the folder layout each dataset expects")
    p.set_defaults(func=cmd_datasets)
    for p in sub.choices.values():  # also after the command; SUPPRESS keeps a --debug given before it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; bad input and failed runs end in one line on stderr and exit 2
    (``--debug``: the full traceback instead)."""
    args = build_parser().parse_args(argv)
    from .data import DatasetError
    from .errors import ClipLoRAError

    try:
        return args.func(args)
    except (ClipLoRAError, DatasetError, ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        # An error raised in a data-loading worker arrives with the worker's traceback in
        # its message; its last line is ours.
        msg = str(e).strip()
        if "Original Traceback" in msg:
            msg = msg.splitlines()[-1].split(": ", 1)[-1]
        msg = " ".join(msg.split("\n"))
        print(f"clip-lora {args.command}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
