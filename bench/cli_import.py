"""``f2d2-bench import FORMAT FILE --out DIR``: models trained elsewhere as harness checkpoints.

Errors follow bench/cli.py: one ``error:`` line, exit status 2, nothing written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer, cli) -> None:
    """Add the ``import`` command group to ``app``. ``cli`` is the running bench.cli module (also when
    it runs as ``__main__``), whose one-line error and stop-signal helpers the commands use."""
    import_app = typer.Typer(no_args_is_help=True, help="Convert models trained elsewhere into f2d2-bench checkpoints.")
    app.add_typer(import_app, name="import")

    @import_app.command("torchcfm")
    def import_torchcfm(
        file: Annotated[Path, typer.Argument(help="A TorchCFM CIFAR-10 checkpoint, e.g. otcfm_cifar10_weights_step_400000.pt.")],
        out: Annotated[Path, typer.Option(help="Checkpoint directory to create (must not exist, or be empty).")],
        variant: Annotated[Optional[str], typer.Option(help="otcfm, cfm (icfm) or fm; default: from the file name.")] = None,
        num_head_channels: Annotated[int, typer.Option(help="Channels per attention head (TorchCFM CIFAR-10: 64; -1: use --num-heads).")] = 64,
        num_heads: Annotated[int, typer.Option(help="Attention heads when --num-head-channels is -1.")] = 4,
        quiet: Annotated[bool, typer.Option(help="No summary output.")] = False,
    ) -> None:
        """Convert a TorchCFM CIFAR-10 flow-matching checkpoint into a flow-matching teacher (no torchcfm needed).

        The result loads with bench.load_checkpoint and serves `f2d2-bench sweep --teacher DIR`.
        """
        try:
            from bench.torchcfm_import import import_torchcfm as convert

            directory = convert(file, out, variant=variant, num_heads=num_heads, num_head_channels=num_head_channels)
        except (*cli._user_errors(), ValueError) as err:  # ConversionError is a ValueError
            cli._fail(str(err))
        except KeyboardInterrupt as err:
            cli._interrupted(err)
        if not quiet:
            typer.echo(summary(directory))


def summary(directory: Path) -> str:
    from bench.checkpoint import read_meta

    meta = read_meta(directory)
    source, cfg = meta["source"], meta["model"]
    return (
        f"wrote {directory}: flow-matching teacher for {meta['dataset']} from {source['file']} "
        f"(variant {source['variant']}, sha256 {source['sha256'][:16]}..., ADM UNet channels {cfg['channels']} "
        f"x {cfg['channel_mult']}, {meta['conversion']['num_tensors']} tensors, "
        f"published CIFAR-10 architecture: {'yes' if source['published_cifar10_architecture'] else 'no'})"
    )
