"""The ``mlgen`` command line (``mlgen.cli.app``) and what its commands share."""


def renamed_flag(new: object, old: object, old_flag: str, new_flag: str) -> object:
    """The value of a renamed flag (the new name wins); the old name still works, with one warning line."""
    if old is not None:
        import typer

        typer.echo(f"mlgen: warning: {old_flag} is deprecated: use {new_flag}", err=True)
    return old if new is None else new
