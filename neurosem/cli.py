"""The ``neurosem`` command line: one thin command per stage.

Each command parses its options and calls one library function. torch and the stages are imported
inside the commands, so ``neurosem --help`` is instant. A :class:`~neurosem.errors.NeurosemError`
is printed as one ``error:`` line (exit status 2); Ctrl-C exits with 130 after the stage has saved
what it computed.
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

import click

from neurosem import __version__
from neurosem.errors import NeurosemError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
#: the most images per batch an option accepts (larger batches never fit a device anyway)
MAX_BATCH = 1 << 16
BATCH = click.IntRange(1, MAX_BATCH)
WORKERS = click.IntRange(min=0)

#: what Ctrl-C leaves behind, per command (the library prints details, e.g. how many images are saved)
INTERRUPTED = {
    "record": "the images recorded so far are saved; run the same command again to resume",
    "dissect": "the dissection is not saved: it starts over when you run the same command again (the "
               "run's activations are kept, and an unfinished recording resumes)",
    "embed": "the embedding is not saved: its training starts over when you run the same command again (the "
             "run's activations are kept, and an unfinished recording resumes)",
    "distill": "every finished epoch is saved in the run's checkpoint.pt; run the same command again to "
               "resume after the last one",
    "quickstart": "a finished synthetic set is kept; the other stages run again when you run the same command",
}
#: the commands that share their work among the ranks of a ``torchrun`` launch (or refuse it); every
#: other command runs on rank 0 alone while the others wait (neurosem.distributed.on_rank_zero)
TORCHRUN_COMMANDS = frozenset({"record", "dissect", "embed", "distill", "concepts", "quickstart"})


def _split(values: Sequence[str]) -> list[str] | None:
    """``--layers a,b --layers c`` -> ``['a', 'b', 'c']``; nothing given -> None (the defaults)."""
    out = [v.strip() for value in values for v in value.split(",") if v.strip()]
    return out or None


def _layers_option(f):
    return click.option(
        "--layers", "-l", multiple=True, metavar="NAMES",
        help="Layers (dotted module names), comma-separated or repeated. "
             "Default: the end of each block (ResNet: layer1..layer4). See `neurosem layers MODEL`.")(f)


def _device_option(f):
    return click.option("--device", default="auto", show_default=True,
                        help="auto (CUDA when present), cpu, cuda, cuda:N or mps.")(f)


def _run_option(f, help: str = "Run directory (default: runs/<model>, or the only run under runs/; "
                                 "path/file.py:factory -> runs/file)."):
    return click.option("--run", "run", type=click.Path(file_okay=False), default=None, help=help)(f)


def _distill_run_option(f):
    return _run_option(f, help="Run directory (default: runs/<student>-<method>[-<teacher>]-s<seed>).")


def _weights_option(f):
    return click.option(
        "--weights", default="default", show_default=True,
        help="`default` (torchvision's pretrained weights, from the torch cache; for path/file.py:factory "
             "what the factory built), `none` (random init) or a .pth file (a state dict or a checkpoint "
             "holding one).")(f)


def _quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(f)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="neurosem")
def cli() -> None:
    """Explain trained vision networks neuron by neuron.

    \b
    The pipeline (every stage reads and writes one run directory, runs/<model>):
      record   activations of chosen layers -> activations.h5
      dissect  NetDissect IoU of every unit against every Broden concept -> dissect.h5, HTML
      embed    a semantic vector per neuron (paper eq. 1) -> embedding.h5
      kl, query, figures   analysis of the vectors
      distill  static knowledge distillation of a teacher's vectors into a student

    \b
    Start with:  neurosem quickstart      (the whole pipeline on generated data, minutes on a CPU)
    Test data:   neurosem synth OUT       (the quickstart's synthetic Broden-format set)
    Own model:   neurosem layers path/to/file.py:factory   (factory() returns an nn.Module)
    Check setup: neurosem doctor
    """


@cli.command(context_settings=CONTEXT)
@click.option("--out", type=click.Path(file_okay=False), default="runs/quickstart", show_default=True,
              help="Where the data, the model and the run go.")
@_device_option
@click.option("--seed", default=0, show_default=True, help="Seed for the data, the model and the embedding.")
@_quiet_option
def quickstart(out: str, device: str, seed: int, quiet: bool) -> None:
    """Run the whole pipeline on an embedded default, offline, in minutes.

    Writes a synthetic Broden-format set, trains a small CNN on it, then records, dissects, embeds,
    computes the KL curves, answers a neighbour and an additive query, and writes the figures and the
    HTML report. Ends with where everything is and four findings you can check.

    \b
    Example:
      neurosem quickstart --out runs/quickstart
    """
    from neurosem.quickstart import quickstart as run_quickstart

    run_quickstart(out=out, device=device, seed=seed, progress=not quiet)


@cli.command(context_settings=CONTEXT, short_help="Write the synthetic Broden-format set into OUT.")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--images", "n_images", type=click.IntRange(min=1), default=384, show_default=True,
              help="Number of images (every 4th is in the val split).")
@click.option("--image-size", type=click.IntRange(min=16), default=64, show_default=True,
              help="Side of the square images in pixels.")
@click.option("--seg-size", type=click.IntRange(min=16), default=32, show_default=True,
              help="Side of the label maps; must divide --image-size.")
@click.option("--seed", default=0, show_default=True, help="Seed of the drawing (same seed, same bytes).")
@click.option("--force", is_flag=True, help="Write into OUT even when it is not empty (the set's files are overwritten).")
def synth(out: str, n_images: int, image_size: int, seg_size: int, seed: int, force: bool) -> None:
    """Write the synthetic Broden-format set (the quickstart's data) into OUT.

    Six categories with exact ground truth (color, object, part, material per pixel; scene,
    texture per image), written in seconds; any stage takes it where it takes a Broden directory.

    \b
    Example:
      neurosem synth data/synthetic --images 96
      neurosem dissect resnet18 --broden data/synthetic --weights none
    """
    from neurosem.data.synthetic import synth as write_synth

    click.echo(write_synth(out, n_images=n_images, image_size=image_size, seg_size=seg_size, seed=seed,
                           force=force))


@cli.command(context_settings=CONTEXT)
@click.option("--fix", is_flag=True, help="Reinstall a matching torch/torchvision pair with pip when they do not fit.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(fix: bool, as_json: bool) -> None:
    """Check the installation: versions, devices, torchvision, the torch cache.

    Prints one line per check and a fix for each problem; exits 1 when something is broken.

    \b
    Example:
      neurosem doctor
    """
    from neurosem.doctor import run_doctor

    ok = run_doctor(fix=fix, as_json=as_json)
    sys.exit(0 if ok else 1)


@cli.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--input-size", type=click.IntRange(min=1), default=None,
              help="Side of the square dummy input (default: the model's own, 224 or 32 for the CIFAR zoo).")
@click.option("--weights", default="none", show_default=True,
              help="Weights to load (shapes do not depend on them): none, default or a .pth file.")
@click.option("--tokens", type=click.IntRange(min=0), default=None,
              help="Class/register tokens before the patch tokens of [B, T, D] outputs (default: detected).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def layers(model: str, input_size: int | None, weights: str, tokens: int | None, as_json: bool) -> None:
    """List every layer of MODEL (dotted module name) with its output shape.

    MODEL is a torchvision name (resnet18), a CIFAR zoo name (resnet8x4), timm:NAME or
    path/file.py:factory. Layers marked * are the defaults; "-> C x H x W" is the unit maps an
    output that is not (C, H, W) gives (tokens, channels-last). MODULE[i] / MODULE[key] in
    --layers picks one output of a tuple or dict.

    \b
    Examples:
      neurosem layers resnet18 --input-size 224
      neurosem layers mymodel.py:make      (your own model: make() returns an nn.Module)
    """
    from neurosem.models import layer_table

    click.echo(layer_table(model, input_size=input_size, weights=weights, as_json=as_json, tokens=tokens))


@cli.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--data", required=True,
              help="A Broden directory, a folder of images, or cifar100:ROOT.")
@_layers_option
@_run_option
@_weights_option
@click.option("--batch-size", "-b", type=BATCH, default=64, show_default=True,
              help="Images per forward pass (the stored values do not depend on it).")
@_device_option
@click.option("--workers", type=WORKERS, default=2, show_default=True,
              help="DataLoader worker processes reading images (0: read in the main process).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Record only the first N images.")
@click.option("--force", is_flag=True, help="Start over even if the run holds other activations.")
@click.option("--repair", is_flag=True, help="Check the stored images' checksums and record damaged ones again.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage type of the activations (float32 for values beyond float16's range).")
@click.option("--tokens", type=click.IntRange(min=0), default=None,
              help="Class/register tokens before the patch tokens of [B, T, D] outputs (default: detected).")
@_quiet_option
def record(model: str, data: str, layers: tuple[str, ...], run: str | None, weights: str, batch_size: int,
           device: str, workers: int, limit: int | None, force: bool, repair: bool, dtype: str,
           tokens: int | None,
           quiet: bool) -> None:
    """Record activations of MODEL on a dataset into RUN/activations.h5.

    Broden images are fed at their stored size and normalised for the model. An interrupted run
    (Ctrl-C, a kill) resumes when the same command is run again.

    \b
    Examples:
      neurosem record resnet18 --data data/broden1_224 --layers layer3,layer4
      neurosem record mymodel.py:make --data data/broden1_224 --dtype float32   (-> runs/mymodel)
    """
    from neurosem.record import record as record_activations

    path = record_activations(model, data, run=run, layers=_split(layers), weights=weights,
                              batch_size=batch_size, device=device, force=force, limit=limit,
                              num_workers=workers, progress=not quiet, dtype=dtype, repair=repair,
                              tokens=tokens)
    click.echo(f"activations: {path}")


@cli.command(context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option("--broden", required=True, type=click.Path(), help="The Broden directory (e.g. data/broden1_224).")
@_run_option
@_layers_option
@_weights_option
@click.option("--quantile", default=0.005, show_default=True, help="Top quantile q: the threshold is the 1-q quantile.")
@click.option("--iou-threshold", default=0.04, show_default=True, help="A unit is interpretable at IoU >= this.")
@click.option("--categories", multiple=True, metavar="NAMES", help="Only these categories (comma-separated).")
@click.option("--batch-size", "-b", default=64, show_default=True,
              help="Images per batch when recording and tallying (the results do not depend on it).")
@click.option("--top", default=4, show_default=True, type=click.IntRange(min=1),
              help="Images per unit in the HTML report (those with the largest masks).")
@click.option("--no-report", is_flag=True, help="Skip the HTML report and the summary figure (the CSV and JSON are written).")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="CPU threads [default: the idle cores, i.e. the CPU count minus the load average]. On a "
                   "machine shared with other jobs, --threads 1 is never slower than a crowded core.")
@click.option("--label-cache", default=None, metavar="DIR|none",
              help="Where the decoded Broden labels are kept [default: $NEUROSEM_CACHE_DIR, else "
                   "~/.cache/neurosem]; 'none' decodes the label PNGs on every run.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (counts per layer and category, files) as JSON.")
@click.option("--no-store", is_flag=True,
              help="Run MODEL on the images in each of the two passes instead of writing activations.h5 "
                   "(no disk for the activations; one more forward pass, cheap on a GPU).")
@click.option("--formulas", default=0, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="Explain every unit by the best formula of up to N labels (AND, OR, AND NOT; beam "
                   "search, Mu & Andreas 2020) -> dissect/<layer>_formulas.csv/json. 0: none; 3 as in the paper.")
@click.option("--beam", default=5, show_default=True, type=click.IntRange(min=1), help="Beam width of the formula search.")
@click.option("--min-images", default=10, show_default=True, type=click.IntRange(min=1),
              help="A label is a formula candidate when it occurs in at least this many images.")
@click.option("--permutations", default=None, type=click.IntRange(min=0), metavar="R",
              help="Permutation p-value of every unit's best label (and formula) from R pairings of masks and "
                   "labels of other images; Benjamini-Hochberg at 5% [default: 100 with --formulas, else 0].")
@click.option("--baseline", type=click.Choice(["random"]), default=None,
              help="Also dissect the same architecture with random weights on the same images (the control).")
@_device_option
@_quiet_option
def dissect(model: str | None, broden: str, run: str | None, layers: tuple[str, ...], weights: str,
            quantile: float, iou_threshold: float, categories: tuple[str, ...], batch_size: int,
            top: int, no_report: bool, threads: int | None, label_cache: str | None, as_json: bool,
            no_store: bool, formulas: int, beam: int, min_images: int, permutations: int | None,
            baseline: str | None, device: str, quiet: bool) -> None:
    """NetDissect: IoU of every unit against every Broden concept.

    Records the activations first when the run has none. Writes dissect.h5, dissect/<layer>.csv,
    dissect/summary.json, dissect/index.html and a summary figure. The label PNGs are decoded once
    per Broden directory (the label cache); later dissections of any model read that.

    \b
    Examples:
      neurosem dissect resnet18 --broden data/broden1_224 --layers layer4
      neurosem dissect --run runs/resnet18 --broden data/broden1_224 --no-report --json
      neurosem dissect --run runs/resnet18 --broden data/broden1_224 --threads 1   (a busy machine)
      neurosem dissect resnet18 --broden data/broden1_224 --no-store               (no activations.h5)
      neurosem dissect resnet18 --broden data/broden1_224 --layers layer4 --formulas 3 --permutations 100
      neurosem dissect resnet18 --broden data/broden1_224 --layers layer4 --baseline random
    """
    from neurosem.dissect import dissect as run_dissect

    result = run_dissect(run=run, broden=broden, model=model, layers=_split(layers), quantile=quantile,
                         iou_threshold=iou_threshold, categories=_split(categories), device=device,
                         batch_size=batch_size, weights=weights, progress=not quiet, top=top,
                         report=not no_report, threads=threads, label_cache=label_cache, no_store=no_store,
                         formulas=formulas, beam=beam, min_images=min_images, permutations=permutations,
                         baseline=baseline)
    if as_json:
        from neurosem.dissect.report import summary_json

        click.echo(summary_json(result))
    else:
        from neurosem.dissect.explain import report_lines

        click.echo("\n".join([str(result)] + report_lines(result)))


@cli.command(context_settings=CONTEXT, short_help="Learn a semantic vector per neuron (paper eq. 1).")
@click.argument("model", required=False)
@click.option("--data", default=None, help="A folder of images, a Broden directory or cifar100:ROOT.")
@click.option("--broden", default=None, type=click.Path(), help="A Broden directory (same as --data).")
@_run_option
@_layers_option
@_weights_option
@click.option("--dim", default=16, show_default=True, help="Dimension K of the semantic vectors.")
@click.option("--trainer", type=click.Choice(["fit", "paper"]), default="fit", show_default=True,
              help="fit: exact, one data pass then a full-batch fit; paper: the paper's SGD protocol.")
@click.option("--epochs", default=100, show_default=True, help="Epochs of the paper trainer.")
@click.option("--batch-size", "-b", type=BATCH, default=64, show_default=True,
              help="Images per batch when recording, and the paper trainer's mini-batch size (under "
                   "torchrun the global batch, shared among the processes).")
@click.option("--lr", default=0.1, show_default=True, help="Learning rate of the paper trainer's SGD.")
@click.option("--temperature", default=1.0, show_default=True,
              help="τ dividing the cosines before both softmaxes (1 = the paper's formula).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random initial vectors (and the paper trainer's shuffling).")
@click.option("--no-store", is_flag=True, help="Stream through the model without writing activations.h5.")
@_device_option
@_quiet_option
def embed(model: str | None, data: str | None, broden: str | None, run: str | None, layers: tuple[str, ...],
          weights: str, dim: int, trainer: str, epochs: int, batch_size: int, lr: float, temperature: float,
          seed: int, no_store: bool, device: str, quiet: bool) -> None:
    """Learn a semantic vector per neuron (paper eq. 1) -> RUN/embedding.h5.

    Uses the run's stored activations when they match, records them otherwise.

    \b
    Example:
      neurosem embed resnet18 --broden data/broden1_224 --dim 16
    """
    from neurosem.embed import embed as run_embed

    if data and broden and data != broden:
        raise click.UsageError("give --data or --broden, not both")
    path = run_embed(model=model, data=data or broden, run=run, layers=_split(layers), dim=dim, trainer=trainer,
                     epochs=epochs, batch_size=batch_size, lr=lr, temperature=temperature, seed=seed,
                     device=device, no_store=no_store, weights=weights, progress=not quiet)
    click.echo(f"embedding: {path}")


@cli.command(context_settings=CONTEXT, short_help="KL curves of the embedding against the IoU targets (Fig. 4).")
@_run_option
@click.option("--layer", default=None, help="Plot only this layer.")
@click.option("--json", "as_json", is_flag=True, help="Print the curves as JSON.")
@_quiet_option
def kl(run: str | None, layer: str | None, as_json: bool, quiet: bool) -> None:
    """KL between the IoU-vector and semantic-vector similarities (paper Fig. 4).

    For every saved snapshot of the embedding, with a random baseline and an upper bound.
    Writes kl.json, kl.csv and figures/kl_curves.*.

    \b
    Example:
      neurosem kl --run runs/resnet18
    """
    from neurosem.analysis.commands import kl_report

    click.echo(kl_report(run=run, layer=layer, as_json=as_json, progress=not quiet))


@cli.command(context_settings=CONTEXT)
@click.option("--neuron", "-n", required=True, help="The query unit, LAYER:INDEX (e.g. layer4:312).")
@click.option("--add", multiple=True, metavar="ID", help="Add this unit's vector (repeatable).")
@click.option("--sub", multiple=True, metavar="ID", help="Subtract this unit's vector (repeatable).")
@click.option("-k", default=5, show_default=True, help="How many neighbours.")
@_run_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--figure", type=click.Path(dir_okay=False), default=None,
              help="Also draw the units' activation masks into this file (.pdf/.png/.svg).")
def query(neuron: str, add: tuple[str, ...], sub: tuple[str, ...], k: int, run: str | None, as_json: bool,
          figure: str | None) -> None:
    """Nearest units to a neuron, or to a sum of neurons, by semantic-vector cosine.

    \b
    Examples:
      neurosem query --neuron layer4:312 -k 5
      neurosem query --neuron layer4:312 --add layer4:77 --json
    """
    from neurosem.analysis.commands import query_report

    click.echo(query_report(run=run, neuron=neuron, add=_split(add) or (), sub=_split(sub) or (), k=k,
                            as_json=as_json, figure=figure))


@cli.command(context_settings=CONTEXT)
@_run_option
@click.option("--formats", default="pdf,png,svg", show_default=True, help="Comma-separated file formats.")
@click.option("--layer", default=None, help="Layer of the maps and heat map (default: the last embedded layer).")
@click.option("--neuron", "-n", default=None, help="Unit of the neighbour figure (default: an interpretable unit whose masks show).")
@click.option("--dpi", default=300, show_default=True, type=click.IntRange(min=1), help="Resolution of the PNG files.")
def figures(run: str | None, formats: str, layer: str | None, neuron: str | None, dpi: int) -> None:
    """Draw the paper's figures for a run into RUN/figures (PDF, PNG at 300 dpi, SVG).

    \b
    Example:
      neurosem figures --run runs/resnet18 --formats pdf,png
    """
    from neurosem.analysis.figures import make_figures

    for path in make_figures(run, formats=tuple(_split([formats]) or ("pdf", "png", "svg")), dpi=dpi, layer=layer,
                             unit=neuron):
        click.echo(str(path))


@cli.command(context_settings=CONTEXT, short_help="Static knowledge distillation (paper eq. 2) or a baseline.")
@click.option("--teacher", default=None, help="Teacher model (zoo name); not run for skd.")
@click.option("--student", required=True, help="Student model (zoo name, e.g. resnet8x4).")
@click.option("--method", default="skd", show_default=True,
              help="skd: the paper's static distillation; skd-random: SKD with random vectors (a control); "
                   "ce: the student alone; the baselines kd, fitnet, vid, ab, ft, at, sp, nst, fsp, cc, cc-rbf, "
                   "rkd, pkt, crd (each with CRD's default weight); iepkt, iepkt-bb: IEPKT (Lee & Song, AAAI "
                   "2021; iepkt-bb adds its black-box term), for pairs with equal widths, e.g. wrn_40_4 -> "
                   "wrn_16_4.")
@click.option("--data", required=True, help="cifar100:ROOT (a folder holding cifar-100-python/).")
@click.option("--protocol", type=click.Choice(["paper", "crd", "iepkt"]), default=None,
              help="Training schedule (SGD, momentum 0.9, weight decay 5e-4, batch 64, lr x0.1 at each "
                   "milestone): paper = 100 epochs, lr 0.1, milestones 50/75/90; crd = the CRD/RepDistiller "
                   "benchmark's 240 epochs, lr 0.05, milestones 150/180/210; iepkt = IEPKT's 100 epochs, lr "
                   "0.1, batch 128, x0.2 at 30/60/80, Nesterov [default: crd for every method "
                   "but skd (paper) and iepkt (iepkt)]. --epochs (milestones scale with it), --lr and "
                   "--batch-size override it.")
@click.option("--epochs", type=int, default=None, help="Override the protocol's epochs.")
@click.option("--gamma", type=float, default=None, help="Weight of the cross-entropy (CRD's -r; default 1, kd 0.1).")
@click.option("--alpha", type=float, default=None, help="Weight of the KD term (CRD's -a; default 0, kd 0.9).")
@click.option("--beta", type=float, default=None, help="Weight of the method's loss (CRD's -b; SKD: 0.5).")
@click.option("--kd-T", "kd_T", type=float, default=4.0, show_default=True, help="KD temperature.")
@click.option("--temperature", default=1.0, show_default=True, help="SKD's τ dividing the cosines.")
@click.option("--hint-layer", type=int, default=2, show_default=True, help="FitNet's feature (0 = the stem's output).")
@click.option("--feat-dim", type=int, default=128, show_default=True, help="CRD and CC embedding width.")
@click.option("--nce-k", type=int, default=16384, show_default=True, help="CRD's negatives per sample.")
@click.option("--nce-t", type=float, default=0.07, show_default=True, help="CRD's temperature.")
@click.option("--nce-m", type=float, default=0.5, show_default=True, help="CRD's memory momentum.")
@click.option("--init-epochs", type=int, default=None,
              help="Initialisation stage of ab, ft, fsp (default 30); IEPKT's GNN stage (default 20).")
@click.option("--iep-alt", type=float, default=None,
              help="IEPKT: weight of L_alt, the L1 between the messages (default 1; not from the paper: its "
                   "optimiser is missing).")
@click.option("--iep-int", type=float, default=None,
              help="IEPKT: weight of L_int, the KL between the GNN readouts (default 1; not from the paper).")
@click.option("--iep-bb", type=float, default=None,
              help="iepkt-bb: weight of the black-box term L_BB (default 1; not from the paper).")
@click.option("--iep-clip", type=click.Choice(["tensor", "global", "none"]), default=None,
              help="IEPKT: clip each term's gradient to the cross-entropy gradient's norm per parameter tensor "
                   "(default; the author's MHGD optimiser), over the whole gradient, or not (not from the paper).")
@click.option("--iep-ramp/--no-iep-ramp", default=None,
              help="IEPKT: scale that norm by sigmoid(epoch) over the student's epochs (default on; not from "
                   "the paper).")
@click.option("--iep-stats", type=click.Choice(["frozen", "update"]), default=None,
              help="IEPKT: the teacher's PCA statistics after the GNN stage (default frozen; not from the paper).")
@click.option("--iep-project", type=click.Choice(["updated", "previous"]), default=None,
              help="IEPKT: project a batch with the PCA statistics updated by it (default) or the previous "
                   "ones (not from the paper: the code leaves the order open).")
@click.option("--teacher-weights", default=None, type=click.Path(dir_okay=False), help="Teacher checkpoint (.pth).")
@click.option("--teacher-vectors", default=None, type=click.Path(),
              help="The teacher's embedding.h5 or its run directory (for skd).")
@click.option("--batch-size", "-b", type=BATCH, default=None, help="Override the protocol's mini-batch size.")
@click.option("--lr", type=float, default=None, help="Override the protocol's initial learning rate.")
@click.option("--seed", default=0, show_default=True, help="Seed of every random draw: the student's initialisation, the data order, augmentation.")
@click.option("--seeds", default=None, metavar="LIST",
              help="Run (or resume) one run per seed, e.g. 0,1,2, and write a Table-1-style summary.")
@click.option("--workers", type=WORKERS, default=2, show_default=True,
              help="DataLoader worker processes (0: load in the main process).")
@_distill_run_option
@_device_option
@_quiet_option
def distill(teacher: str | None, student: str, method: str, data: str, protocol: str | None, epochs: int | None,
            gamma: float | None, alpha: float | None, beta: float | None, kd_T: float, temperature: float,
            hint_layer: int, feat_dim: int, nce_k: int, nce_t: float, nce_m: float, init_epochs: int | None,
            iep_alt: float, iep_int: float, iep_bb: float, iep_clip: str, iep_ramp: bool, iep_stats: str,
            iep_project: str, teacher_weights: str | None, teacher_vectors: str | None, batch_size: int | None, lr: float | None,
            seed: int, seeds: str | None, workers: int, run: str | None, device: str, quiet: bool) -> None:
    """Train a student with static knowledge distillation (paper eq. 2) or a baseline.

    SKD needs only the teacher's vectors (neurosem embed TEACHER --data cifar100:ROOT); the
    teacher never runs. Checkpoints every epoch and resumes after an interruption. The resolved
    settings (every weight, temperature and option) are written to RUN/distill.json. Under
    torchrun every rank trains on its slice of each global batch (--batch-size is the global
    batch) and rank 0 writes; a checkpoint resumes on any number of processes.

    \b
    Example:
      neurosem distill --teacher resnet32x4 --student resnet8x4 --method skd \\
          --teacher-vectors runs/resnet32x4 --data cifar100:data/cifar
      neurosem distill --teacher resnet32x4 --student resnet8x4 --method crd \\
          --teacher-weights resnet32x4.pth --data cifar100:data/cifar --seeds 0,1,2
      neurosem distill --teacher wrn_40_4 --student wrn_16_4 --method iepkt \\
          --teacher-weights wrn_40_4.pth --data cifar100:data/cifar
      torchrun --nproc-per-node 8 -m neurosem -- distill --teacher resnet32x4 \\
          --student resnet8x4 --teacher-vectors runs/resnet32x4 --data cifar100:data/cifar
    """
    from neurosem.distill.tables import distill_cli

    out = distill_cli(seeds=seeds, teacher=teacher, student=student, method=method, data=data, protocol=protocol,
                      epochs=epochs, seed=seed, device=device, run=run, beta=beta, alpha=alpha, gamma=gamma,
                      kd_T=kd_T, temperature=temperature, hint_layer=hint_layer, feat_dim=feat_dim, nce_k=nce_k,
                      nce_t=nce_t, nce_m=nce_m, init_epochs=init_epochs, teacher_weights=teacher_weights,
                      teacher_vectors=teacher_vectors, batch_size=batch_size, lr=lr, num_workers=workers,
                      progress=not quiet, iepkt=_iep_settings(alt=iep_alt, inter=iep_int, bb=iep_bb, clip=iep_clip,
                                                              ramp=iep_ramp, stats=iep_stats, project=iep_project))
    click.echo(json.dumps(out))


def _iep_settings(**given: object) -> dict | None:
    """The --iep-* options given, as IEPKT's settings (``None`` when none is given)."""
    names = {"alt": "alt_weight", "inter": "int_weight", "bb": "bb_weight"}
    out = {names.get(k, k): v for k, v in given.items() if v is not None}
    return out or None


@cli.command("distill-table", context_settings=CONTEXT, short_help="Table-1-style summary of finished distill runs.")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for table.csv, table.md, table.tex (default: the first RUNS folder).")
def distill_table(runs: tuple[str, ...], out: str | None) -> None:
    """Summarise finished distill runs (run folders, or folders holding them): last- and best-epoch
    accuracy, mean ± std over seeds, paired differences against CE and KD with p-values.

    \b
    Example:
      neurosem distill-table runs/resnet8x4-ce runs/resnet8x4-kd-resnet32x4 runs/resnet8x4-crd-resnet32x4
    """
    from neurosem.distill.tables import write_table_from_runs

    for path in write_table_from_runs(list(runs), out):
        click.echo(str(path))


@cli.command(context_settings=CONTEXT, short_help="A vector per Broden concept in a layer (Net2Vec).")
@click.argument("model", required=False)
@click.option("--broden", required=True, type=click.Path(), help="The Broden directory (e.g. data/broden1_224).")
@_run_option
@click.option("--layers", "-l", multiple=True, metavar="NAMES",
              help="Layers, comma-separated or repeated [default: every layer of the run's dissection].")
@_weights_option
@click.option("--concepts", "names", multiple=True, metavar="NAMES",
              help="Only these concepts (comma-separated) [default: every concept in both splits].")
@click.option("--categories", multiple=True, metavar="NAMES", help="Only these categories (comma-separated).")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(min=1),
              help="Passes over the training images (all concepts and layers train together).")
@click.option("--lr", default=0.05, show_default=True, type=float, help="Adam's learning rate.")
@click.option("--input", "input_", default="binary", show_default=True, type=click.Choice(["binary", "raw"]),
              help="binary: unit maps thresholded at the dissection thresholds (Net2Vec); raw: maps "
                   "normalised per unit.")
@click.option("--batch-size", "-b", default=64, show_default=True, type=BATCH, help="Images per batch.")
@click.option("--seed", default=0, show_default=True, help="Seed of the training and of a hold-out split.")
@click.option("--label-cache", default=None, metavar="DIR|none",
              help="Where the decoded Broden labels are kept [default: as dissect]; 'none' reads the PNGs.")
@click.option("--no-figures", is_flag=True, help="Skip the figures (the files and global.json are written).")
@_device_option
@_quiet_option
def concepts(model: str | None, broden: str, run: str | None, layers: tuple[str, ...], weights: str,
             names: tuple[str, ...], categories: tuple[str, ...], epochs: int, lr: float, input_: str,
             batch_size: int, seed: int, label_cache: str | None, no_figures: bool, device: str,
             quiet: bool) -> None:
    """Concept vectors (Net2Vec; Gu & Tresp): per layer, a weight vector over the units for every
    Broden concept, trained on the train split and scored on val against the best single unit.

    Dissects first when the run has no dissection (and records when MODEL is given). Writes
    concepts.h5, concepts/<layer>.csv, concepts/global.json and figures/concepts_*.

    \b
    Examples:
      neurosem concepts --run runs/resnet18 --broden data/broden1_224 --layers layer4
      neurosem concepts resnet18 --broden data/broden1_224 --concepts dog,cat,grass --input raw
    """
    from neurosem.concepts.run import summary_lines, train_concepts

    cv = train_concepts(run=run, broden=broden, model=model, layers=_split(layers), concepts=_split(names),
                        categories=_split(categories), epochs=epochs, lr=lr, input=input_, batch_size=batch_size,
                        seed=seed, device=device, progress=not quiet, label_cache=label_cache,
                        figures=not no_figures, weights=weights)
    if cv is not None:  # None on ranks > 0 of a torchrun launch (rank 0 trains and writes)
        click.echo("\n".join(summary_lines(cv)))


@cli.command(context_settings=CONTEXT, short_help="Why one image got its class: concept maps and the logit split.")
@click.argument("image", type=click.Path())
@_run_option
@click.option("--layer", default=None, help="A layer with concept vectors [default: the last one].")
@click.option("--class", "class_index", default=None, type=int, help="The class index [default: the top class].")
@click.option("--top", default=5, show_default=True, type=click.IntRange(min=1),
              help="Concept maps and contributions shown.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output folder [default: RUN/explain].")
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
def explain(image: str, run: str | None, layer: str | None, class_index: int | None, top: int, out: str | None,
            as_json: bool) -> None:
    """Explain one image with the run's concept vectors: each concept's map, the concepts present
    and, for a linear head after global average pooling, the class logit split exactly over the
    concepts (parts + residual + bias = logit). Writes a PNG/PDF panel and JSON.

    \b
    Example:
      neurosem explain cat.jpg --run runs/resnet18 --layer layer4 --class 281 --top 5
    """
    from pathlib import Path

    from neurosem.concepts.explain import explain as run_explain

    e = run_explain(image, run=run, layer=layer, class_index=class_index, top=top, out=out)
    click.echo(Path(e.outputs["json"]).read_text() if as_json else "\n".join(e.lines(top)))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``neurosem`` script: every failure is one ``error:`` line on stderr.

    Exit status: 2 for what the user can fix (a :class:`NeurosemError`, a bad option, a file that
    cannot be read or written), 130 after Ctrl-C, 1 for an internal error.
    """
    args = list(argv) if argv is not None else sys.argv[1:]
    from neurosem.distributed import ReportedOnRankZero, is_quiet_rank, session

    quiet_rank = is_quiet_rank()  # ranks > 0 under torchrun: rank 0 prints (neurosem.distributed)
    command = next((a for a in args if not a.startswith("-")), "")
    try:
        with session(), _stdout_of(quiet_rank):
            _dispatch(args, command)
    except ReportedOnRankZero:
        sys.exit(2)
    except NeurosemError as exc:
        _fail(str(exc), 2)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        # record has already said what it saved (click wraps Ctrl-C in Abort)
        if any(getattr(e, "reported", False) for e in (exc, exc.__cause__, exc.__context__)):
            sys.exit(130)
        _fail(f"interrupted: {INTERRUPTED.get(command, 'nothing to resume; run the command again')}", 130,
              prefix="")
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `neurosem` alone: the help, as click prints it
            exc.show()
            sys.exit(exc.exit_code)
        where = exc.ctx.command_path if exc.ctx is not None else "neurosem"
        if quiet_rank:  # every rank parsed the same command line: rank 0 says it
            sys.exit(exc.exit_code)
        _fail(f"{exc.format_message()} (see `{where} --help`)", exc.exit_code)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except OSError as exc:  # a path that cannot be read or written: the user's to fix
        what = f"{exc.strerror or type(exc).__name__}: {exc.filename}" if exc.filename else str(exc)
        _fail(f"{what}; check the path and its permissions", 2)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - last line of defence: stay one line, point at NEUROSEM_DEBUG
        import os

        if os.environ.get("NEUROSEM_DEBUG"):
            raise
        text = " ".join(str(exc).split())
        _fail(f"internal error, please report it: {type(exc).__name__}: {text} "
              "(set NEUROSEM_DEBUG=1 for the traceback)", 1)


def _dispatch(args: list[str], command: str) -> None:
    """Run the command line; under torchrun, a command not in :data:`TORCHRUN_COMMANDS` on rank 0 alone."""
    def run() -> None:
        cli.main(args=args, prog_name="neurosem", standalone_mode=False)

    if command in TORCHRUN_COMMANDS:
        run()
        return
    from neurosem.distributed import current, on_rank_zero

    on_rank_zero(run, current())  # current(): None for one process (nothing imported)


def _stdout_of(quiet_rank: bool) -> object:
    """A context manager: on ranks > 0 of a torchrun launch nothing goes to stdout (rank 0 prints)."""
    import contextlib
    import os

    if not quiet_rank:
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(open(os.devnull, "w"))


def _fail(message: str, code: int, prefix: str = "error: ") -> None:
    click.echo(f"{prefix}{message}", err=True)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
