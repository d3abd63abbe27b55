

def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the script's own arguments, CLI overrides after ``--`` passed on to every run)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
