"""Command line: ``python -m freeatten_core {bench,train,evaluate,data,experiments,presets,reproduce,methods} ...``.

Each subcommand lives in its own module with a ``main(argv)`` function; this file only dispatches.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "bench": ("freeatten_core.bench", "benchmark the fused kernels against SDPA / FlexAttention / reference"),
    "train": ("freeatten_core.train", "train a GPT with a chosen attention method"),
    "evaluate": ("freeatten_core.evaluate", "length-extrapolation evaluation of a checkpoint"),
    "data": ("freeatten_core.data", "fetch and cache the data (shakespeare, gpt2 BPE ranks, fineweb shards)"),
    "experiments": ("freeatten_core.experiments", "the book's experiments: extrapolation, ablation, throughput"),
    "kernel-report": ("freeatten_core.kernel_report", "compile the fused kernels for sm_90a/sm_80 (no GPU) and "
                                                      "count their inner loops against softmax yardsticks"),
    "presets": ("freeatten_core.presets", "the run sizes; write or check presets/<name>.yaml (papermill)"),
    "reproduce": ("freeatten_core.reproduce", "re-execute every chapter at a preset with papermill -> results/<preset>/"),
    "methods": (None, "list the attention methods"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<12} {help}" for name, (_, help) in COMMANDS.items()]
        msg = "usage: python -m freeatten_core COMMAND [options]\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command {argv[0]!r}\n\n{msg}", file=sys.stderr)
            return 2
        print(msg)
        return 0
    name, rest = argv[0], argv[1:]
    if name == "methods":
        from .attention import method_table

        print(method_table())
        return 0
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
