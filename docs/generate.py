"""Regenerate docs/cli.md and docs/config.md from the code: `.venv/bin/python docs/generate.py`.
tests/test_docs.py fails when either file is out of date, or a command, option or setting is missing."""

import os

import typer

HERE = os.path.dirname(os.path.abspath(__file__))


def commands(group, prefix="wbrag"):
    """(full name, click command) for every command, depth first, in definition order."""
    for name, cmd in group.commands.items():
        full = f"{prefix} {name}"
        yield full, cmd
        if hasattr(cmd, "commands"):
            yield from commands(cmd, full)


def cli_markdown():
    from writeback_rag.cli import app

    root = typer.main.get_command(app)
    out = ["# Command-line reference", "",
           "Generated from the CLI by `docs/generate.py`; `wbrag COMMAND --help` prints the same. Every command "
           "takes `--kb PATH` (default: `$WBRAG_KB`, else `./kb`). Errors are one line on stderr, "
           "`wbrag: error: ...`, with a non-zero exit code: 1 general, 2 bad input or setting, 3 not a knowledge "
           "base, 4 embedder mismatch, 5 LLM problem, 6 storage problem (damaged database, read-only folder, "
           "full disk), 75 write-back lock busy (cron may retry).", ""]
    for full, cmd in commands(root):
        out += [f"## `{full}`", "", (cmd.help or "").strip().split("\n\n")[0], ""]
        args = [p for p in cmd.params if p.param_type_name == "argument"]
        if args:
            out += ["| argument | meaning |", "|---|---|"]
            out += [f"| `{p.name.upper()}` | {(getattr(p, 'help', '') or '').replace('|', '/')} |" for p in args]
            out.append("")
        opts = [p for p in cmd.params if p.param_type_name == "option" and not p.hidden]
        if opts:
            out += ["| option | meaning |", "|---|---|"]
            for p in opts:
                names = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
                out.append(f"| {names} | {(p.help or '').replace('|', '/')} |")
            out.append("")
    return "\n".join(out)


def config_markdown():
    from writeback_rag import config

    return config.markdown()


FILES = {"cli.md": cli_markdown, "config.md": config_markdown}

if __name__ == "__main__":
    for name, fn in FILES.items():
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
            f.write(fn() + "\n")
        print(f"wrote docs/{name}")
