"""Run a mergekit YAML with mergekit's own runner, alignmerge's methods registered in it.

Every alignmerge method that mergekit lacks (fisher, regmean, alignmerge, safemerge, mergealign)
becomes usable from the YAML; statistics are per-model file parameters (`fisher:
path/to/model.fisher.safetensors`, from `alignmerge fisher`), anchor files are method parameters
(`subspace:`, `align_fisher:`), and the anchor is mergekit's `base_model:`. Everything
after CONFIG OUT is passed to mergekit-yaml unchanged (e.g. --cuda, --copy-tokenizer,
--out-shard-size 2B); see `alignmerge mergekit-yaml CONFIG OUT --help` for mergekit's options.

Example:
  alignmerge mergekit-yaml fisher.yml ./merged --copy-tokenizer
"""
from __future__ import annotations

import argparse

from alignmerge.errors import AlignMergeError

HELP = "run a mergekit YAML with mergekit's runner and alignmerge's methods (fisher, ...) registered"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="mergekit YAML config")
    parser.add_argument("out", help="output directory")
    parser.add_argument("mergekit_args", nargs=argparse.REMAINDER,
                        help="further mergekit-yaml options, passed through unchanged")


def run(args: argparse.Namespace) -> int:
    try:
        import click
        from mergekit.scripts.run_yaml import main as mergekit_yaml
    except ImportError as exc:
        raise AlignMergeError(f"mergekit is not installed ({exc}); install it with `pip install mergekit`") from None
    from alignmerge.mergekit_plugin import register

    _check_config(args.config)
    register()
    try:
        mergekit_yaml.main(args=[args.config, args.out, *args.mergekit_args],
                           prog_name="alignmerge mergekit-yaml", standalone_mode=False)
    except click.exceptions.Abort:
        return 1
    except click.exceptions.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


def _check_config(path: str) -> None:
    """Catch what mergekit would silently ignore: our ``anchor:`` key (mergekit knows only ``base_model:``)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except OSError as exc:
        raise AlignMergeError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise AlignMergeError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(raw, dict) and "anchor" in raw:
        raise AlignMergeError(f"{path}: anchor: is an alignmerge key that mergekit ignores; write the anchor as "
                              f"base_model: {raw['anchor']} (or run the config with `alignmerge merge`)")
