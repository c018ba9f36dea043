"""The ``moetrain`` command: ``moetrain train [hydra overrides]``."""

from __future__ import annotations

import sys

USAGE = """usage: moetrain <command> [args]

commands:
  train [overrides]          train a model (Hydra overrides, e.g. model=tiny train.steps=100)
  prepare-data INPUTS...     tokenise text files into shards (--help for options)
  convert --to-hf CKPT OUT   export a checkpoint to the Hugging Face DeepSeek-V3 format
  convert --from-hf DIR OUT  import a Hugging Face checkpoint (FP8 weights dequantised)
  plan [--json] [overrides]  memory per GPU, traffic, time and cost of a job before launch (train's overrides)
  report RUN_DIR... [--out]  plot runs' metrics.jsonl: one PNG dashboard and an HTML page beside it
  completion bash            print a bash completion script: eval "$(moetrain completion bash)"
"""

# Bash completion of the subcommands, and of ``moetrain train``'s overrides by Hydra's own completer (which
# assumes a one-word program: the line it is given drops "train").
BASH_COMPLETION = r"""_moetrain_complete() {
  local cur=${COMP_WORDS[COMP_CWORD]}
  if [ "$COMP_CWORD" -eq 1 ]; then
    mapfile -t COMPREPLY < <(compgen -W "train plan prepare-data convert report completion" -- "$cur")
  elif [ "${COMP_WORDS[1]}" = train ]; then
    local line=${COMP_LINE/ train/}
    local choices
    choices=$(COMP_LINE="$line" COMP_POINT=$((COMP_POINT - 6)) moetrain train -sc query=bash 2>/dev/null)
    mapfile -t COMPREPLY < <(compgen -W "$choices" -- "$cur")
  fi
}
complete -o nospace -o default -F _moetrain_complete moetrain
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from moetrain import train

        sys.argv = [sys.argv[0] + " train", *rest]  # Hydra reads its overrides from sys.argv
        train.main()
        return 0
    if command == "plan":
        from moetrain.planner import main as plan_main

        return plan_main(rest)
    if command == "prepare-data":
        from moetrain.data.prepare import main as prepare_main

        return prepare_main(rest)
    if command == "convert":
        from moetrain.checkpoint.convert import main as convert_main

        return convert_main(rest)
    if command == "report":
        from moetrain.report import main as report_main

        return report_main(rest)
    if command == "completion":
        if rest != ["bash"]:
            print("usage: moetrain completion bash", file=sys.stderr)
            return 2
        print(BASH_COMPLETION, end="")
        return 0
    print(f"moetrain: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
